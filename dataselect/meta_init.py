"""Stage 2, meta-initialization: fine-tune the base model once on all sources (θ*).

The training itself is `trainer.train`, the one path every real fine-tune takes; this stage
chooses its rows (every source's usable rows, each capped at `max_examples_per_source`) and keeps
the trainable parameters at the points of `sketch.path`, whose weights (the learning rate spent
near each point) the sketches and estimates use.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from .artifacts import Ingested
from .examples import token_rows, usable
from .recipe import MetaInit, Recipe
from .tokens import load_tokenizer
from .trainer import Rows, lr_factor, train


def meta_train_rows(recipe: Recipe, rows_by_source: dict[str, Rows]) -> Rows:
    """All sources together, each capped at max_examples_per_source by a seeded sample."""
    cap = recipe.meta_init.max_examples_per_source
    rng = random.Random(recipe.seed)
    chosen = []
    for name in sorted(rows_by_source):
        rows = rows_by_source[name]
        chosen += rng.sample(rows, cap) if cap and len(rows) > cap else rows
    return chosen


def path_weights(spec: MetaInit, steps: int, fractions: Sequence[float]) -> list[float]:
    """How far meta-init moved near each point of its path: the learning rate summed over the steps
    closer to it than to any other point (TracIn's η × steps per checkpoint). A fine-tune's
    first-order change of a loss is the sum over points of this weight times the gradients' inner
    product there."""
    at = [round(f * steps) for f in fractions]
    edges = [0] + [(a + b) // 2 for a, b in zip(at, at[1:])] + [steps]
    return [spec.lr * sum(lr_factor(spec, steps, s) for s in range(lo, hi)) for lo, hi in zip(edges, edges[1:])]


def stage(recipe: Recipe, out: Path, ingested: Ingested) -> dict:
    """θ* from every source's usable rows, and the snapshots at the points of `sketch.path`."""
    examples = ingested.examples()
    by_source = {s.name: token_rows(usable(examples, "source", s.name)) for s in recipe.sources}
    rows = meta_train_rows(recipe, by_source)
    return train(recipe, ingested, rows, out, load_tokenizer(recipe, ingested).pad_token_id, recipe.sketch_path)
