"""What the estimate misses, group by group: reads the real fine-tunes `bench_fidelity.py` made.

    python benchmarks/fidelity_marginals.py [--setting t0|gsm8k] [--targets xsum,samsum] [--regime pretrained]
        [--seed 0]

For each target, over the verified random subsets (each holds half the groups): per group, the mean
true target loss of the subsets that hold it minus that of the subsets that do not, beside the same
difference of the estimates, and its own effect and response tokens; then the Spearman
correlation of the two differences over the groups, and of a subset's total response tokens with
its true loss and with its estimate; then, where the subsets differ in rows (and so their
fine-tunes in steps), what each predictor knows beyond size: its partial Spearman correlation
with the true loss given the subset's rows, for the estimate of one step and for each similarity
baseline. Run bench_fidelity.py for the same setting and targets first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from settings import CACHE, REGIMES, REGIME_HELP, setting

from dataselect.estimate import group_sums, subset_losses
from dataselect.verify import spearman


def partial_spearman(predicted: np.ndarray, truth: np.ndarray, given: np.ndarray) -> float:
    """Spearman's correlation of `predicted` with `truth` once both are freed of `given`'s ranks."""
    ab, ac, bc = spearman(predicted, truth), spearman(predicted, given), spearman(truth, given)
    return float((ab - ac * bc) / np.sqrt((1 - ac**2) * (1 - bc**2)))


def beyond_size(recipe) -> None:
    """Per predictor, its partial Spearman with the true loss given each verified subset's rows."""
    results = recipe.run.verification.results()
    members = recipe.run.verification.memberships().astype(np.float64)
    truth, rows = results["true_loss"].to_numpy(), results["examples"].to_numpy()
    if np.ptp(rows) == 0:
        return
    sums = group_sums(recipe, recipe.run.estimates)
    predictors = {"the estimate, one step": subset_losses(members, sums, 0.0, "steps"),
                  **{c.removesuffix("_score"): -results[c].to_numpy() for c in results.columns if c.endswith("_score")}}
    print(f"\nBeyond size, over all {len(truth)} verified subsets: partial Spearman with the true loss given the "
          f"subset's rows (which alone score {spearman(-rows.astype(float), truth):.2f})\n\n| predictor | partial "
          "Spearman |\n|---|---|")
    for name, value in predictors.items():
        print(f"| {name} | {partial_spearman(value, truth, rows):.2f} |")


def marginals(recipe) -> None:
    """Print one target's per-group table and its three correlations."""
    results, members = recipe.run.verification.results(), recipe.run.verification.memberships()
    if results is None or members is None:
        raise SystemExit(f"{recipe.name}: no verified subsets; run bench_fidelity.py for this target first")
    random = results["subset"].str.starts_with("random").to_numpy()
    truth, estimate, members = results["true_loss"].to_numpy()[random], results["estimate"].to_numpy()[random], \
        members[random].astype(bool)
    groups = recipe.run.estimates.read()[0]
    effects = recipe.run.estimates.group_gradients()
    own, tokens = dict(zip(effects["group"], effects["effect"])), dict(zip(effects["group"], effects["tokens"]))
    rows = []
    for j, group in enumerate(groups):
        held = members[:, j]
        if held.all() or not held.any():
            continue
        rows.append((group, truth[held].mean() - truth[~held].mean(), estimate[held].mean() - estimate[~held].mean(),
                     own[group], tokens[group]))
    rows.sort(key=lambda r: r[1])
    print(f"\n{recipe.name}: {random.sum()} random subsets\n\n| group | true loss with − without | estimate with − "
          "without | own effect | response tokens |\n|---|---|---|---|---|")
    for group, true_gap, est_gap, effect, n in rows:
        print(f"| {group} | {true_gap:+.3f} | {est_gap:+.4f} | {effect:+.3f} | {n:.0f} |")
    subset_tokens = members.astype(np.float64) @ np.array([tokens[g] for g in groups])
    print(f"\nSpearman over groups, true against estimated difference: "
          f"{spearman(np.array([r[1] for r in rows]), np.array([r[2] for r in rows])):.2f}")
    print(f"Spearman over subsets, response tokens against the true loss: {spearman(subset_tokens, truth):.2f}, "
          f"against the estimate: {spearman(subset_tokens, estimate):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["t0", "gsm8k"], default="t0")
    parser.add_argument("--targets", default="xsum,samsum", help="t0 targets")
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    for target in args.targets.split(",") if args.setting == "t0" else [None]:
        chosen = setting(args.setting, target=target, regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-seed{args.seed}", f"seed={args.seed}")
        marginals(recipe)
        beyond_size(recipe)


if __name__ == "__main__":
    main()
