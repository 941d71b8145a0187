"""Verification: how far to trust the estimates, measured against real fine-tunes.

For k subsets of groups — some sampled at random, plus the selector's choice and its complement —
fine-tune the base model for real (meta-init's settings, on the subset's rows only, so a subset
with fewer rows takes fewer steps, as the estimate expects) and measure the target's validation
token cross-entropy. Report, per subset, the estimate and the truth, and
overall the rank correlations (Spearman, Kendall), R², median and mean squared relative error:
of the raw estimates, of the estimates mapped to the truth's scale by a log-affine fit
(leave-one-out, so no subset grades itself), of a constant-mean predictor, and the rank
correlations of the similarity baselines' subset scores and of the subset's rows alone (how much
of the ranking its size explains); beside them the truth's own noise: a
few subsets fine-tuned again with the next seed (no estimator can be closer to one fine-tune than
a second fine-tune of the same data is).

Writes runs/<name>/verify/: results.parquet, memberships.npy (each subset's groups, in the
estimate stage's group order), summary.json, report.md and scatter.png.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from .artifacts import Verification
from .estimate import load_pool
from .trainer import finetune_and_score
from .examples import token_rows, usable
from .pipeline import run
from .progress import progress
from .report import plot_verify
from .recipe import Recipe
from .select import Inputs, score_groups
from .selectors import SELECTORS


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b."""
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    upper = np.triu_indices(len(a), 1)
    concordance = (da * db)[upper].sum()
    return float(concordance / math.sqrt((da[upper] != 0).sum() * (db[upper] != 0).sum()))


def r_squared(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())


def median_relative_error(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.median(np.abs(predicted - truth) / np.abs(truth)))


def leave_one_out_calibrated(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each subset's estimate mapped to the truth's scale by log(truth) ≈ a + b·estimate, fitted
    on the other subsets. The estimate moves θ* a little; a real fine-tune from the base model
    moves far, and its loss spreads over orders of magnitude, which a log scale follows."""
    out = np.empty(len(truth))
    for i in range(len(truth)):
        keep = np.arange(len(truth)) != i
        b, a = np.polyfit(estimate[keep], np.log(truth[keep]), 1)
        out[i] = np.exp(a + b * estimate[i])
    return out


def leave_one_out_mean(truth: np.ndarray) -> np.ndarray:
    return (truth.sum() - truth) / (len(truth) - 1)


def mean_squared_relative_error(truth: np.ndarray, predicted: np.ndarray) -> float:
    """The paper's error metric: mean of ((estimate − truth) / truth)²."""
    return float(np.mean(((predicted - truth) / truth) ** 2))


def quality(truth: np.ndarray, predicted: np.ndarray) -> dict:
    return {"spearman": spearman(predicted, truth), "kendall": kendall(predicted, truth),
            "r2": r_squared(truth, predicted), "median_relative_error": median_relative_error(truth, predicted),
            "mean_squared_relative_error": mean_squared_relative_error(truth, predicted)}


def choose_subsets(recipe: Recipe, groups: list[str], k_random: int) -> list[tuple[str, np.ndarray]]:
    """The estimate stage's first k sampled subsets, then the selected groups and their complement;
    a subset already on the list is not fine-tuned or counted twice."""
    sampled = recipe.run.estimates.read()[1][:k_random]
    chosen = [(f"random {i}", row) for i, row in enumerate(sampled)]
    selected = set(recipe.run.selection.read().filter(pl.col("selected"))["group"])
    member = np.array([g in selected for g in groups])
    for label, row in ((f"selected by {recipe.select.method}", member), ("not selected", ~member)):
        if row.any() and not any(np.array_equal(row, other) for _, other in chosen):
            chosen.append((label, row))
    return chosen


def baseline_subset_scores(recipe: Recipe, groups: list[str], memberships: np.ndarray) -> dict[str, np.ndarray]:
    """Each similarity baseline's score of a subset: its groups' scores averaged by examples."""
    sizes = dict(recipe.run.estimates.assignments().group_by("group").len().iter_rows())
    weight = np.array([sizes[g] for g in groups], dtype=float)
    out = {}
    for method in (name for name, selector in SELECTORS.items() if selector.kind == "similarity"):
        other = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": method})})
        frame, _ = score_groups(other, Inputs.of(recipe.run))
        score = dict(zip(frame["group"], frame["score"]))
        per_group = np.array([score[g] for g in groups])
        out[method] = (memberships * weight * per_group).sum(1) / (memberships * weight).sum(1)
    return out


def truth_noise(recipe: Recipe, truth: np.ndarray, parts: list, finetunes: Path) -> dict:
    """Fine-tune the first subsets again with the next seed: how far two real fine-tunes of the
    same data land apart, the floor under any estimate's error."""
    again = recipe.model_copy(update={"seed": recipe.seed + 1})
    differences = []
    for rows, first in zip(parts, truth):
        second = finetune_and_score(again, rows, finetunes)["validation"]["loss"]
        differences.append(abs(second - first) / first)
    return {"repeats": len(differences), "seed": again.seed,
            "median_relative_difference": float(np.median(differences)) if differences else None,
            "relative_differences": differences}


def verify(recipe: Recipe, k_random: int = 8, repeats: int = 3, out: Path | None = None,
           finetunes: Path | None = None, force: bool = False) -> dict:
    """`finetunes`: where real fine-tunes are kept and looked up (default: the run's, which the
    confirm stage shares); recipes that share a base model and training rows (targets of one
    pool) share them there. `force`
    reruns the stages up to the selection (the fine-tunes stay cached)."""
    run(recipe, until="select", force=force)
    folder = Verification(out) if out else recipe.run.verification
    folder.folder.mkdir(parents=True, exist_ok=True)
    finetunes = finetunes or recipe.run.finetunes
    pool = load_pool(recipe, recipe.run.ingested, recipe.run.sketches)
    ids, groups = pool.ids, pool.groups
    chosen = choose_subsets(recipe, groups, k_random)
    memberships = np.stack([m for _, m in chosen])
    estimate = pool.evaluate(memberships, budget="epochs")  # as each subset is fine-tuned below
    examples = recipe.run.ingested.examples()
    sources = pl.concat([usable(examples, "source", s.name) for s in recipe.sources])
    group_of_id = dict(zip(ids, pool.names))
    parts, truth = [], []
    for member in progress(iterable=memberships, desc="verify fine-tunes", unit="subset"):
        kept = [g for g, m in zip(groups, member) if m]
        parts.append(token_rows(sources.filter(pl.col("id").replace_strict(group_of_id).is_in(kept))))
        truth.append(finetune_and_score(recipe, parts[-1], finetunes)["validation"])
    accuracy = {"true_exact_match": [t["exact_match"] for t in truth]} if recipe.target.answer else {}
    truth = np.array([t["loss"] for t in truth])
    noise = truth_noise(recipe, truth[:repeats], parts[:repeats], finetunes)
    fitted = leave_one_out_calibrated(estimate, truth)
    baselines = baseline_subset_scores(recipe, groups, memberships)
    results = pl.DataFrame({
        "subset": [label for label, _ in chosen], "groups": [int(m.sum()) for m in memberships],
        "examples": [len(p) for p in parts],
        "estimate": estimate, "estimate_calibrated_loo": fitted, "true_loss": truth, **accuracy,
        **{f"{k}_score": v for k, v in baselines.items()},
    })
    folder.write_results(results, memberships)
    summary = {
        "subsets": len(chosen), "method": recipe.select.method,
        "estimate": quality(truth, estimate), "estimate_calibrated_loo": quality(truth, fitted),
        "constant_mean_loo": {"median_relative_error": median_relative_error(truth, leave_one_out_mean(truth)),
                              "mean_squared_relative_error": mean_squared_relative_error(
                                  truth, leave_one_out_mean(truth)),
                              "r2": r_squared(truth, leave_one_out_mean(truth))},
        "baselines_spearman": {k: spearman(-v, truth) for k, v in baselines.items()},
        "rows_alone_spearman": _rows_alone(results["examples"].to_numpy(), truth),
        **({"exact_match_spearman": _accuracy_spearman(estimate, baselines, accuracy["true_exact_match"])}
           if accuracy else {}),
        "truth_noise": noise,
    }
    folder.write_summary(summary)
    folder.scatter.write_bytes(plot_verify(results, f"Spearman {summary['estimate']['spearman']:.2f}, "
                                                     f"{len(results)} subsets"))
    folder.report.write_text(_report(results, summary))
    return summary


def _rows_alone(examples: np.ndarray, truth: np.ndarray) -> float | None:
    """Spearman of "more rows, lower loss" with the truth; None when every subset is as large."""
    return spearman(-examples.astype(float), truth) if np.ptp(examples) else None


def _accuracy_spearman(estimate: np.ndarray, baselines: dict[str, np.ndarray], accuracy: list[float]) -> dict | None:
    """How each predictor ranks the subsets' exact match (a lower estimated loss predicts more);
    None when every fine-tune scored the same, which nothing can rank."""
    acc = np.array(accuracy)
    if np.ptp(acc) == 0:
        return None
    return {"estimate": spearman(-estimate, acc), **{k: spearman(v, acc) for k, v in baselines.items()}}


def _report(results: pl.DataFrame, summary: dict) -> str:
    em = "true_exact_match" in results.columns
    lines = ["# dataselect verify", "", "| subset | groups | estimate | true loss |" + (" exact match |" if em else ""),
             "|---|---|---|---|" + ("---|" if em else "")]
    lines += [f"| {r['subset']} | {r['groups']} | {r['estimate']:.4f} | {r['true_loss']:.4f} |"
              + (f" {r['true_exact_match']:.3f} |" if em else "") for r in results.iter_rows(named=True)]
    lines += ["", "| predictor | Spearman | Kendall | R² | median relative error | mean squared relative error |",
              "|---|---|---|---|---|---|"]
    for name in ("estimate", "estimate_calibrated_loo"):
        q = summary[name]
        lines.append(f"| {name} | {q['spearman']:.3f} | {q['kendall']:.3f} | {q['r2']:.3f} | "
                     f"{q['median_relative_error']:.4f} | {q['mean_squared_relative_error']:.2e} |")
    c = summary["constant_mean_loo"]
    lines.append(f"| constant mean (leave-one-out) | — | — | {c['r2']:.3f} | {c['median_relative_error']:.4f} | "
                 f"{c['mean_squared_relative_error']:.2e} |")
    for k, v in summary["baselines_spearman"].items():
        lines.append(f"| {k} (subset score) | {v:.3f} | | | | |")
    if summary["rows_alone_spearman"] is not None:
        lines.append(f"| the subset's rows alone | {summary['rows_alone_spearman']:.3f} | | | | |")
    if em and summary["exact_match_spearman"] is None:
        lines += ["", f"Every fine-tune's exact match was {results['true_exact_match'][0]:.3f}: nothing to rank."]
    elif em:
        lines += ["", "Spearman with the true exact match: " + ", ".join(
            f"{k} {v:.3f}" for k, v in summary["exact_match_spearman"].items()) + "."]
    n = summary["truth_noise"]
    if n["repeats"]:
        lines += ["", f"Truth's own noise: {n['repeats']} subsets fine-tuned again with seed {n['seed']} land a median "
                  f"{n['median_relative_difference']:.2%} from the first fine-tune."]
    lines.append("")
    return "\n".join(lines)
