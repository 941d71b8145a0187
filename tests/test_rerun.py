"""Stopping and rebuilding: Ctrl-C says what was kept and how to resume; a rebuild that writes a
different mixture keeps the earlier one beside it instead of losing it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from dataselect import export
from dataselect.cli import main
from dataselect.export import ExportError, previous_output

from .conftest import write_jsonl, write_small_recipe

QA = {"prompt": "q", "response": "a"}


def _recipe(tmp: Path) -> Path:
    """A small recipe (tiny model) whose stages run in seconds: 24 source rows in two groups."""
    rows = [{"q": f"what is {i} plus {i}", "a": f"it is {2 * i}", "task": "add" if i % 2 else "double"}
            for i in range(24)]
    source = {"name": "s", "dataset": str(write_jsonl(tmp / "s.jsonl", rows)), "format": QA, "group_by": "task"}
    target = write_jsonl(tmp / "t.jsonl", [{"q": f"what is {i} plus {i} again", "a": f"it is {2 * i}"}
                                           for i in range(12)])
    return write_small_recipe(tmp, "rerun", [source], target, QA, max_length=32)


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- Ctrl-C -----------------------------------------------------------------------------------

def _said(result) -> list[str]:
    """What the command said from "Interrupted" on (progress bars and logs may come before)."""
    lines = result.stderr.strip().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("Interrupted")):]


def test_ctrl_c_during_a_stage_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch):
    import dataselect.ingest
    import dataselect.meta_init

    path = _recipe(tmp_path)

    def interrupted_half_way(recipe, out, ingested):
        (out / "checkpoint.safetensors").write_bytes(b"progress")  # what a real stage keeps as it goes
        raise KeyboardInterrupt

    monkeypatch.setattr(dataselect.ingest, "stage", lambda recipe, out: {})  # finishes at once
    monkeypatch.setattr(dataselect.meta_init, "stage", interrupted_half_way)
    result = _invoke("build", "-r", path, "--set", "seed=3", "--force")
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output and "Traceback" not in result.output
    run = tmp_path / "run"
    assert _said(result) == [
        "Interrupted during meta_init.",
        f"Kept: ingest, finished in {run}; a rerun reuses it.",
        f"Kept: meta_init's work so far, in {run / '.meta_init.tmp'}; a rerun resumes from it where the stage keeps "
        "its progress (meta-init from its last checkpoint, sketching from its last finished chunk) and starts it "
        "over otherwise.",
        f"Resume with the same command without --force (which would start every stage over): "
        f"dataselect build -r {path} --set seed=3",
    ]
    assert (run / ".meta_init.tmp" / "checkpoint.safetensors").read_bytes() == b"progress"  # kept for the rerun


def test_ctrl_c_before_a_stage_wrote_anything(tmp_path, monkeypatch):
    import dataselect.ingest

    def interrupted_at_once(recipe, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataselect.ingest, "stage", interrupted_at_once)
    path = _recipe(tmp_path)
    result = _invoke("ingest", "-r", path)
    assert result.exit_code == 130
    assert _said(result) == [
        "Interrupted during ingest.", "ingest had written nothing to keep; a rerun starts it.",
        f"Resume with the same command: dataselect ingest -r {path}"]


# --- a rebuild next to an earlier mixture -----------------------------------------------------

def _fake_output(folder: Path, fingerprint: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"tool": "dataselect", "mixture": {"fingerprint": fingerprint}}))
    return folder


def test_a_different_earlier_mixture_is_kept_as_previous_and_the_same_one_replaced(tmp_path):
    final = _fake_output(tmp_path / "out", "aaaa")
    assert export._check_replaceable(final, False, "aaaa") is None  # the same mixture: replaced silently
    assert export._check_replaceable(final, False, "bbbb") == "aaaa"
    new = _fake_output(tmp_path / ".out.tmp-1", "bbbb")
    kept = export._move_into_place(new, final, keep_previous=True)
    assert kept == previous_output(final) == tmp_path / "out.previous"
    assert json.loads((kept / "manifest.json").read_text())["mixture"]["fingerprint"] == "aaaa"
    assert json.loads((final / "manifest.json").read_text())["mixture"]["fingerprint"] == "bbbb"
    newer = _fake_output(tmp_path / ".out.tmp-2", "cccc")  # one earlier mixture is kept: the last one
    export._move_into_place(newer, final, keep_previous=True)
    assert json.loads((kept / "manifest.json").read_text())["mixture"]["fingerprint"] == "bbbb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.previous"]


def test_a_previous_slot_holding_other_files_is_left_alone(tmp_path):
    final = _fake_output(tmp_path / "out", "aaaa")
    (tmp_path / "out.previous").mkdir()
    (tmp_path / "out.previous" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"out\.previous exists and is not a dataselect output"):
        export._check_replaceable(final, False, "bbbb")
    assert export._check_replaceable(final, False, "aaaa") is None  # nothing to keep: the slot is not needed


@pytest.mark.slow
def test_a_rebuild_with_other_settings_keeps_the_previous_mixture(tmp_path, caplog):
    path = _recipe(tmp_path)
    first = json.loads(_invoke("build", "-r", path, "--json").stdout)["export"]
    assert "previous" not in first
    with caplog.at_level(logging.INFO, logger="dataselect.export"):
        second = json.loads(_invoke("build", "-r", path, "--json", "--set", "output.provenance=false").stdout)["export"]
    out, previous = tmp_path / "out", tmp_path / "out.previous"
    assert second["fingerprint"] != first["fingerprint"]
    assert second["previous"] == {"path": str(previous), "fingerprint": first["fingerprint"]}
    assert json.loads((previous / "manifest.json").read_text())["mixture"]["fingerprint"] == first["fingerprint"]
    assert json.loads((out / "manifest.json").read_text())["mixture"]["fingerprint"] == second["fingerprint"]
    assert f"kept in {previous}" in caplog.text and "dataselect report" in caplog.text
    # Other files, the same mixture: replaced in place, and the earlier different one stays kept.
    third = json.loads(_invoke("build", "-r", path, "--json", "--set", "output.provenance=false",
                               "--set", "output.files=[parquet, jsonl]").stdout)["export"]
    assert third["fingerprint"] == second["fingerprint"] and "previous" not in third
    assert json.loads((previous / "manifest.json").read_text())["mixture"]["fingerprint"] == first["fingerprint"]
    assert (out / "data" / "train.jsonl").exists()
