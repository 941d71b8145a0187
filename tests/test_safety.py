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
    for pattern in UNSAFE_PATTERNS:
        assert not re.search(pattern, source), pattern


UNSAFE_PATTERNS = (r"\b(import|from)\s+(c?[pP]ickle|dill|cloudpickle|joblib)\b", r"torch\.load\(",
                   r"allow_pickle\s*=\s*True", r"yaml\.unsafe_load", r"yaml\.load\((?![^)]*Loader\s*=)", r"Loader\s*=\s*yaml\.(Unsafe|Full)?Loader\b",
                   r"trust_remote_code\s*=\s*True", r"weights_only\s*=\s*False")


def test_the_source_grep_catches_each_unsafe_spelling():
    """Each line here must trip the grep above, so it cannot pass by missing a spelling."""
    unsafe = ["from pickle import loads", "import pickle", "import cPickle", "from dill import load",
              "yaml.load(text, Loader=yaml.Loader)", "yaml.load(text, Loader=yaml.FullLoader)", "yaml.unsafe_load(t)", "yaml.load(text)",
              "torch.load(path)", "np.load(p, allow_pickle=True)", "f(trust_remote_code=True)",
              "torch.load(p, weights_only=False)"]
    for line in unsafe:
        assert any(re.search(p, line) for p in UNSAFE_PATTERNS), line
    assert not any(re.search(p, "yaml.safe_load(text)") for p in UNSAFE_PATTERNS)


def test_a_finished_run_holds_only_safe_formats(demo_build):
    recipe, _, _ = demo_build
    files = [p for p in recipe.run_dir.rglob("*") if p.is_file()]
    files += [p for p in Path(recipe.output.path).rglob("*") if p.is_file()]
    unsafe = [p for p in files if p.suffix not in SAFE_SUFFIXES]
    assert not unsafe, unsafe
    for path in (p for p in files if p.suffix == ".npy"):
        np.load(path, allow_pickle=False, mmap_mode="r")  # raises on an object array


def test_recipes_are_read_with_a_safe_loader(tmp_path):
    """The payload sits under a valid key, so only the YAML loader can stop it: an unsafe loader
    would run it (creating the file) before validation sees anything."""
    from dataselect.recipe import RecipeError, load_recipe

    evil, pwned = tmp_path / "evil.yaml", tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {pwned}']"
    evil.write_text(DEMO.read_text().replace("name: demo", f"name: {payload}", 1))
    assert f"name: {payload}" in evil.read_text()
    try:
        load_recipe(evil)
    except RecipeError as e:
        assert "evil.yaml" in str(e) and "not valid YAML" in str(e)
    else:
        raise AssertionError("a python/object tag was accepted")
    assert not pwned.exists()
    assert not load_recipe(DEMO).model.trust_remote_code
