"""The selectors: every `select.method`, registered once with its scoring function and what it does.

The recipe validates `select.method` against these names, the CLI offers them as `--method`,
verify compares against the similarity baselines, and the benchmarks loop over them. This module
imports nothing, so the recipe can read it without loading torch; a selector's scoring function
(`module:function` in dataselect, taking the recipe and returning per-group scores and, for
`forward`, the chosen set) is imported when a selection runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["estimate", "baseline", "similarity"]


@dataclass(frozen=True)
class Selector:
    name: str
    about: str  # one line, for --help and the docs
    scorer: str  # "module:function" in dataselect
    kind: Kind  # estimate: GradEx's estimates; baseline: no data at all; similarity: the target-likeness baselines

    def score(self) -> Callable:
        """The scoring function: (recipe) -> (per-group scores, the forward set or None)."""
        module, function = self.scorer.split(":")
        return getattr(importlib.import_module(f"dataselect.{module}"), function)


_ALL = (
    Selector("group_effect", "each group's own first-order effect on the target loss (absolute: > 0 helps)",
             "select:by_group_effect", "estimate"),
    Selector("random_ensemble", "GradEx-RE: estimated loss over sampled subsets without the group minus with it",
             "select:by_random_ensemble", "estimate"),
    Selector("surrogate", "a linear model of the subset estimates; each group's coefficient, negated",
             "select:by_surrogate", "estimate"),
    Selector("forward", "GradEx-FS: forward stepwise selection on the estimates",
             "select:by_forward", "estimate"),
    Selector("all", "baseline: every group", "select:by_all", "baseline"),
    Selector("random", "baseline: random scores, so the keep-rules give the same budget",
             "select:by_random", "baseline"),
    Selector("gradient_similarity", "LESS-style cosine of each example's loss gradient to the target's",
             "select:by_gradient_similarity", "similarity"),
    Selector("representation_similarity", "cosine of each example's last hidden state to the target's mean",
             "select:by_representation_similarity", "similarity"),
    Selector("dsir", "DSIR-style hashed n-gram importance weights toward the target's text",
             "select:by_dsir", "similarity"),
)
SELECTORS: dict[str, Selector] = {s.name: s for s in _ALL}
METHOD_NAMES: tuple[str, ...] = tuple(SELECTORS)
KIND_LABELS: dict[Kind, str] = {"estimate": "from the estimates", "baseline": "baselines",
                                "similarity": "similarity baselines"}


def listing() -> str:
    """The names by kind, in a sentence: "from the estimates: group_effect, ...; baselines: ..."."""
    return "; ".join(f"{label}: {', '.join(n for n, s in SELECTORS.items() if s.kind == kind)}"
                     for kind, label in KIND_LABELS.items())
