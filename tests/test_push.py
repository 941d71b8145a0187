"""`dataselect push` against a local stand-in of the Hub's HTTP API (tests/hub_standin.py).

The real huggingface_hub client talks HTTP to a real server on 127.0.0.1, so these tests see what
would arrive at the Hub: which repos, which files with which bytes, which headers.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml

from dataselect.outputs import OutputError
from dataselect.push import NO_TOKEN, PushError, dataset_card, files_to_upload, push

from .hub_standin import HubStandIn

TOKEN = "hf_standinTOKENthatmustneverbelogged0123"


@pytest.fixture
def hub():
    with HubStandIn() as standin:
        yield standin


@pytest.fixture
def no_saved_login(tmp_path, monkeypatch):
    """No token anywhere: not in the environment, not in a saved login (HF_HOME is an empty folder).

    huggingface_hub reads HF_HOME into `constants.HF_TOKEN_PATH` when it is imported, so the
    derived paths are pointed at the empty folder too.
    """
    home = tmp_path / "hf_home"
    home.mkdir()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return home


@pytest.fixture
def output(demo_build, tmp_path) -> Path:
    """A copy of the demo output with the mixture under data/ (made from the save_to_disk copy if absent)."""
    import datasets

    recipe, _, _ = demo_build
    folder = tmp_path / "out"
    shutil.copytree(recipe.output.path, folder)
    if not (folder / "data").is_dir():
        (folder / "data").mkdir()
        datasets.load_from_disk(str(folder)).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def expected_paths(folder: Path) -> set[str]:
    data = {p.relative_to(folder).as_posix() for p in (folder / "data").rglob("*") if p.is_file()}
    extras = {name for name in ("manifest.json", "rows.parquet", "USAGE.md") if (folder / name).is_file()}
    return data | extras | {"README.md"}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def section(card: str, heading: str) -> list[str]:
    """The lines of one `## ...` section of the card."""
    return card.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0].splitlines()


def test_push_uploads_the_mixture_and_card_to_a_private_repo(output, hub, tmp_path):
    manifest = json.loads((output / "manifest.json").read_text())
    result = push(output, "alice/mixture", token=TOKEN, endpoint=hub.url)

    assert hub.repos == {"alice/mixture": {"type": "dataset", "private": True}}
    arrived = hub.files["alice/mixture"]
    assert set(arrived) == expected_paths(output)
    assert not any(p.endswith((".arrow", "state.json", "dataset_info.json", "dataset_dict.json")) for p in arrived)
    assert {f["path"] for f in result["files"]} == set(arrived)
    for path in arrived:
        if path != "README.md":
            assert arrived[path] == (output / path).read_bytes(), path
    assert len(hub.commits) == 1 and hub.commits[0]["summary"].startswith("dataselect mixture")
    assert result["private"] is True and result["commit"] == hub.commits[0]["oid"]
    assert result["url"].startswith(hub.url) and "alice/mixture" in result["url"]

    card = arrived["README.md"].decode()
    meta = front_matter(card)
    assert "dataselect" in meta["tags"]
    [config] = meta["configs"]
    assert config["config_name"] == "default"
    assert config["data_files"][0]["split"] == "train"
    sources = section(card, "## Sources")
    for name, c in manifest["sources"].items():
        assert f"| {name} | {c['rows']} | {c['selected']} | {c['not_selected']} | {c['rejected']} |" in sources
    groups = section(card, "## Groups")
    for group in manifest["groups"]:
        [row] = [line for line in groups if line.startswith(f"| {group['rank']} | {group['group']} |")]
        assert ("| yes |" in row) == group["selected"] and group["reason"] in row
    assert manifest["mixture"]["fingerprint"] in card
    assert 'load_dataset("alice/mixture")' in card
    assert f"--set seed={manifest['recipe']['seed']}" in card
    assert yaml.safe_load(card.split("```yaml\n", 1)[1].split("\n```", 1)[0]) == manifest["recipe"]
    assert not (output / "README.md").exists()  # the card went up from memory

    # The card's `configs` really let `datasets` find the mixture in what arrived.
    import datasets

    repo = tmp_path / "arrived"
    for path, data in arrived.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(data)
    loaded = datasets.load_dataset(str(repo), cache_dir=str(tmp_path / "cache"))
    assert loaded["train"].num_rows == manifest["mixture"]["rows"]


def test_public_when_asked(output, hub):
    result = push(output, "alice/open-mixture", private=False, token=TOKEN, endpoint=hub.url)
    assert hub.repos["alice/open-mixture"]["private"] is False
    assert result["private"] is False


def test_pushing_again_commits_to_the_existing_repo(output, hub):
    push(output, "alice/mixture", token=TOKEN, endpoint=hub.url)
    push(output, "alice/mixture", token=TOKEN, endpoint=hub.url)  # the stand-in answers 409 the second time
    assert list(hub.repos) == ["alice/mixture"] and len(hub.commits) == 2


def test_a_private_push_never_goes_into_an_existing_public_repo(output, hub):
    push(output, "alice/open-mixture", private=False, token=TOKEN, endpoint=hub.url)
    with pytest.raises(PushError, match="public"):
        push(output, "alice/open-mixture", token=TOKEN, endpoint=hub.url)  # private by default
    assert len(hub.commits) == 1


def test_without_a_token_nothing_is_sent(output, hub, no_saved_login):
    with pytest.raises(PushError, match="HF_TOKEN") as err:
        push(output, "alice/mixture", endpoint=hub.url)
    assert str(err.value) == NO_TOKEN
    assert hub.requests == []


def test_saved_login_is_used(output, hub, no_saved_login):
    (no_saved_login / "token").write_text(TOKEN)
    push(output, "alice/mixture", endpoint=hub.url)
    assert {r.headers.get("authorization") for r in hub.requests} == {f"Bearer {TOKEN}"}


def test_dry_run_sends_nothing_and_needs_no_token(output, hub, no_saved_login):
    result = push(output, "alice/mixture", dry_run=True, endpoint=hub.url)
    assert hub.requests == [] and hub.repos == {}
    assert result["dry_run"] is True and result["private"] is True and result["repo_id"] == "alice/mixture"
    listed = {f["path"]: f["size"] for f in result["files"]}
    assert set(listed) == expected_paths(output)
    assert listed["README.md"] == len(result["card"].encode())
    assert listed["rows.parquet"] == (output / "rows.parquet").stat().st_size
    assert result["card"] == dataset_card(output, repo_id="alice/mixture")
    assert [p.as_posix() for p in files_to_upload(output)] == [p for p in listed if p != "README.md"]


def test_not_a_dataselect_output(tmp_path, hub):
    folder = tmp_path / "holiday-photos"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (folder / "manifest.json").write_text(json.dumps({"tool": "something-else"}))
    for dry_run in (True, False):
        with pytest.raises(OutputError, match="holiday-photos"):
            push(folder, "alice/mixture", token=TOKEN, dry_run=dry_run, endpoint=hub.url)
    assert hub.requests == []


def test_an_output_without_data_files_is_not_pushed(output, hub):
    shutil.rmtree(output / "data")
    with pytest.raises(PushError, match="data/"):
        push(output, "alice/mixture", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_token_is_sent_but_never_logged(output, hub, caplog, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_DEBUG", True)  # also log each request as curl
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    result = push(output, "alice/mixture", token=TOKEN, endpoint=hub.url)

    assert hub.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert "Request" in caplog.text and hub.url in caplog.text  # requests were logged...
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, repr(result)):
        assert TOKEN not in text  # ...without the token


def test_validation_split_and_jsonl_only(output, tmp_path):
    for f in (output / "data").iterdir():
        f.unlink()
    (output / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (output / "data" / "validation.jsonl").write_text('{"prompt": "c", "response": "d"}\n')
    card = dataset_card(output)
    [config] = front_matter(card)["configs"]
    assert config["data_files"] == [{"split": "train", "path": "data/train.jsonl"},
                                    {"split": "validation", "path": "data/validation.jsonl"}]
    assert 'load_dataset("<user>/<dataset>")' in card  # no repo id given: a placeholder

    import datasets

    repo = tmp_path / "repo"  # as the repo would hold it (the output folder itself is a save_to_disk folder)
    shutil.copytree(output / "data", repo / "data")
    (repo / "README.md").write_text(card)
    loaded = datasets.load_dataset(str(repo), cache_dir=str(tmp_path / "cache"))
    assert {split: ds["prompt"] for split, ds in loaded.items()} == {"train": ["a"], "validation": ["c"]}


def test_unreachable_hub_is_a_push_error(output):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PushError, match="alice/mixture") as err:
        push(output, "alice/mixture", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert TOKEN not in str(err.value)


def test_the_api_build_pushes_as_the_cli_build_does(demo_build, hub, tmp_path, monkeypatch):
    """`dataselect.build` with output.push_to_hub uploads, as `dataselect build` does. The finished
    run is copied, so this build reuses its stages without touching the session's build."""
    import dataselect

    recipe, _, _ = demo_build
    shutil.copytree(recipe.run_dir, tmp_path / "run")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    output = recipe.output.model_copy(update={"path": tmp_path / "out", "push_to_hub": "alice/built"})
    pushing = recipe.model_copy(update={"workdir": tmp_path / "run", "output": output})
    summaries = dataselect.build(pushing)
    assert summaries["push"]["repo_id"] == "alice/built" and hub.repos["alice/built"]["private"] is True
    assert hub.commits[-1]["repo_id"] == "alice/built" and "README.md" in hub.commits[-1]["paths"]
