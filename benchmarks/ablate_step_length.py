"""Does a subset's step length carry information? The estimate with S's plain gradient step (as
SGD would take it; dataselect ≤ 0.1's estimate), scaled to the whole pool's length (AdamW, which
the fine-tunes use, takes steps of about the same length whatever the gradient's size), or scaled
by the root of its mean square over a batch, signal plus batch noise (as Adam's second moment
does, in one number for all coordinates: the default).

    python benchmarks/ablate_step_length.py [--targets samsum,xsum,...] [--regime pretrained|scratch]
        [--gsm8k] [--smollm2]

Reads the stored sketches and, per T0 target, the subsets `bench_fidelity.py` fine-tuned for real
(run it first); prints the Spearman correlation of each form with the true target loss, and
the rank each gives an in-pool target's own dataset. With
`--gsm8k`, also the ranking each form gives GSM8K's groups (from `bench_selection.py --setting
gsm8k`'s run, or `rank_groups.py --setting gsm8k`'s; `--regime` picks GSM8K's regime too, by
default scratch): whether every model-written source's correct solutions rank above its incorrect
ones; and, once `bench_fidelity.py --setting gsm8k` has run, each form's Spearman over its subsets.
With `--smollm2`, the rank each form gives samsum's own data among the T0 groups with
SmolLM2-135M-Instruct and LoRA (from `bench_selection.py --setting t0 --model smollm2 --targets
samsum`'s run). Validation data only.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from settings import CACHE, REGIMES, REGIME_HELP, T0_IN_POOL, T0_TRANSFER, regime_of, setting

from dataselect import run
from dataselect.estimate import GroupSums, group_sums
from dataselect.verify import spearman


def drops(membership: np.ndarray, sums: GroupSums) -> dict[str, np.ndarray]:
    """Per subset, the first-order drop of the target's loss under each form of the step."""
    plain = sums.per_token(membership)
    return {"plain gradient (SGD)": plain,
            "scaled to the pool's length": replace(sums, batch=math.inf).step_scales(membership) * plain,
            "signal plus batch noise (default)": sums.step_scales(membership) * plain}


def verified_spearman(recipe, sums: GroupSums) -> dict[str, float]:
    """Per form, Spearman(estimate, true target loss) over the run's verified subsets (each
    fine-tuned for the recipe's epochs, so its steps scale with its rows)."""
    results, members = recipe.run.verification.results(), recipe.run.verification.memberships().astype(np.float64)
    lengths = sums.training_lengths(members, "epochs")
    return {form: spearman(-lengths * drop, results["true_loss"].to_numpy()) for form, drop in drops(members, sums).items()}


def current_sums(recipe) -> tuple[list[str], GroupSums]:
    run(recipe, until="estimate")  # brings a folder built by older code up to date; a no-op otherwise
    return recipe.run.estimates.read()[0], group_sums(recipe, recipe.run.estimates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(T0_IN_POOL[:3] + T0_TRANSFER))
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--gsm8k", action="store_true")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    rhos: dict[str, dict[str, float]] = {}
    own: dict[str, dict[str, int]] = {}  # in-pool targets: the rank of the target's own dataset
    for target in args.targets.split(","):
        chosen = setting("t0", target=target, regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-seed0", "seed=0")
        if recipe.run.verification.results() is None:
            raise SystemExit(f"{target}: no verified subsets; run bench_fidelity.py --targets {target} "
                             f"--regime {regime_of('t0', args.regime)} first")
        names, sums = current_sums(recipe)
        for form, rho in verified_spearman(recipe, sums).items():
            rhos.setdefault(form, {})[target] = rho
        if chosen.own_group:
            for form, drop in drops(np.eye(len(names)), sums).items():
                order = [names[i] for i in np.argsort(-drop)]
                own.setdefault(form, {})[target] = order.index(chosen.own_group) + 1
    targets = args.targets.split(",")
    print("Spearman(estimate, true target loss) over each target's verified subsets\n\n| step | "
          + " | ".join(targets) + " | median |\n|---|" + "---|" * (len(targets) + 1))
    for form, by_target in rhos.items():
        print(f"| {form} | " + " | ".join(f"{by_target[t]:.3f}" for t in targets)
              + f" | {np.median(list(by_target.values())):.3f} |")
    if own:
        print("\nthe rank each form gives an in-pool target's own dataset among the groups\n\n| step | "
              + " | ".join(own[next(iter(own))]) + " |\n|---|" + "---|" * len(own[next(iter(own))]))
        for form, by_target in own.items():
            print(f"| {form} | " + " | ".join(str(r) for r in by_target.values()) + " |")
    if args.gsm8k:
        chosen = setting("gsm8k", regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-tiny")
        groups, sums = current_sums(recipe)
        for form, drop in drops(np.eye(len(groups)), sums).items():
            rank = {groups[i]: r + 1 for r, i in enumerate(np.argsort(-drop))}
            sources = sorted({g.split("/")[0] for g in groups if g.endswith("/True")})
            above = [s for s in sources if rank[f"{s}/True"] < rank[f"{s}/False"]]
            print(f"\n{chosen.name}, {form}: correct above incorrect for {len(above)} of {len(sources)} sources ("
                  + ", ".join(f"{s} {rank[f'{s}/True']} vs {rank[f'{s}/False']}" for s in sources) + ")")
        verified = chosen.load(args.cache / "runs" / f"{chosen.name}-seed0", "seed=0")
        if verified.run.verification.results() is not None:  # bench_fidelity.py --setting gsm8k ran
            by_form = verified_spearman(verified, current_sums(verified)[1])
            print(f"\n{chosen.name}, Spearman(estimate, true target loss) over its verified subsets: "
                  + ", ".join(f"{form} {rho:.3f}" for form, rho in by_form.items()))
    if args.smollm2:
        chosen = setting("t0", model="smollm2", target="samsum", cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-smollm2")
        groups, sums = current_sums(recipe)
        for form, drop in drops(np.eye(len(groups)), sums).items():
            order = [groups[i] for i in np.argsort(-drop)]
            print(f"\nt0 samsum, SmolLM2-135M-Instruct + LoRA, {form}: samsum ranked {order.index('t0/samsum') + 1} "
                  f"of {len(groups)}; first: {', '.join(order[:3])}")


if __name__ == "__main__":
    main()
