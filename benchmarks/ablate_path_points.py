"""Which points of meta-init's path carry the estimate? The default estimate (AdamW's step scale,
steps counted) recomputed from the stored sketches with only some of `sketch.path`'s points, each
kept at its learning-rate weight.

    python benchmarks/ablate_path_points.py [--targets samsum,xsum,...] [--regime pretrained|scratch]

Reads, per T0 target, the stored sketches and the subsets `bench_fidelity.py` fine-tuned for real
(run it first with the same targets and regime); prints, for every non-empty set of the path's
points, the Spearman correlation of the estimate with the true target loss over the verified
subsets, its median over targets, and the rank it gives an in-pool target's own dataset among the
groups. No new gradient is taken: a point's block of a sketch is that point's gradient, so
leaving a point out is leaving its block out. Validation data only.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np
from settings import CACHE, REGIMES, REGIME_HELP, T0_IN_POOL, T0_TRANSFER, regime_of, setting


def points_table(recipe) -> dict[tuple[float, ...], tuple[float, list[str]]]:
    """Per non-empty set of the path's points: Spearman over the verified subsets, and the groups
    ordered by their own effect (best first). The pool is read as `estimate.load_pool` reads it,
    with only the chosen points' blocks of each sketch."""
    from dataselect.estimate import pool_of
    from dataselect.examples import response_tokens
    from dataselect.sketch import point_blocks, stacked_sources, target_sketches
    from dataselect.verify import spearman

    run = recipe.run
    examples = run.ingested.examples()
    lengths = response_tokens(examples)
    ids, names, x, _ = stacked_sources(recipe, examples, run.sketches)
    target_ids, target_x, target_loss = target_sketches(run.sketches)
    path = recipe.sketch_path
    blocks, target_blocks = point_blocks(x, len(path)), point_blocks(target_x, len(path))
    tokens = np.array([lengths[i] for i in ids], dtype=np.float64)
    target_tokens = np.array([lengths[i] for i in target_ids], dtype=np.float64)
    truth = run.verification.results()["true_loss"].to_numpy()
    members = run.verification.memberships().astype(np.float64)
    out = {}
    for k in range(1, len(path) + 1):
        for kept in itertools.combinations(range(len(path)), k):
            pool = pool_of(ids, names, np.hstack([blocks[p] for p in kept]), tokens,
                           np.hstack([target_blocks[p] for p in kept]), target_tokens, target_loss,
                           recipe.meta_init.batch_size)
            order = pool.group_effects().sort("effect", descending=True)["group"].to_list()
            out[tuple(path[p] for p in kept)] = (spearman(pool.evaluate(members, budget="epochs"), truth), order)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(T0_IN_POOL[:3] + T0_TRANSFER))
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    targets = args.targets.split(",")
    cells: dict[tuple[float, ...], dict[str, str]] = {}
    rhos: dict[tuple[float, ...], list[float]] = {}
    for target in targets:
        chosen = setting("t0", target=target, regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-seed0", "seed=0")
        if recipe.run.verification.results() is None:
            raise SystemExit(f"{target}: no verified subsets; run bench_fidelity.py --targets {target} "
                             f"--regime {regime_of('t0', args.regime)} first")
        for points, (rho, order) in points_table(recipe).items():
            own = f" #{order.index(chosen.own_group) + 1}" if chosen.own_group else ""
            cells.setdefault(points, {})[target] = f"{rho:.3f}{own}"
            rhos.setdefault(points, []).append(rho)
    print(f"t0, regime {regime_of('t0', args.regime)}: Spearman(estimate, true target loss) over each target's "
          "verified subsets, with only some points of the path (#: the rank of an in-pool target's own "
          "dataset)\n\n| points | " + " | ".join(targets) + " | median |\n|---|" + "---|" * (len(targets) + 1))
    for points, by_target in cells.items():
        print(f"| {', '.join(f'{p:g}' for p in points)} | " + " | ".join(by_target[t] for t in targets)
              + f" | {np.median(rhos[points]):.3f} |")


if __name__ == "__main__":
    main()
