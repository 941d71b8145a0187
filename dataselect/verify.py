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

Writes runs/<name>/verify/ (a quick look: verify-quick/): results.parquet, memberships.npy (each
subset's groups, in the estimate stage's group order), summary.json, report.md and scatter.png.

The summary ends in a verdict in words (`verdict`), with thresholds stated where they are used:
the estimates rank the subsets like real fine-tunes when their Spearman correlation with the truth
is unlikely under a random ranking (one-sided p < 0.05: an exact permutation test up to 8 subsets,
the normal approximation above) and above every similarity baseline's and the subsets' sizes
alone; beside it, the truth's own noise against the spread of the true losses, and, for a quick
look (`QUICK`: fewer subsets, one repeat, fine-tunes stopped half-way), that it is noisier. Before
the fine-tunes start, `announce` is told what they cost: how many, of how many steps, as a
multiple of meta-init's fine-tune of the pool and in seconds at its pace.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from .artifacts import FineTune, Verification
from .estimate import load_pool
from .trainer import Rows, finetune_and_score, finetune_folder, training_steps
from .examples import token_rows, usable
from .pipeline import run
from .progress import progress
from .report import plot_verify
from .recipe import Recipe
from .select import Inputs, score_groups
from .selectors import SELECTORS

log = logging.getLogger(__name__)

# A first look (`dataselect verify --quick`): the estimate stage's first 2 random subsets plus the
# selection and its complement, 1 repeat for the truth's noise, every fine-tune stopped at half its
# steps (on its full learning-rate schedule; a later full verify continues those fine-tunes).
QUICK = {"k_random": 2, "repeats": 1, "until": 0.5}
FULL = {"k_random": 8, "repeats": 3, "until": 1.0}  # `dataselect verify`'s defaults
SIGNIFICANCE = 0.05  # one-sided, against a random ranking of the subsets
SIZES = "the subsets' sizes alone"  # the rival that ranks by rows (more rows, more steps)


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


def spearman_p_value(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float | None]:
    """(one-sided p of a Spearman this high under a random ranking, the least Spearman with p below
    SIGNIFICANCE): exact over every permutation up to 8 subsets, the normal approximation
    (ρ·√(n−1)) above, where the least Spearman is None."""
    n = len(truth)
    rho = spearman(estimate, truth)
    if not np.isfinite(rho):
        return math.nan, None
    if n > 8:
        return 0.5 * math.erfc(rho * math.sqrt(n - 1) / math.sqrt(2)), None
    a, b = _ranks(estimate), _ranks(truth)
    a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    rhos = (a[np.array(list(itertools.permutations(range(n))))] * b).mean(1)
    p = float(np.mean(rhos >= rho - 1e-9))
    levels = np.unique(np.round(rhos, 9))
    significant = [r for r in levels if np.mean(rhos >= r - 1e-9) < SIGNIFICANCE]
    return p, float(min(significant)) if significant else None


def verdict(summary: dict, estimate: np.ndarray, truth: np.ndarray, until: float = 1.0) -> dict:
    """The verification in words: `level` agree (the estimates rank the subsets better than
    chance, one-sided p < SIGNIFICANCE, and better than every similarity baseline and the subsets'
    sizes alone), partly (a positive Spearman that misses one of those), disagree (Spearman ≤ 0)
    or unknown (the truths do not differ); then the truth's own noise against the spread between
    subsets, and how much less a short look can say."""
    n, rho = summary["subsets"], summary["estimate"]["spearman"]
    p, least = spearman_p_value(estimate, truth)
    rivals = {name: v for name, v in summary["baselines_spearman"].items() if np.isfinite(v)}
    if summary["rows_alone_spearman"] is not None:
        rivals[SIZES] = summary["rows_alone_spearman"]
    best = max(rivals.items(), key=lambda kv: kv[1]) if rivals else None
    tested = f"Spearman {rho:.2f} (p = {p:.3f} that a random ranking does as well)" if np.isfinite(rho) else ""
    if not np.isfinite(rho):
        level, text = "unknown", f"Cannot judge the estimates on these {n} subsets: their true losses do not differ."
    elif rho <= 0:
        level, text = "disagree", f"The estimates do not rank these {n} subsets like real fine-tunes: {tested}."
    else:
        misses = []
        if not p < SIGNIFICANCE:
            misses.append(f"p is not below {SIGNIFICANCE:g}, so a random ranking could have done this well")
        misses += [f"{name} {'rank' if name == SIZES else 'ranks'} them as well ({v:.2f})"
                   for name, v in rivals.items() if v >= rho]
        if misses:
            level, text = "partly", (f"The estimates rank these {n} subsets only partly like real fine-tunes: {tested}; "
                                     + "; ".join(misses) + ".")
        else:
            above = (f", above every similarity baseline and the subsets' sizes alone (best: {best[0]} {best[1]:.2f})"
                     if best else "")
            level, text = "agree", f"The estimates rank these {n} subsets like real fine-tunes: {tested}{above}."
    if level != "agree" and n <= 8 and np.isfinite(rho):
        text += (f" With {n} subsets, p < {SIGNIFICANCE:g} needs a Spearman of at least {least:.2f}." if least
                 else f" With {n} subsets no ranking can reach p < {SIGNIFICANCE:g}: verify more of them.")
    noise = summary["truth_noise"]["median_relative_difference"]
    spread = _median_pairwise_difference(truth)
    repeats = summary["truth_noise"]["repeats"]
    if noise is not None and np.isfinite(spread):
        text += (f" The truth's own noise: a fine-tune of the same rows with another seed lands {noise:.1%} away "
                 f"(median of {repeats}), against {spread:.1%} between subsets")
        text += ("; comparable, so no ranking of these subsets can be firm." if noise >= spread / 2 else ".")
    if until < 1:
        text += (f" A quick look: each fine-tune stopped at {until:.0%} of its steps, {n} subsets, {repeats} "
                 f"repeat{'' if repeats == 1 else 's'}: noisier than a full verify; run one before relying on it.")
    return {"level": level, "text": text, "p_value": p, "significance": SIGNIFICANCE,
            "least_significant_spearman": least, "truth_spread": spread}


def _median_pairwise_difference(truth: np.ndarray) -> float:
    """The median relative difference between two subsets' true losses (to their mean)."""
    i, j = np.triu_indices(len(truth), 1)
    return float(np.median(np.abs(truth[i] - truth[j]) / ((truth[i] + truth[j]) / 2))) if len(i) else math.nan


def cost(recipe: Recipe, parts: list[Rows], repeats: int, until: float, finetunes: Path) -> dict:
    """What verify's fine-tunes will cost, said before they start: how many, their steps (those
    already kept in `finetunes` cost nothing), as a multiple of meta-init's fine-tune of the
    pool, and in seconds at meta-init's recorded pace (training only; scoring each adds to it)."""
    again = recipe.model_copy(update={"seed": recipe.seed + 1})
    jobs = [(recipe, rows) for rows in parts] + [(again, rows) for rows in parts[:repeats]]
    steps, kept = [], 0
    for trained, rows in jobs:
        total = training_steps(trained.meta_init, len(rows))
        folder = FineTune(finetune_folder(trained, rows, finetunes))
        if (folder.theta if until >= 1 else folder.snapshot(until, total)).exists():
            kept += 1
        else:
            steps.append(total if until >= 1 else max(1, round(until * total)))
    meta = recipe.run.record("meta_init") or {}
    pool_steps, seconds = meta.get("summary", {}).get("steps"), meta.get("seconds")
    multiple = sum(steps) / pool_steps if pool_steps else None
    estimated = multiple * seconds if multiple is not None and seconds else None
    text = (f"verify: {len(jobs)} fine-tunes ({len(parts)} subsets, {min(repeats, len(parts))} again with the next "
            f"seed), each {'to the end' if until >= 1 else f'stopped at {until:.0%} of its steps'}: "
            f"{sum(steps):,} steps to train")
    if kept:
        text += f" ({kept} already kept in {finetunes}, reused)"
    if multiple is not None:
        text += f", {multiple:.2f}× meta-init's fine-tune of the pool ({pool_steps:,} steps"
        text += f" in {_duration(seconds)}), so about {_duration(estimated)} of training" if estimated else ")"
    text += ", plus scoring each on the validation split."
    return {"fine_tunes": len(jobs), "kept": kept, "steps": sum(steps), "until": until,
            "meta_init_steps": pool_steps, "multiple_of_meta_init": multiple, "estimated_seconds": estimated,
            "text": text}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} minutes" if seconds < 7200 else f"{seconds / 3600:.1f} hours"


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


def truth_noise(recipe: Recipe, truth: np.ndarray, parts: list, finetunes: Path, until: float = 1.0) -> dict:
    """Fine-tune the first subsets again with the next seed: how far two real fine-tunes of the
    same data land apart, the floor under any estimate's error."""
    again = recipe.model_copy(update={"seed": recipe.seed + 1})
    differences = []
    for rows, first in zip(parts, truth):
        second = finetune_and_score(again, rows, finetunes, until=until)["validation"]["loss"]
        differences.append(abs(second - first) / first)
    return {"repeats": len(differences), "seed": again.seed,
            "median_relative_difference": float(np.median(differences)) if differences else None,
            "relative_differences": differences}


def quick_folder(recipe: Recipe) -> Verification:
    """Where a quick look is written, beside (not over) a full verify's folder."""
    return Verification(recipe.run.stage_dir("verify-quick"))


def verify(recipe: Recipe, k_random: int = 8, repeats: int = 3, out: Path | None = None,
           finetunes: Path | None = None, force: bool = False, until: float = 1.0,
           announce: Callable[[str], None] | None = None) -> dict:
    """`finetunes`: where real fine-tunes are kept and looked up (default: the run's, which the
    confirm stage shares); recipes that share a base model and training rows (targets of one
    pool) share them there. `force` reruns the stages up to the selection (the fine-tunes stay
    cached). `until` < 1 stops every fine-tune at that share of its steps (a quick look);
    `announce` (default: the log) is told the cost before the fine-tunes start."""
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
    group_column = pl.col("id").replace_strict(group_of_id)
    parts = [token_rows(sources.filter(group_column.is_in([g for g, m in zip(groups, member) if m])))
             for member in memberships]
    planned = cost(recipe, parts, repeats, until, finetunes)
    (announce or log.info)(planned.pop("text"))
    truth = [finetune_and_score(recipe, rows, finetunes, until=until)["validation"]
             for rows in progress(iterable=parts, desc="verify fine-tunes", unit="subset")]
    accuracy = {"true_exact_match": [t["exact_match"] for t in truth]} if recipe.target.answer else {}
    truth = np.array([t["loss"] for t in truth])
    noise = truth_noise(recipe, truth[:repeats], parts[:repeats], finetunes, until)
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
        "truth_noise": noise, "until": until, "cost": planned,
    }
    summary["verdict"] = verdict(summary, estimate, truth, until)
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
    lines = ["# dataselect verify", "", summary["verdict"]["text"], "",
             "| subset | groups | estimate | true loss |" + (" exact match |" if em else ""),
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
