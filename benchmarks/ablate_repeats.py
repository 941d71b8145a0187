"""Would repeating the best groups beat all sources at equal steps? (T0, tiny pretrained model)

A keep rule can only drop groups; this tries the other lever, mixing weights. Each group j gets a
whole number of passes r_j, chosen greedily by a saturating-returns model of repetition: the
(r+1)-th pass over j is worth a_j·(e^{−r/e0} − e^{−(r+1)/e0}) per token, a_j being the group's
own first-order effect (`group_effect`'s score) and e0 the passes after which repetition stops
paying. Passes are added while the mixture stays within all sources' tokens; groups with a_j ≤ 0
get none. The mixture is then fine-tuned for as many steps as all sources get (3 seeds) and
compared with `all` from bench_selection.py (the same fine-tune cache).

    python benchmarks/ablate_repeats.py --targets samsum,imdb --e0 1
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import polars as pl

from settings import CACHE, T0_IN_POOL, T0_TRANSFER, setting


def passes(effects: pl.DataFrame, budget: int, e0: float) -> dict[str, int]:
    """Passes per group, greedily by marginal worth per token, within `budget` tokens (+2%)."""
    worth, tokens = dict(zip(effects["group"], effects["effect"])), dict(zip(effects["group"], effects["tokens"]))
    counts, used = dict.fromkeys(worth, 0), 0
    while True:
        gains = {g: a * (math.exp(-counts[g] / e0) - math.exp(-(counts[g] + 1) / e0))
                 for g, a in worth.items() if a > 0 and used + tokens[g] <= 1.02 * budget}
        if not gains:
            return counts
        best = max(gains, key=gains.get)
        counts[best] += 1
        used += tokens[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(T0_IN_POOL + T0_TRANSFER))
    parser.add_argument("--e0", type=float, default=1.0)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from dataselect import run
    from dataselect.evaluate import finetune_and_score
    from dataselect.examples import token_rows

    start = time.perf_counter()
    print("| target | groups with passes | rows (all sources) | most passes | all: test loss | repeats: test loss |\n"
          "|---|---|---|---|---|---|")
    for target in args.targets.split(","):
        chosen = setting("t0", "tiny", target=target)
        recipe = chosen.load(CACHE / "runs" / f"{chosen.name}-tiny")
        run(recipe, until="estimate")
        examples = recipe.run.ingested.examples()
        sources = (examples.filter((pl.col("role") == "source") & (pl.col("status") == "ok")).drop("group")
                   .join(recipe.run.estimates.assignments(), on="id"))
        effects = recipe.run.estimates.group_gradients()
        counts = passes(effects, int(effects["tokens"].sum()), args.e0)
        mixtures = {"all": token_rows(sources),
                    "repeats": token_rows(pl.concat([sources.filter(pl.col("group") == g)
                                                     for g, r in sorted(counts.items()) for _ in range(r)]))}
        losses = {}
        for name, rows in mixtures.items():
            epochs = recipe.meta_init.epochs * len(sources) / len(rows)  # as many steps as all sources
            losses[name] = [finetune_and_score(recipe.model_copy(update={
                "seed": int(seed), "meta_init": recipe.meta_init.model_copy(update={"epochs": epochs})}),
                rows, CACHE / "finetunes", ("test",), exact_on=())["test"]["loss"] for seed in args.seeds.split(",")]
        top = ", ".join(f"{g.split('/')[-1]} ×{r}" for r, g in sorted(((r, g) for g, r in counts.items()), reverse=True)[:3])
        print(f"| {target} | {sum(r > 0 for r in counts.values())}/{len(counts)} | {len(mixtures['repeats'])} "
              f"({len(sources)}) | {top} | " + " | ".join(f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in losses.values())
              + " |", flush=True)
    print(f"\ne0 = {args.e0}; {time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
