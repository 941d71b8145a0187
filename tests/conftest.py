"""Shared fixtures: the demo recipe pointed at temporary folders, and one finished demo build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dataselect import build, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
SHARED = ROOT.parent / "shared" / "data"


# The demo cut to 60 rows per source (a seeded sample): for tests that build their own run and
# check bookkeeping, not the demo's figures.
SMALL = tuple(f"sources.{i}.max_rows=60" for i in range(6))


TINY = {"hidden_size": 16, "layers": 1, "heads": 2, "vocab_size": 128}  # a model for bookkeeping tests


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_small_recipe(tmp: Path, name: str, sources: list[dict], target: Path, target_format: dict,
                       max_length: int) -> Path:
    """A recipe file over local files with a tiny model and small sketches: for tests of reading
    and accounting for rows, which need a pipeline that runs in seconds."""
    raw = {
        "name": name, "workdir": str(tmp / "run"), "model": {"tiny": TINY},
        "meta_init": {"epochs": 1, "batch_size": 8},
        "sources": sources,
        "target": {"name": "t", "dataset": str(target), "format": target_format, "validation": {"split": "train"}},
        "sketch": {"dim": 8, "max_length": max_length, "batch_size": 8, "chunk_size": 64},
        "estimate": {"subsets": 10},
        "output": {"path": str(tmp / "out"), "files": ["jsonl"]},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def pytest_itemcollected(item: pytest.Item) -> None:
    """Every test that needs the session's demo build is `slow`: the build takes minutes on a CPU,
    so `pytest -m "not slow"` (the inner loop) leaves them, and the build, out. Under `make
    test`'s workers they all run on one, so the demo is built once. Other slow tests carry
    the mark themselves."""
    if "demo_build" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group("demo_build"))


def demo_recipe(tmp: Path, *overrides: str):
    return load_recipe(DEMO, [f"workdir={tmp / 'run'}", f"output.path={tmp / 'out'}", *overrides])


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The demo recipe built once for the whole session: (recipe, summaries, manifest)."""
    tmp = tmp_path_factory.mktemp("demo")
    recipe = demo_recipe(tmp)
    summaries = build(recipe)
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    return recipe, summaries, manifest


@pytest.fixture
def demo_copy(demo_build, tmp_path):
    """A private copy of the session's finished demo run and output: a test that reruns stages
    with other settings changes only its copy, so a failing test cannot leave the shared build in
    another state for the tests after it."""
    recipe, summaries, manifest = demo_build
    shutil.copytree(recipe.run_dir, tmp_path / "run")
    shutil.copytree(recipe.output.path, tmp_path / "out")
    copy = recipe.model_copy(update={"workdir": tmp_path / "run",
                                     "output": recipe.output.model_copy(update={"path": tmp_path / "out"})})
    return copy, summaries, manifest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny model and tokenizer built the way `model.tiny` builds them, untrained."""
    from dataselect.demo import materialize
    from dataselect.trainer import build_tiny_model
    from dataselect.tokens import train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("tiny")
    rows = [json.loads(line) for line in materialize("lexicon", tmp, 0).read_text().splitlines()]
    tokenizer = train_tiny_tokenizer((r[k] for r in rows for k in ("question", "answer")), 128)
    recipe = demo_recipe(tmp)
    return build_tiny_model(recipe, tokenizer).eval(), tokenizer, rows
