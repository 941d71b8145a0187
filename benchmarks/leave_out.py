"""What dropping a group really does: all sources against all sources without it, fine-tuned for real.

    python benchmarks/leave_out.py --setting gsm8k --drop '*/False' --drop human/c2 --drop 'gpt*' --drop 'human/*'
        [--seeds 0,1,2] [--budget steps] [--targets samsum] [--regime pretrained]

The ground truth behind a keep rule. Each `--drop` is a glob over group names; its mixture is every
group but the matching ones. Each mixture is fine-tuned from the base for every seed (equal steps by
default: the smaller mixture gets more epochs, as in `bench_selection.py --budget steps`, whose
cached fine-tunes of all sources it shares) and scored on the target's validation and test splits.
Printed beside each: the dropped groups' score under the default selector (their own first-order
effect, with its 95% interval; for several groups, the effect of training on them together),
the change of the target's loss that the estimate predicts against all sources, and the change
the fine-tunes show, paired by seed (mean ± standard error over seeds). Selection reads
validation only; the test split is read here to report.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from pathlib import Path

import numpy as np
from bench_selection import _ms, evaluate_mixture, fresh_estimates, paired_change, source_rows
from settings import CACHE, REGIMES, REGIME_HELP, setting

from dataselect.estimate import GroupSums, group_sums, subset_losses


def dropped_score(effects, sums: GroupSums, dropped: list[str]) -> str:
    """The dropped groups' own effect per step, L⁰ − f̂(dropped) (with its interval for a single group)."""
    score = -float(subset_losses(effects["group"].is_in(dropped).to_numpy(), sums, 0.0, "steps")[0])
    if len(dropped) == 1:
        return f"{score:+.3e} ± {effects.filter(effects['group'] == dropped[0])['ci95'][0]:.1e}"
    return f"{score:+.3e}"


def estimated_change(effects, sums: GroupSums, kept: set[str], budget: str) -> float:
    """f̂(mixture) − f̂(all sources): the change of the target's loss the estimate predicts."""
    mixture = effects["group"].is_in(list(kept)).to_numpy()
    return float(np.diff(subset_losses(np.vstack([np.ones_like(mixture), mixture]), sums, 0.0, budget))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "gsm8k", "t0"], default="gsm8k")
    parser.add_argument("--targets", default="samsum", help="t0 target")
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--drop", action="append", required=True, metavar="GLOB",
                        help="groups to leave out of one mixture (repeat for more mixtures)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", choices=["epochs", "steps"], default="steps")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    start, seeds = time.perf_counter(), [int(s) for s in args.seeds.split(",")]
    print(f"command: python benchmarks/leave_out.py {' '.join(sys.argv[1:])}")
    chosen = setting(args.setting, target=args.targets, regime=args.regime, cache=args.cache)
    recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-tiny")
    fresh_estimates(recipe)
    sources, effects = source_rows(recipe), recipe.run.estimates.group_gradients()
    sums = group_sums(recipe, recipe.run.estimates)
    groups = set(sources["group"])
    finetunes = args.cache / "finetunes"
    base = evaluate_mixture(recipe, sources, groups, seeds, args.budget, finetunes)
    print(f"\n{chosen.name}, seeds {seeds}, {args.budget} as all sources get; Δ: the mixture's loss minus all "
          "sources', paired by seed, mean ± standard error (negative: dropping helped)\n\n"
          "| mixture | dropped | rows | dropped groups' score | estimated Δ | validation loss | Δ validation "
          "| test loss | Δ test |\n|---|---|---|---|---|---|---|---|---|")
    print(f"| all | 0 | {base['rows']} | — | — | {_ms(base['val'])} | — | {_ms(base['test'])} | — |",
          flush=True)
    for pattern in args.drop:
        dropped = sorted(g for g in groups if fnmatch.fnmatchcase(g, pattern))
        if not dropped or len(dropped) == len(groups):
            sys.exit(f"--drop {pattern!r} matches {len(dropped)} of the groups {sorted(groups)}")
        r = evaluate_mixture(recipe, sources, groups - set(dropped), seeds, args.budget, finetunes)
        print(f"| without {pattern} | {len(dropped)} | {r['rows']} | {dropped_score(effects, sums, dropped)} | "
              f"{estimated_change(effects, sums, groups - set(dropped), args.budget):+.4f} | "
              f"{_ms(r['val'])} | {paired_change(r['val'], base['val'])} | {_ms(r['test'])} | "
              f"{paired_change(r['test'], base['test'])} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
