"""Safe by default: nothing pickled is written or read, recipes load with a safe YAML loader,
remote code stays off unless the recipe asks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .conftest import DEMO, ROOT

SAFE_SUFFIXES = {".json", ".npy", ".npz", ".safetensors", ".parquet", ".arrow", ".jsonl", ".faiss", ".md", ".txt",
                 ".key", ".png", ".html", ".jinja", ".lock", ""}


def test_package_source_never_unpickles_or_loads_yaml_unsafely():
    source = "\n".join(p.read_text() for p in (ROOT / "dataselect").glob("*.py"))
    for pattern in (r"\bimport pickle\b", r"torch\.load\(", r"allow_pickle\s*=\s*True", r"yaml\.unsafe_load",
                    r"trust_remote_code\s*=\s*True", r"weights_only\s*=\s*False"):
        assert not re.search(pattern, source), pattern


def test_a_finished_run_holds_only_safe_formats(demo_build):
    recipe, _, _ = demo_build
    files = [p for p in recipe.run_dir.rglob("*") if p.is_file()]
    files += [p for p in Path(recipe.output.path).rglob("*") if p.is_file()]
    unsafe = [p for p in files if p.suffix not in SAFE_SUFFIXES]
    assert not unsafe, unsafe
    for path in (p for p in files if p.suffix == ".npy"):
        np.load(path, allow_pickle=False, mmap_mode="r")  # raises on an object array


def test_recipes_are_read_with_a_safe_loader(tmp_path):
    from dataselect.recipe import RecipeError, load_recipe

    evil = tmp_path / "evil.yaml"
    evil.write_text(DEMO.read_text() + "\nextra: !!python/object/apply:os.system ['echo pwned']\n")
    try:
        load_recipe(evil)
    except RecipeError as e:
        assert "evil.yaml" in str(e)
    else:
        raise AssertionError("a python/object tag was accepted")
    assert not load_recipe(DEMO).model.trust_remote_code
