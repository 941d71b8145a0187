"""Stage 5, selection: score every group from the subset estimates, then apply the keep-rules.

Random ensemble: a group's score is how much lower the estimated target loss is over subsets
that contain it than over subsets that do not (positive = the group helps), with a 95%
confidence interval from the two sample means. The paper's T_i (mean estimate over subsets that
contain the group) is reported beside it as `mean_loss_with`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from .recipe import Recipe, Select


def random_ensemble_scores(subsets: np.ndarray, loss: np.ndarray, groups: list[str]) -> pl.DataFrame:
    rows = []
    for i, group in enumerate(groups):
        inside, outside = loss[subsets[:, i]], loss[~subsets[:, i]]
        if len(inside) < 2 or len(outside) < 2:
            rows.append({"group": group, "score": None, "ci95": None, "mean_loss_with": None,
                         "subsets_with": len(inside)})
            continue
        score = float(outside.mean() - inside.mean())
        se = math.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside))
        rows.append({"group": group, "score": score, "ci95": 1.96 * se, "mean_loss_with": float(inside.mean()),
                     "subsets_with": len(inside)})
    return pl.DataFrame(rows, schema={"group": pl.String, "score": pl.Float64, "ci95": pl.Float64,
                                      "mean_loss_with": pl.Float64, "subsets_with": pl.Int64})


def apply_keep_rules(groups: pl.DataFrame, rules: Select) -> pl.DataFrame:
    """Mark groups kept, best score first, with the reason for each decision.

    `groups` has columns group, score, examples. Rules: keep the top `keep_fraction` of groups,
    only those with score ≥ `min_score`, and stop before `max_examples` would be exceeded.
    """
    ranked = groups.sort(["score", "group"], descending=[True, False], nulls_last=True)
    n_keep = max(1, math.ceil(rules.keep_fraction * ranked.height))
    kept, reasons, total = [], [], 0
    for rank, row in enumerate(ranked.iter_rows(named=True), start=1):
        where = f"rank {rank}/{ranked.height}"
        if row["score"] is None:
            keep, why = False, "no score: the group was in too few or too many sampled subsets"
        elif rank > n_keep:
            keep, why = False, f"{where}, outside the top {rules.keep_fraction:.0%} of groups"
        elif rules.min_score is not None and row["score"] < rules.min_score:
            keep, why = False, f"{where}, score {row['score']:.4g} below min_score {rules.min_score}"
        elif rules.max_examples is not None and total + row["examples"] > rules.max_examples:
            keep, why = False, f"{where}, would exceed max_examples={rules.max_examples}"
        else:
            keep, why = True, f"{where}, within the top {rules.keep_fraction:.0%} by estimated target-loss reduction"
            total += row["examples"]
        kept.append(keep)
        reasons.append(why)
    return ranked.with_columns(pl.Series("selected", kept), pl.Series("reason", reasons),
                               pl.Series("rank", range(1, ranked.height + 1)))


def stage(recipe: Recipe, out: Path) -> dict:
    """Per-group scores joined with sizes, then the keep decision and its reason."""
    from .estimate import read_estimates
    from .sources import read_ingested

    groups, subsets, loss = read_estimates(recipe)
    assignments = pl.read_parquet(recipe.run_dir / "estimate" / "assignments.parquet")
    sizes = (read_ingested(recipe).select("id", "source", "n_tokens")
             .join(assignments, on="id", how="inner")
             .group_by("group").agg(pl.col("source").first(), examples=pl.len(), tokens=pl.col("n_tokens").sum()))
    scored = random_ensemble_scores(subsets, loss, groups).join(sizes, on="group", how="left")
    decided = apply_keep_rules(scored, recipe.select)
    decided.write_parquet(out / "groups.parquet")
    kept = decided.filter(pl.col("selected"))
    return {"method": recipe.select.method, "groups": decided.height, "groups_selected": kept.height,
            "examples_selected": int(kept["examples"].sum())}


def read_selection(recipe: Recipe) -> pl.DataFrame:
    return pl.read_parquet(recipe.run_dir / "select" / "groups.parquet")
