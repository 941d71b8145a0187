"""Verification: how far to trust the estimates, measured against real fine-tunes.

For k subsets of groups — some sampled at random, plus the selector's choice and its complement —
fine-tune the base model for real (meta-init's settings, on the subset's rows only) and measure
the target's validation token cross-entropy. Report, per subset, the estimate and the truth, and
overall the rank correlations (Spearman, Kendall), R² and median relative error: of the raw
estimates, of the estimates mapped to the truth's scale by a log-affine fit (leave-one-out, so no
subset grades itself), of a constant-mean predictor, and the rank correlations of the similarity
baselines' subset scores. Three more checks say what the numbers can mean:

- the truth's own noise: a few subsets fine-tuned again with the next seed (no estimator can be
  closer to one fine-tune than a second fine-tune of the same data is);
- the first-order check: on the trained subsets' steps, F⁰ + ĝ·ŵ against F measured at θ* + Pŵ,
  beside the zeroth-order control F⁰;
- the step length: how far the real fine-tunes land from θ* against the estimator's ‖Pŵ‖, and
  the `estimate.l2` (which sets that length) that ranks the verified subsets best.

Writes runs/<name>/verify/: results.parquet, summary.json, report.md and scatter.png.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .recipe import Recipe


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


def quality(truth: np.ndarray, predicted: np.ndarray) -> dict:
    return {"spearman": spearman(predicted, truth), "kendall": kendall(predicted, truth),
            "r2": r_squared(truth, predicted), "median_relative_error": median_relative_error(truth, predicted)}


def choose_subsets(recipe: Recipe, groups: list[str], k_random: int) -> list[tuple[str, np.ndarray]]:
    """The estimate stage's first k sampled subsets, then the selected groups and their complement;
    a subset already on the list is not fine-tuned or counted twice."""
    from .select import read_selection

    sampled = np.load(recipe.run_dir / "estimate" / "subsets.npy")[:k_random]
    chosen = [(f"random {i}", row) for i, row in enumerate(sampled)]
    selected = set(read_selection(recipe).filter(pl.col("selected"))["group"])
    member = np.array([g in selected for g in groups])
    for label, row in ((f"selected by {recipe.select.method}", member), ("not selected", ~member)):
        if row.any() and not any(np.array_equal(row, other) for _, other in chosen):
            chosen.append((label, row))
    return chosen


def finetune_folder(recipe: Recipe, groups: list[str], member: np.ndarray, out: Path) -> Path:
    """Where the fine-tune of a subset is kept: named by its groups, meta-init's settings and the seed."""
    kept = "\n".join(sorted(g for g, m in zip(groups, member) if m))
    key = hashlib.sha256((kept + recipe.fingerprint("meta_init", "seed")).encode())
    return out / "finetunes" / key.hexdigest()[:12]


def true_metrics(recipe: Recipe, rows: list[tuple[list[int], int]], folder: Path) -> dict[str, float]:
    """Fine-tune the base model on `rows` with meta-init's settings; its target validation loss,
    and exact match of greedy generations when the target defines an answer."""
    from .model import exact_match, load_theta_star, load_tokenizer, mean_token_loss, meta_init
    from .sources import read_ingested, token_rows, usable

    tokenizer = load_tokenizer(recipe)
    theta = folder / "theta.safetensors"
    if not theta.exists():  # a finished fine-tune is reused when verify runs again
        folder.mkdir(parents=True, exist_ok=True)
        meta_init(recipe, rows, folder, tokenizer.pad_token_id)
    model = load_theta_star(recipe, theta)
    validation = usable(read_ingested(recipe), "validation")
    target = token_rows(validation)
    out = {"loss": mean_token_loss(model, target, recipe.sketch.batch_size, tokenizer.pad_token_id)}
    if recipe.target.answer:
        out["exact_match"] = exact_match(model, tokenizer, target, validation["response"].to_list(),
                                         recipe.target.answer, recipe.sketch.batch_size)
    return out


def first_order_errors(recipe: Recipe, steps: np.ndarray, x: np.ndarray, f0: np.ndarray,
                       rows: list[tuple[list[int], int]]) -> list[dict]:
    """Per step: mean squared relative error of F⁰ + ĝ·ŵ and of F⁰ against F measured at θ* + Pŵ."""
    from .estimate import set_step
    from .model import load_tokenizer, pad_batch
    from .sketch import output_function, sketch_space

    model, modules, projector = sketch_space(recipe)
    originals = {n: m.weight.detach().clone() for n, m in modules.items()}
    pad = load_tokenizer(recipe).pad_token_id
    out = []
    for w in steps:
        set_step(modules, projector, originals, torch.from_numpy(w))
        moved = []
        with torch.no_grad():
            for i in range(0, len(rows), recipe.sketch.batch_size):
                b = pad_batch(rows[i : i + recipe.sketch.batch_size], pad)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                moved.append(output_function(logits, b["input_ids"], b["target_mask"]).numpy())
        f_moved = np.concatenate(moved)
        linear = f0 + x @ w
        scale = np.maximum(np.abs(f_moved), np.abs(f0))
        out.append({"first_order_error": float(np.mean(((linear - f_moved) / scale) ** 2)),
                    "zeroth_order_error": float(np.mean(((f0 - f_moved) / scale) ** 2)),
                    "mean_abs_change_of_f": float(np.mean(np.abs(f_moved - f0)))})
    return out


def baseline_subset_scores(recipe: Recipe, groups: list[str], memberships: np.ndarray) -> dict[str, np.ndarray]:
    """Each similarity baseline's score of a subset: its groups' scores averaged by examples."""
    from .select import score_groups

    sizes = dict(pl.read_parquet(recipe.run_dir / "estimate" / "assignments.parquet").group_by("group").len().iter_rows())
    weight = np.array([sizes[g] for g in groups], dtype=float)
    out = {}
    for method in ("gradient_similarity", "representation_similarity", "dsir"):
        other = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": method})})
        frame, _ = score_groups(other)
        score = dict(zip(frame["group"], frame["score"]))
        per_group = np.array([score[g] for g in groups])
        out[method] = (memberships * weight * per_group).sum(1) / (memberships * weight).sum(1)
    return out


def calibrate_l2(evaluate_with_l2, truth: np.ndarray, l2s: np.ndarray) -> dict:
    """The λ (`estimate.l2`) whose estimates rank the verified subsets best (ties: smaller
    calibrated error). λ sets how far the linearised fine-tune moves: the step's radius."""
    rows = []
    for l2 in l2s:
        est, step = evaluate_with_l2(float(l2))
        fitted = leave_one_out_calibrated(est, truth)
        rows.append((spearman(est, truth), -median_relative_error(truth, fitted), float(l2), step))
    best = max(rows)
    return {"l2": best[2], "spearman": best[0], "median_relative_error_calibrated": -best[1],
            "step_norm_median": best[3],
            "tried": [{"l2": l2, "spearman": sp, "median_relative_error_calibrated": -e, "step_norm_median": step}
                      for sp, e, l2, step in rows]}


def truth_noise(recipe: Recipe, truth: np.ndarray, parts: list, folders: list[Path]) -> dict:
    """Fine-tune the first subsets again with the next seed: how far two real fine-tunes of the
    same data land apart, the floor under any estimate's error."""
    again = recipe.model_copy(update={"seed": recipe.seed + 1})
    differences = []
    for rows, folder, first in zip(parts, folders, truth):
        second = true_metrics(again, rows, folder.with_name(folder.name + f"-seed{again.seed}"))["loss"]
        differences.append(abs(second - first) / first)
    return {"repeats": len(differences), "seed": again.seed,
            "median_relative_difference": float(np.median(differences)) if differences else None,
            "relative_differences": differences}


def verify(recipe: Recipe, k_random: int = 8, repeats: int = 3, out: Path | None = None) -> dict:
    from .estimate import load_pool, step_norms
    from .model import progress
    from .pipeline import run
    from .sources import read_ingested, token_rows, usable

    run(recipe, until="select")
    out = out or recipe.run_dir / "verify"
    out.mkdir(parents=True, exist_ok=True)
    pool = load_pool(recipe)
    ids, groups = pool.ids, pool.groups
    chosen = choose_subsets(recipe, groups, k_random)
    memberships = np.stack([m for _, m in chosen])
    est = pool.evaluate(memberships)
    examples = read_ingested(recipe)
    sources = pl.concat([usable(examples, "source", s.name) for s in recipe.sources])
    group_of_id = dict(zip(ids, pool.names))
    parts, folders, truth = [], [], []
    for member in progress(iterable=memberships, desc="verify fine-tunes", unit="subset"):
        kept = [g for g, m in zip(groups, member) if m]
        parts.append(token_rows(sources.filter(pl.col("id").replace_strict(group_of_id).is_in(kept))))
        folders.append(finetune_folder(recipe, groups, member, out))
        truth.append(true_metrics(recipe, parts[-1], folders[-1]))
    accuracy = {"true_exact_match": [t["exact_match"] for t in truth]} if recipe.target.answer else {}
    truth = np.array([t["loss"] for t in truth])
    noise = truth_noise(recipe, truth[:repeats], parts[:repeats], folders[:repeats])

    def with_l2(l2: float) -> tuple[np.ndarray, float]:
        e = pool.evaluate(memberships, l2=l2)
        return e.loss, float(np.median(np.linalg.norm(e.steps, axis=1)) * pool.step_scale())

    calibration = calibrate_l2(with_l2, truth, recipe.estimate.l2 * np.geomspace(1e-2, 1e2, 9))
    fitted = leave_one_out_calibrated(est.loss, truth)
    baselines = baseline_subset_scores(recipe, groups, memberships)
    sample = np.random.default_rng(recipe.seed).choice(len(ids), size=min(200, len(ids)), replace=False)
    lookup = dict(zip(sources["id"], token_rows(sources)))
    first_order = first_order_errors(recipe, est.steps, pool.x[sample], pool.f0[sample],
                                     [lookup[ids[i]] for i in sample])
    true_steps = step_norms(recipe, [f / "theta.safetensors" for f in folders])

    results = pl.DataFrame({
        "subset": [label for label, _ in chosen], "groups": [int(m.sum()) for m in memberships],
        "examples": [len(p) for p in parts],
        "estimate": est.loss, "estimate_calibrated_loo": fitted, "true_loss": truth, **accuracy,
        **{f"{k}_score": v for k, v in baselines.items()},
        **{k: [r[k] for r in first_order] for k in first_order[0]},
        "estimated_step_norm": np.linalg.norm(est.steps, axis=1) * pool.step_scale(),
        "true_step_norm": true_steps,
    })
    results.write_parquet(out / "results.parquet")
    summary = {
        "subsets": len(chosen), "method": recipe.select.method, "estimate_target": recipe.estimate.target,
        "estimate": quality(truth, est.loss), "estimate_calibrated_loo": quality(truth, fitted),
        "constant_mean_loo": {"median_relative_error": median_relative_error(truth, leave_one_out_mean(truth)),
                              "r2": r_squared(truth, leave_one_out_mean(truth))},
        "baselines_spearman": {k: spearman(-v, truth) for k, v in baselines.items()},
        **({"exact_match_spearman": _accuracy_spearman(est.loss, baselines, accuracy["true_exact_match"])}
           if accuracy else {}),
        "truth_noise": noise,
        "first_order": {"first_order_error_mean": float(np.mean([r["first_order_error"] for r in first_order])),
                        "zeroth_order_error_mean": float(np.mean([r["zeroth_order_error"] for r in first_order]))},
        "step_norms": {"estimated_median": float(results["estimated_step_norm"].median()),
                       "true_median": float(np.median(true_steps))},
        "calibration": calibration,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _scatter(results, out / "scatter.png", summary)
    (out / "report.md").write_text(_report(results, summary))
    return summary


def _accuracy_spearman(estimate: np.ndarray, baselines: dict[str, np.ndarray], accuracy: list[float]) -> dict | None:
    """How each predictor ranks the subsets' exact match (a lower estimated loss predicts more);
    None when every fine-tune scored the same, which nothing can rank."""
    acc = np.array(accuracy)
    if np.ptp(acc) == 0:
        return None
    return {"estimate": spearman(-estimate, acc), **{k: spearman(v, acc) for k, v in baselines.items()}}


def _scatter(results: pl.DataFrame, path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    random = results.filter(pl.col("subset").str.starts_with("random"))
    other = results.filter(~pl.col("subset").str.starts_with("random"))
    ax.scatter(random["estimate"], random["true_loss"], label="random subsets", color="tab:blue")
    ax.scatter(other["estimate"], other["true_loss"], label="selected / not selected", color="tab:red", marker="D")
    ax.set_xlabel("estimated target loss at θ* + Pŵ (nats/token)")
    ax.set_ylabel("target loss after a real fine-tune")
    ax.set_title(f"Spearman {summary['estimate']['spearman']:.2f}, {len(results)} subsets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(results: pl.DataFrame, summary: dict) -> str:
    em = "true_exact_match" in results.columns
    lines = ["# dataselect verify", "", "| subset | groups | estimate | true loss |" + (" exact match |" if em else ""),
             "|---|---|---|---|" + ("---|" if em else "")]
    lines += [f"| {r['subset']} | {r['groups']} | {r['estimate']:.4f} | {r['true_loss']:.4f} |"
              + (f" {r['true_exact_match']:.3f} |" if em else "") for r in results.iter_rows(named=True)]
    lines += ["", "| predictor | Spearman | Kendall | R² | median relative error |", "|---|---|---|---|---|"]
    for name in ("estimate", "estimate_calibrated_loo"):
        q = summary[name]
        lines.append(f"| {name} | {q['spearman']:.3f} | {q['kendall']:.3f} | {q['r2']:.3f} | "
                     f"{q['median_relative_error']:.4f} |")
    c = summary["constant_mean_loo"]
    lines.append(f"| constant mean (leave-one-out) | — | — | {c['r2']:.3f} | {c['median_relative_error']:.4f} |")
    for k, v in summary["baselines_spearman"].items():
        lines.append(f"| {k} (subset score) | {v:.3f} | | | |")
    if em and summary["exact_match_spearman"] is None:
        lines += ["", f"Every fine-tune's exact match was {results['true_exact_match'][0]:.3f}: nothing to rank."]
    elif em:
        lines += ["", "Spearman with the true exact match: " + ", ".join(
            f"{k} {v:.3f}" for k, v in summary["exact_match_spearman"].items()) + "."]
    f, n, c, st = summary["first_order"], summary["truth_noise"], summary["calibration"], summary["step_norms"]
    if n["repeats"]:
        lines += ["", f"Truth's own noise: {n['repeats']} subsets fine-tuned again with seed {n['seed']} land a median "
                  f"{n['median_relative_difference']:.2%} from the first fine-tune."]
    lines += ["", f"First-order check: mean squared relative error of F⁰ + ĝ·ŵ {f['first_order_error_mean']:.2e}, "
              f"of F⁰ alone (zeroth order) {f['zeroth_order_error_mean']:.2e}.",
              f"Step length: the estimator moves θ* by a median ‖Pŵ‖ = {st['estimated_median']:.3g}; the real "
              f"fine-tunes from the base land a median {st['true_median']:.3g} from θ*.",
              f"Calibration: estimate.l2 = {c['l2']:.3g} ranks these subsets best (Spearman {c['spearman']:.3f}, "
              f"median ‖Pŵ‖ {c['step_norm_median']:.3g}).", ""]
    return "\n".join(lines)
