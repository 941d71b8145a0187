"""A selector's ranking of every group of a setting that bench_selection.py has built.

    python benchmarks/rank_groups.py [--setting gsm8k|t0|demo] [--model tiny|smollm2] [--target samsum]
        [--method group_effect|random_ensemble|gradient_similarity|...] [--by-point]

Reads the estimates in `<cache>/runs/<name>-<model>` (run bench_selection.py with the same
arguments first; stages that older code wrote are brought up to date) and prints each group's score by `--method` (the recipe's selector by default)
with its 95% interval, best first (for group_effect, also the interval's two parts: over the
group's rows and over the target's validation rows). For GSM8K it
also says, per model-written source, whether its correct group outranks its incorrect one.
With `--by-point` (group_effect), each group's effect is split by the point of meta-init's path
its gradients come from, with the cosine there between the group's summed gradient and the
target's: the parts add up to the effect, so a group whose points disagree shows why its sum is
near 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from settings import CACHE, REGIMES, REGIME_HELP, setting

from dataselect import run
from dataselect.examples import response_tokens
from dataselect.sketch import point_blocks, stacked_sources, target_sketches
from dataselect.select import Inputs, score_groups
from dataselect.selectors import METHOD_NAMES

GSM8K_MODEL_SOURCES = ("gptj_finetuned", "gptj_verifier", "gpt3_finetuned", "gpt3_verifier")


def effects_by_point(recipe) -> dict[str, list[tuple[float, float]]]:
    """Per group, per point of the path: (its step scale times ⟨the target's per-token gradient,
    the group's summed gradient⟩ over the group's tokens, the cosine of the two), from the stored
    sketches; the first parts add up to the group's effect."""
    run_, points = recipe.run, len(recipe.sketch_path)
    examples = run_.ingested.examples()
    lengths = response_tokens(examples)
    ids, names, x, _ = stacked_sources(recipe, examples, run_.sketches)
    target_ids, target_x, _ = target_sketches(run_.sketches)
    target_tokens = sum(lengths[i] for i in target_ids)
    target = [t.astype(np.float64).sum(0) / target_tokens for t in point_blocks(target_x, points)]
    names, tokens = np.array(names), np.array([lengths[i] for i in ids], dtype=np.float64)
    scale = dict(run_.estimates.group_gradients().select("group", "scale").iter_rows())
    blocks, out = point_blocks(x, points), {}
    for group in sorted(set(names)):
        rows = names == group
        parts = []
        for block, t in zip(blocks, target):
            summed = block[rows].astype(np.float64).sum(0)
            cosine = float(summed @ t / max(np.linalg.norm(summed) * np.linalg.norm(t), 1e-300))
            parts.append((scale[group] * float(summed @ t) / max(tokens[rows].sum(), 1.0), cosine))
        out[group] = parts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "gsm8k", "t0"], default="gsm8k")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--target", default=None, help="t0 target")
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--method", choices=METHOD_NAMES, default=None, help="default: the recipe's")
    parser.add_argument("--by-point", action="store_true",
                        help="group_effect: each group's effect by point of the path")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    chosen = setting(args.setting, args.model, target=args.target, regime=args.regime, cache=args.cache)
    overrides = [f"select.method={args.method}"] if args.method else []
    recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-{args.model}", *overrides)
    run(recipe, until="estimate")  # brings a folder built by older code up to date; a no-op otherwise
    scores = score_groups(recipe, Inputs.of(recipe.run))[0].sort(["score", "group"], descending=[True, False], nulls_last=True)
    parts = {}  # group_effect's interval, split: the noise over the group's rows, and over the target's
    if recipe.select.method == "group_effect":
        effects = recipe.run.estimates.group_gradients()
        parts = {r["group"]: (r["ci95_examples"], r["ci95_target"]) for r in effects.iter_rows(named=True)}
    print(f"{recipe.select.method}\n\n| rank | group | score ± 95% |{' ± group rows | ± target rows |' if parts else ''}\n"
          f"|---|---|---|{'---|---|' if parts else ''}")
    rank = {}
    for i, row in enumerate(scores.iter_rows(named=True), start=1):
        rank[row["group"]] = i
        ci = "" if row["ci95"] is None else f" ± {row['ci95']:.1e}"
        split = f" {parts[row['group']][0]:.1e} | {parts[row['group']][1]:.1e} |" if parts else ""
        print(f"| {i} | {row['group']} | {row['score']:+.3e}{ci} |{split}")
    if args.by_point and recipe.select.method == "group_effect":
        by_point, path = effects_by_point(recipe), recipe.sketch_path
        print("\neach group's effect by the point of meta-init's path (cosine with the target's gradient "
              "there)\n\n| rank | group | effect | " + " | ".join(f"at {p}" for p in path)
              + " |\n|---|---|---|" + "---|" * len(path))
        for group, i in rank.items():
            cells = " | ".join(f"{v:+.4f} ({c:+.2f})" for v, c in by_point[group])
            print(f"| {i} | {group} | {sum(v for v, _ in by_point[group]):+.4f} | {cells} |")
    if args.setting == "gsm8k":
        print()
        for source in GSM8K_MODEL_SOURCES:
            right, wrong = rank[f"{source}/True"], rank[f"{source}/False"]
            print(f"{source}: correct group rank {right}, incorrect {wrong}: "
                  f"{'correct above incorrect' if right < wrong else 'INCORRECT ABOVE CORRECT'}")


if __name__ == "__main__":
    main()
