"""Shared fixtures: the demo recipe pointed at temporary folders, and one finished demo build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dataselect import build, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
SHARED = ROOT.parent / "shared" / "data"


# The demo cut to 60 rows per source (a seeded sample): for tests that build their own run and
# check bookkeeping, not the demo's figures.
SMALL = tuple(f"sources.{i}.max_rows=60" for i in range(6))


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
    from dataselect.meta_init import build_tiny_model
    from dataselect.tokens import train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("tiny")
    rows = [json.loads(line) for line in materialize("lexicon", tmp, 0).read_text().splitlines()]
    tokenizer = train_tiny_tokenizer((r[k] for r in rows for k in ("question", "answer")), 128)
    recipe = demo_recipe(tmp)
    return build_tiny_model(recipe, tokenizer).eval(), tokenizer, rows
