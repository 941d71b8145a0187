"""fidelity: how well do the estimates track real fine-tunes? `dataselect verify`, per target.

    python -m benchmarks fidelity [--setting demo|gsm8k|t0] [--targets samsum,imdb,...]
        [--regime pretrained|scratch] [--subsets 30] [--repeats 3] [--marginals]

For each target: builds the setting (reusing ingest, meta-init and sketches from `--cache`, always
recomputing estimates and selection), fine-tunes the base model for real on `--subsets` of the
estimate stage's random subsets plus the selection and its complement (fine-tunes are kept in
`--cache`, keyed by everything they depend on, so targets of one pool share them), and reports:
the rank the default selector gives the target's own dataset (t0 in-pool), Spearman and Kendall
of the estimate against the true target loss, its median and mean squared relative errors beside
the constant-mean predictor's and the truth's own seed-to-seed noise (`--repeats` subsets
fine-tuned again), each similarity baseline's subset-score Spearman, and that of the subset's
rows alone (where subsets differ in size, their fine-tunes differ in steps); then the median over
targets. Every verified subset's estimate and true loss is kept, for the docs' scatter plot.

`--marginals` adds what the estimate misses, group by group: per group, the mean true loss of the
random subsets that hold it minus that of those that do not, beside the same difference of the
estimates; and, where subsets differ in rows, each predictor's partial Spearman with the truth
given the subset's rows. Validation data only: verify never reads a test split.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .common import (Results, Table, add_setting, build_recipe, fresh_estimates, regime_of, slug, target_label,
                     targets_of)

PREDICTORS = (("spearman", "estimate", ".3f"), ("gradient_similarity", "gradient similarity", ".3f"),
              ("representation_similarity", "representation similarity", ".3f"), ("dsir", "DSIR", ".3f"),
              ("rows_alone", "rows alone", ".3f"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting(parser)
    parser.add_argument("--subsets", type=int, default=30, help="random subsets to fine-tune for real, per target")
    parser.add_argument("--repeats", type=int, default=3, help="of those, how many to fine-tune again (truth noise)")
    parser.add_argument("--marginals", action="store_true", help="also: what the estimate misses, group by group")


def default_name(args: argparse.Namespace) -> str:
    return slug("fidelity", args.setting, args.model if args.model != "tiny" else None,
                regime_of(args.setting, args.regime),
                *[o.replace("=", "-") for o in args.overrides])


def run(args: argparse.Namespace) -> Results:
    from dataselect.verify import verify

    results, rows, subsets = Results(), [], []
    for target in targets_of(args):
        chosen, recipe = build_recipe(args, target)
        label = target_label(target, chosen.name)
        fresh_estimates(recipe)
        began = time.perf_counter()
        summary = verify(recipe, k_random=args.subsets, repeats=args.repeats, finetunes=args.cache / "finetunes")
        rows.append(fidelity_row(label, summary, own_rank(recipe, chosen.own_group)))
        verified = recipe.run.verification.results()
        subsets += [{"target": label, "subset": r["subset"], "estimate": r["estimate"], "true_loss": r["true_loss"]}
                    for r in verified.iter_rows(named=True)]
        print(f"{label}: {time.perf_counter() - began:.0f} s; {recipe.run.verification.report}", flush=True)
        if args.marginals:
            marginals(recipe, label, target or chosen.name, results)
            beyond_size(recipe, label, target or chosen.name, results)
    if len(rows) > 1:
        rows.append({"target": "median over targets",
                     **{key: float(np.median([r[key] for r in rows if r.get(key) is not None]))
                        for key in ("spearman", "kendall", "median_error", "constant_error", "truth_noise",
                                    *(k for k, _, _ in PREDICTORS[1:]))
                        if any(r.get(key) is not None for r in rows)}})
    results.add("fidelity", Table(
        "Spearman of each predictor with the true target validation loss after a real fine-tune of each "
        "verified subset; errors relative; own rank: where the default ranks the target's own dataset",
        [("target", "target", ""), ("own_rank", "own rank", ""), ("subsets", "subsets", ""),
         *[(k, label, spec) for k, label, spec in PREDICTORS[:1]], ("kendall", "Kendall", ".3f"),
         ("median_error", "median rel. error", ".3g"), ("constant_error", "constant-mean error", ".3g"),
         ("truth_noise", "truth noise", ".3g"), *PREDICTORS[1:]], rows))
    results.raw["subsets"] = subsets
    return results


def own_rank(recipe, group: str | None) -> str | None:
    """The rank the selection gave `group` (the target's own dataset), as 'r/n'."""
    if group is None:
        return None
    ranked = recipe.run.selection.read()
    return f"{dict(zip(ranked['group'], ranked['rank']))[group]}/{ranked.height}"


def fidelity_row(label: str, summary: dict, rank: str | None) -> dict:
    est, base = summary["estimate"], summary["baselines_spearman"]
    return {"target": label, "own_rank": rank, "subsets": summary["subsets"], "spearman": est["spearman"],
            "kendall": est["kendall"], "median_error": est["median_relative_error"],
            "constant_error": summary["constant_mean_loo"]["median_relative_error"],
            "truth_noise": summary["truth_noise"]["median_relative_difference"],
            **{k: base.get(k) for k, _, _ in PREDICTORS[1:4]}, "rows_alone": summary["rows_alone_spearman"]}


def partial_spearman(predicted: np.ndarray, truth: np.ndarray, given: np.ndarray) -> float:
    """Spearman's correlation of `predicted` with `truth` once both are freed of `given`'s ranks."""
    from dataselect.verify import spearman

    ab, ac, bc = spearman(predicted, truth), spearman(predicted, given), spearman(truth, given)
    return float((ab - ac * bc) / np.sqrt((1 - ac**2) * (1 - bc**2)))


def beyond_size(recipe, label: str, key: str, results: Results) -> None:
    """Per predictor, its partial Spearman with the true loss given each verified subset's rows."""
    from dataselect.estimate import group_sums, subset_losses
    from dataselect.verify import spearman

    verified = recipe.run.verification.results()
    members = recipe.run.verification.memberships().astype(np.float64)
    truth, rows = verified["true_loss"].to_numpy(), verified["examples"].to_numpy()
    if np.ptp(rows) == 0:
        return
    sums = group_sums(recipe, recipe.run.estimates)
    predictors = {"the estimate, one step": subset_losses(members, sums, 0.0, "steps"),
                  **{c.removesuffix("_score"): -verified[c].to_numpy() for c in verified.columns if c.endswith("_score")}}
    results.add(f"beyond_size:{key}", Table(
        f"{label}: partial Spearman with the true loss given the subset's rows (which alone score "
        f"{spearman(-rows.astype(float), truth):.2f}), over {len(truth)} verified subsets",
        [("predictor", "predictor", ""), ("partial", "partial Spearman", ".2f")],
        [{"predictor": name, "partial": partial_spearman(v, truth, rows)} for name, v in predictors.items()]))


def marginals(recipe, label: str, key: str, results: Results) -> None:
    """Per group, over the verified random subsets: the true loss with it minus without it, beside
    the same difference of the estimates, its own effect and its response tokens."""
    from dataselect.verify import spearman

    verified, members = recipe.run.verification.results(), recipe.run.verification.memberships()
    random = verified["subset"].str.starts_with("random").to_numpy()
    truth, estimate = verified["true_loss"].to_numpy()[random], verified["estimate"].to_numpy()[random]
    members = members[random].astype(bool)
    groups = recipe.run.estimates.read()[0]
    effects = recipe.run.estimates.group_gradients()
    own, tokens = dict(zip(effects["group"], effects["effect"])), dict(zip(effects["group"], effects["tokens"]))
    rows = []
    for j, group in enumerate(groups):
        held = members[:, j]
        if held.all() or not held.any():
            continue
        rows.append({"group": group, "true_gap": truth[held].mean() - truth[~held].mean(),
                     "estimate_gap": estimate[held].mean() - estimate[~held].mean(), "effect": own[group],
                     "tokens": tokens[group]})
    rows.sort(key=lambda r: r["true_gap"])
    true_gaps, est_gaps = np.array([r["true_gap"] for r in rows]), np.array([r["estimate_gap"] for r in rows])
    subset_tokens = members.astype(np.float64) @ np.array([tokens[g] for g in groups])
    results.add(f"marginals:{key}", Table(
        f"{label}, {random.sum()} random subsets: per group, the loss of the subsets with it minus without it. "
        f"Spearman over groups of the true and estimated differences {spearman(true_gaps, est_gaps):.2f}; over "
        f"subsets, of response tokens with the true loss {spearman(subset_tokens, truth):.2f} and with the "
        f"estimate {spearman(subset_tokens, estimate):.2f}",
        [("group", "group", ""), ("true_gap", "true loss with − without", "+.3f"),
         ("estimate_gap", "estimate with − without", "+.4f"), ("effect", "own effect", "+.3f"),
         ("tokens", "response tokens", ".0f")], rows))
