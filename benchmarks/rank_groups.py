"""The random ensemble's ranking of every group of a setting that bench_selection.py has built.

    python benchmarks/rank_groups.py [--setting gsm8k|t0|demo] [--model tiny|smollm2] [--target samsum]

Reads the estimates in `<cache>/runs/<name>-<model>` (run bench_selection.py with the same
arguments first) and prints each group's score (the estimated reduction of the target's
validation loss when the group is in a subset) with its 95% interval, best first. For GSM8K it
also says, per model-written source, whether its correct group outranks its incorrect one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from settings import CACHE, setting

from dataselect.estimate import read_estimates
from dataselect.select import random_ensemble_scores

GSM8K_MODEL_SOURCES = ("gptj_finetuned", "gptj_verifier", "gpt3_finetuned", "gpt3_verifier")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "gsm8k", "t0"], default="gsm8k")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--target", default=None, help="t0 target")
    parser.add_argument("--regime", choices=["pretrained", "scratch"], default="pretrained")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    chosen = setting(args.setting, args.model, target=args.target, regime=args.regime, cache=args.cache)
    recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-{args.model}")
    groups, subsets, loss = read_estimates(recipe)
    scores = random_ensemble_scores(subsets, loss, groups).sort(["score", "group"], descending=[True, False])
    print("| rank | group | score ± 95% |\n|---|---|---|")
    rank = {}
    for i, row in enumerate(scores.iter_rows(named=True), start=1):
        rank[row["group"]] = i
        print(f"| {i} | {row['group']} | {row['score']:+.3e} ± {row['ci95']:.1e} |")
    if args.setting == "gsm8k":
        print()
        for source in GSM8K_MODEL_SOURCES:
            right, wrong = rank[f"{source}/True"], rank[f"{source}/False"]
            print(f"{source}: correct group rank {right}, incorrect {wrong}: "
                  f"{'correct above incorrect' if right < wrong else 'INCORRECT ABOVE CORRECT'}")


if __name__ == "__main__":
    main()
