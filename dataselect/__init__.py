"""dataselect: choose a fine-tuning mixture from many sources by first-order estimates (GradEx).

    import dataselect
    recipe = dataselect.load_recipe("recipes/demo.yaml")
    summaries = dataselect.build(recipe)          # every stage, reusing finished ones
    print(summaries["export"]["path"])

Each stage is also a function `stage(recipe, out_dir)` in its own module: ingest, meta_init,
sketch, estimate, select, export; `dataselect.pipeline.run(recipe, until=...)` runs a prefix.
"""

from __future__ import annotations

from pathlib import Path

from .pipeline import STAGE_NAMES, run
from .push import push as push_to_hub
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "STAGE_NAMES", "build", "load_recipe", "run"]


def build(recipe: Recipe | str | Path, overrides: tuple[str, ...] = (), force: bool = False) -> dict[str, dict]:
    """Every stage, then the upload `output.push_to_hub` asks for: what `dataselect build` does.
    Returns each stage's summary (and the push's); empty on a non-zero rank under a launcher."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    summaries = run(recipe, until="export", force=force)
    if summaries and recipe.output.push_to_hub:
        spec = recipe.output
        summaries["push"] = push_to_hub(spec.path, spec.push_to_hub, private=spec.private)
    return summaries
