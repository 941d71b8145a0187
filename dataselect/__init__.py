"""dataselect: choose a fine-tuning mixture from many sources by first-order estimates (GradEx).

    import dataselect
    recipe = dataselect.load_recipe("recipes/demo.yaml")
    summaries = dataselect.build(recipe)          # every stage, reusing finished ones
    print(summaries["export"]["path"])

Each stage is also a function `stage(recipe, out_dir)` in its own module: sources, model,
sketch, estimate, select, export; `dataselect.pipeline.run(recipe, until=...)` runs a prefix.
"""

from __future__ import annotations

from pathlib import Path

from .pipeline import STAGE_NAMES, run
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "STAGE_NAMES", "build", "load_recipe", "run"]


def build(recipe: Recipe | str | Path, overrides: tuple[str, ...] = (), force: bool = False) -> dict[str, dict]:
    """Run the whole pipeline for a recipe (object or YAML path); returns each stage's summary."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run(recipe, until="export", force=force)
