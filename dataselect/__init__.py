"""dataselect: choose a fine-tuning mixture from many sources by first-order estimates (GradEx).

    import dataselect
    recipe = dataselect.load_recipe("recipes/demo.yaml")
    summaries = dataselect.build(recipe)          # every stage, reusing finished ones
    print(summaries["export"]["path"])

Each stage is also a function `stage(recipe, out_dir)` in its own module: ingest, meta_init,
sketch, estimate, select, export; `dataselect.pipeline.run(recipe, until=...)` runs a prefix.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RecipeError
from .pipeline import STAGE_NAMES, run

if TYPE_CHECKING:
    from .recipe import Recipe, load_recipe

__all__ = ["Recipe", "RecipeError", "STAGE_NAMES", "build", "load_recipe", "run"]

# Loaded on first use: the recipe's pydantic models take a noticeable moment to build, and
# `dataselect --help` (which imports this package) needs none of them.
_LAZY = {"Recipe": "recipe", "load_recipe": "recipe", "push_to_hub": "push:push"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = _LAZY[name].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute or name)


def build(recipe: Recipe | str | Path, overrides: tuple[str, ...] = (), force: bool = False) -> dict[str, dict]:
    """Every stage, then the upload `output.push_to_hub` asks for: what `dataselect build` does.
    Returns each stage's summary (and the push's); empty on a non-zero rank under a launcher."""
    from .push import push
    from .recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    summaries = run(recipe, until="export", force=force)
    if summaries and recipe.output.push_to_hub:
        spec = recipe.output
        summaries["push"] = push(spec.path, spec.push_to_hub, private=spec.private)
    return summaries
