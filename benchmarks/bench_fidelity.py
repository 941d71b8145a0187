"""How well do the estimates track real fine-tunes? `dataselect verify`, per setting and target.

    python benchmarks/bench_fidelity.py [--setting demo|gsm8k|t0] [--targets samsum,imdb,...]
                                        [--regime pretrained|scratch] [--subsets 30] [--repeats 3]

For each target: builds the setting (reusing ingest, meta-init and sketches from `--cache`, always
recomputing estimates and selection), fine-tunes the base model for real on `--subsets` of the
estimate stage's random subsets plus the selection and its complement (fine-tunes are kept in
`--cache`, keyed by everything they depend on, so targets of one pool share them), and prints:
the rank the default selector gives the target's own dataset (t0 in-pool), Spearman and Kendall
of the estimate against the true target loss, its median and mean squared relative errors
beside the constant-mean predictor's and the truth's own seed-to-seed noise (`--repeats`
subsets fine-tuned again), each similarity baseline's subset-score Spearman, and that of the
subset's rows alone (where subsets differ in size, their fine-tunes differ in steps). The last line
is the median over targets. Per-target detail: <cache>/runs/<name>/run/verify/report.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from settings import CACHE, REGIMES, REGIME_HELP, T0_IN_POOL, T0_TRANSFER, regime_of, setting

LATER_STAGES = ("estimate", "select", "export", "verify")


def own_rank(recipe, group: str | None) -> str:
    """The rank the selection gave `group` (the target's own dataset), as 'r/n'."""
    if group is None:
        return "—"
    ranked = recipe.run.selection.read()
    ranks = dict(zip(ranked["group"], ranked["rank"]))
    return f"{ranks[group]}/{ranked.height}"


def fidelity_row(label: str, summary: dict, rank: str) -> dict:
    est, base = summary["estimate"], summary["baselines_spearman"]
    return {"target": label, "own rank": rank, "subsets": summary["subsets"],
            "spearman": est["spearman"], "kendall": est["kendall"],
            "median rel. err": est["median_relative_error"], "MSRE": est["mean_squared_relative_error"],
            "constant-mean err": summary["constant_mean_loo"]["median_relative_error"],
            "truth noise": summary["truth_noise"]["median_relative_difference"],
            "grad. sim.": base["gradient_similarity"], "repr. sim.": base["representation_similarity"],
            "dsir": base["dsir"], "rows alone": summary["rows_alone_spearman"]}


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(v if isinstance(v, str) else "—" if v is None else f"{v:.3g}" if isinstance(v, float)
                                else str(v) for v in row.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "gsm8k", "t0"], default="demo")
    parser.add_argument("--targets", default=",".join(T0_IN_POOL + T0_TRANSFER), help="t0 targets")
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from dataselect import run
    from dataselect.verify import verify

    print(f"command: python benchmarks/bench_fidelity.py {' '.join(sys.argv[1:])}")
    targets = args.targets.split(",") if args.setting == "t0" else [None]
    rows, start = [], time.perf_counter()
    for target in targets:
        chosen = setting(args.setting, target=target, regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-seed{args.seed}", f"seed={args.seed}")
        run(recipe, until="sketch")
        for stage in LATER_STAGES:  # cheap, and what this benchmark measures: never reused
            shutil.rmtree(recipe.run.stage_dir(stage), ignore_errors=True)
        began = time.perf_counter()
        summary = verify(recipe, k_random=args.subsets, repeats=args.repeats, finetunes=args.cache / "finetunes")
        label = target or args.setting
        if target:
            label += " (in-pool)" if target in T0_IN_POOL else " (transfer)"
        rows.append(fidelity_row(label, summary, own_rank(recipe, chosen.own_group)))
        print(f"{label}: {time.perf_counter() - began:.0f} s; {recipe.run.verification.report}", flush=True)
    print(f"\nsetting {args.setting}, regime {regime_of(args.setting, args.regime) if args.setting != 'demo' else '—'}, seed {args.seed}: "
          f"Spearman of each predictor with the true target loss after a real fine-tune; errors relative\n")
    if len(rows) > 1:
        numeric = pl.DataFrame([{k: v for k, v in r.items() if isinstance(v, float)} for r in rows])
        rows.append({"target": "median over targets", "own rank": "", "subsets": "",
                     **{c: float(np.median(numeric[c].drop_nulls())) for c in numeric.columns}})
    print_table(rows)
    print(f"\n{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
