"""What each selector keeps at a fixed budget, and what the estimate says of those mixtures.

    python benchmarks/budget_sets.py [--targets samsum,rotten_tomatoes,...] [--keep-fraction 0.5]
        [--methods group_effect,gradient_similarity,forward,random_ensemble]

Reads the T0 builds that bench_selection.py made in `<cache>/runs` (run it first). Per target,
each method keeps its top `--keep-fraction` of the groups (`min_score: null`), as
`bench_selection.py --set select.keep_fraction=... --set select.min_score=null` does; this prints
f̂ of each kept set read as one mixture at equal steps (`estimate.subset_losses`, relative to the
base loss: lower is better), the groups where the first two methods differ, and how each group's
own AdamW step scale c_g, which `group_effect` ranks by, goes with its tokens per row.
No fine-tune runs; the real losses of these mixtures are bench_selection.py's.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import polars as pl
from settings import CACHE, T0_IN_POOL, T0_TRANSFER, setting

from dataselect import run
from dataselect.estimate import group_sums, subset_losses


def kept_groups(recipe, method: str) -> set[str]:
    chosen = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": method})})
    run(chosen, until="select")
    return set(chosen.run.selection.read().filter(pl.col("selected"))["group"])


def scale_by_length(recipe) -> tuple[float, pl.DataFrame]:
    """Correlation of log c_g with log tokens per row over the groups, and the groups by c_g."""
    groups = recipe.run.estimates.group_gradients().select(
        "group", "scale", tokens_per_row=pl.col("tokens") / pl.col("count"))
    corr = np.corrcoef(np.log(groups["scale"]), np.log(groups["tokens_per_row"]))[0, 1]
    return float(corr), groups.sort("scale", descending=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(T0_IN_POOL + T0_TRANSFER))
    parser.add_argument("--keep-fraction", type=float, default=0.5)
    parser.add_argument("--methods", default="group_effect,gradient_similarity,forward,random_ensemble")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    methods = args.methods.split(",")
    for target in args.targets.split(","):
        chosen = setting("t0", "tiny", target=target, cache=CACHE)
        recipe = chosen.load(CACHE / "runs" / f"{chosen.name}-tiny", f"select.keep_fraction={args.keep_fraction}",
                             "select.min_score=null")
        names = recipe.run.estimates.group_gradients()["group"].to_list()
        sums = group_sums(recipe, recipe.run.estimates)
        kept = {m: kept_groups(recipe, m) for m in methods}
        print(f"\n{target}\n\n| method | groups | f̂ at equal steps, minus the base loss |\n|---|---|---|")
        for m in methods:
            membership = np.array([g in kept[m] for g in names])
            print(f"| {m} | {membership.sum()} | {subset_losses(membership, sums, 0.0, 'steps')[0]:+.4f} |")
        for m in methods:
            print(f"{m} keeps: " + ", ".join(sorted(g.split("/")[-1] for g in kept[m])))
        if len(methods) > 1:
            a, b = methods[:2]
            print(f"only {a}: " + ", ".join(sorted(kept[a] - kept[b])) + f"\nonly {b}: "
                  + ", ".join(sorted(kept[b] - kept[a])))
    corr, by_scale = scale_by_length(recipe)  # c_g depends on the pool, not the target
    print(f"\nover {target}'s pool, correlation of log c_g with log tokens per row: {corr:.2f}; largest and "
          "smallest c_g:")
    for row in (*by_scale.head(3).iter_rows(named=True), *by_scale.tail(3).iter_rows(named=True)):
        print(f"  {row['group']}: c_g {row['scale']:.2f}, {row['tokens_per_row']:.1f} tokens per row")


if __name__ == "__main__":
    main()
