"""selection: does the selected mixture fine-tune better? Every method's mixture, really fine-tuned.

    python -m benchmarks selection [--setting demo|gsm8k|t0] [--targets samsum,imdb,...]
        [--regime pretrained|scratch] [--seeds 0,1,2] [--budget epochs|steps] [--methods ...]
        [--set select.keep_fraction=0.25 ...] [--size-matched METHOD] [--step-matched METHOD]
    python -m benchmarks selection --drop 'GLOB' [--drop ...]     # all sources without some groups
    python -m benchmarks selection --ranks [--by-point]           # a selector's ranking, no fine-tune

Per target, one θ*, sketch and estimate stage is built (reused from `--cache`; estimates and
selections are always recomputed). Each method selects groups with the recipe's keep rules; the
base model is fine-tuned on each mixture with meta-init's settings for every seed (the seed sets
the fine-tune's data order, not the base model nor the selection), and the target's validation
and test token cross-entropy (and test exact match where the target defines an answer) are
measured. The test split is read only here, to report.

`--budget epochs` (the default) trains each mixture for meta-init's epochs over its own rows, so a
smaller mixture gets fewer steps, as a user who swaps in the selected data would; `--budget steps`
trains every mixture for as many steps as all sources get. Each also sets `select.training`.
Controls: `--size-matched M` drops as many groups as M at random (a new draw per seed): at equal
steps any drop changes the loss, so M's margin over it is what its choice of *which* groups is
worth; `--step-matched M` (with `--budget epochs`) trains all sources for as many steps as M's
mixture takes, so M's margin over it is what its rows are worth, not the shorter training.

`--drop GLOB` (repeatable) measures the ground truth behind a keep rule: each mixture is every
group but those matching the glob, beside the change the estimate predicts. `--ranks` prints each
group's score under `--methods`' first method with its 95% interval, best first (for GSM8K,
whether each model-written source's correct solutions outrank its incorrect ones).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import numpy as np

from .common import (Results, Table, add_budget, add_seeds, add_setting, build_recipe, estimate, fresh_estimates,
                     paired, parse_seeds, regime_of, slug, source_rows, target_label, targets_of)

BASELINES = ("all", "random", "gradient_similarity")
GSM8K_MODEL_SOURCES = ("gptj_finetuned", "gptj_verifier", "gpt3_finetuned", "gpt3_verifier")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dataselect.selectors import SELECTORS

    add_setting(parser)
    add_seeds(parser)
    add_budget(parser)
    methods = ",".join(sorted(SELECTORS, key=lambda name: SELECTORS[name].kind == "estimate"))  # baselines first
    parser.add_argument("--methods", default=methods)
    parser.add_argument("--size-matched", default="", metavar="METHODS",
                        help="beside each of these methods, a control that drops as many groups at random")
    parser.add_argument("--step-matched", default="", metavar="METHODS",
                        help="with --budget epochs: beside each of these methods, all sources for as many steps")
    parser.add_argument("--candidates", action="store_true",
                        help="also fine-tune every candidate the default's confirm stage proposed, for every seed")
    parser.add_argument("--drop", action="append", default=[], metavar="GLOB",
                        help="instead of --methods: all sources without the groups matching GLOB (repeat for more)")
    parser.add_argument("--ranks", action="store_true", help="print the first method's ranking; fine-tune nothing")
    parser.add_argument("--by-point", action="store_true",
                        help="with --ranks and group_effect: each group's effect by point of meta-init's path")


def default_name(args: argparse.Namespace) -> str:
    mode = "ranks" if args.ranks else "leave-out" if args.drop else None
    settings = [o.split("select.", 1)[-1] for o in args.overrides]
    return slug("selection", args.setting, args.model if args.model != "tiny" else None,
                regime_of(args.setting, args.regime), None if args.ranks else args.budget, mode, *settings)


def run(args: argparse.Namespace) -> Results:
    methods = args.methods.split(",")
    size_matched = [m for m in args.size_matched.split(",") if m]
    step_matched = [m for m in args.step_matched.split(",") if m]
    if not set(size_matched + step_matched) <= set(methods):
        sys.exit(f"--size-matched, --step-matched: each must be one of --methods {args.methods}")
    if step_matched and args.budget != "epochs":
        sys.exit("--step-matched: at --budget steps every mixture already takes as many steps as all sources")
    results = Results()
    per_target = {}
    for target in targets_of(args):
        chosen, recipe = build_recipe(args, target, f"select.training={args.budget}")
        label, key = target_label(target, chosen.name), target or chosen.name
        print(f"\n{label}: recipe {chosen.recipe.name} with {' '.join(chosen.overrides) or 'no overrides'}", flush=True)
        fresh_estimates(recipe)
        if args.ranks:
            ranks(recipe, methods[0], args.by_point, label, key, results)
            continue
        finetunes = args.cache / "finetunes"
        if args.drop:
            leave_out(recipe, args.drop, parse_seeds(args.seeds), args.budget, finetunes, label, key, results)
            continue
        per_target[label] = evaluate_methods(recipe, methods, parse_seeds(args.seeds), args.budget, finetunes,
                                             size_matched, step_matched)
        results.add(f"target:{key}", target_table(label, per_target[label]))
        if args.candidates:
            candidates(recipe, per_target[label], parse_seeds(args.seeds), args.budget, finetunes, label, key, results)
    if per_target:
        results.raw["per_target"] = per_target
        confirmation(per_target, parse_seeds(args.seeds), results)
    if len(per_target) > 1:
        over_targets(per_target, results)
        if args.candidates:
            fixed_fractions(per_target, results)
    return results


# --- methods ------------------------------------------------------------------------------------


def harmful_rows(mixture, demo_data: Path) -> int:
    """Rows whose ground truth says they are wrong: the demo's corrupted rows (its generated
    `quality` column, so those inside the unlabeled source count too), GSM8K's incorrect solutions."""
    import polars as pl

    wrong = mixture.filter(pl.col("group").str.ends_with("/False")).height
    for path in demo_data.glob("*.jsonl"):
        quality = pl.read_ndjson(path).select("quality").with_row_index("row").cast({"row": pl.Int64})
        rows = mixture.filter(pl.col("source") == path.stem).select(pl.col("row").cast(pl.Int64))
        wrong += rows.join(quality, on="row").filter(pl.col("quality") == "corrupted").height
    return wrong


def evaluate_mixture(recipe, sources, kept: set[str] | dict[str, int], seeds: list[int], budget: str,
                     finetunes: Path) -> dict:
    """The rows of the `kept` groups (each as many times as its repeats, where given) fine-tuned
    from the base for every seed, as the confirm stage trains a candidate, scored on the target."""
    import polars as pl

    from dataselect.confirm import training_rows
    from dataselect.trainer import finetune_and_score

    weights = kept if isinstance(kept, dict) else dict.fromkeys(kept, 1)
    mixture = sources.filter(pl.col("group").is_in(list(weights)))
    rows = training_rows(sources, weights)
    epochs = recipe.meta_init.epochs * (len(sources) / len(rows) if budget == "steps" else 1)
    val, tst, em = [], [], []
    for seed in seeds:
        trained = recipe.model_copy(update={"seed": seed, "meta_init": recipe.meta_init.model_copy(
            update={"epochs": epochs})})
        scores = finetune_and_score(trained, rows, finetunes, ("validation", "test"), exact_on=("test",))
        val.append(scores["validation"]["loss"])
        tst.append(scores["test"]["loss"])
        if recipe.target.answer:
            em.append(scores["test"]["exact_match"])
    return {"groups": len(weights), "rows": len(rows), "harmful": harmful_rows(mixture, recipe.run.demo_data),
            "kept": sorted(weights), "repeated": sorted(g for g, w in weights.items() if w > 1),
            "val": val, "test": tst, "em": em}


def evaluate_methods(recipe, methods: list[str], seeds: list[int], budget: str, finetunes: Path,
                     size_matched: list[str], step_matched: list[str]) -> list[dict]:
    """Per method: its mixture fine-tuned for every seed; then each method's controls."""
    import polars as pl

    from dataselect import run

    sources = source_rows(recipe)
    out, kept_by = [], {}
    for method in methods:
        chosen = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": method})})
        summary = run(chosen, until="confirm")["confirm"]
        mixture = chosen.run.confirmation.mixture()
        kept_by[method] = set(mixture)
        out.append({"method": method, **evaluate_mixture(recipe, sources, mixture, seeds, budget, finetunes),
                    "decisions": chosen.run.selection.read().to_dicts(), "confirm": summary,
                    "candidates": chosen.run.confirmation.candidates().to_dicts()})
    for method in size_matched:
        out.append(size_matched_control(recipe, sources, method, len(kept_by[method]), seeds, budget, finetunes))
    for method in step_matched:
        rows = next(r["rows"] for r in out if r["method"] == method)
        out.append(step_matched_control(recipe, sources, method, rows, seeds, finetunes))
    return out


def step_matched_control(recipe, sources, method: str, rows: int, seeds: list[int], finetunes: Path) -> dict:
    """All sources, trained at the recipe's epochs scaled to take as many steps as `method`'s
    mixture of `rows` rows."""
    scale = rows / len(sources)  # token_rows keeps every source row
    shorter = recipe.model_copy(update={"meta_init": recipe.meta_init.model_copy(
        update={"epochs": recipe.meta_init.epochs * scale})})
    result = evaluate_mixture(shorter, sources, set(sources["group"]), seeds, "epochs", finetunes)
    return {"method": f"all, as many steps as {method}", "of": method, **result}


def size_matched_control(recipe, sources, method: str, n_kept: int, seeds: list[int], budget: str,
                         finetunes: Path) -> dict:
    """As many groups dropped as `method` dropped, but drawn at random, a new draw per seed."""
    groups = sorted(set(sources["group"]))
    n_drop = len(groups) - n_kept
    runs = []
    for seed in seeds:
        dropped = {str(g) for g in np.random.default_rng([seed, n_drop]).choice(groups, n_drop, replace=False)}
        runs.append(evaluate_mixture(recipe, sources, set(groups) - dropped, [seed], budget, finetunes))
    return {"method": f"random, as many as {method}", "of": method, "groups": n_kept,
            "rows": round(np.mean([r["rows"] for r in runs])), "harmful": round(np.mean([r["harmful"] for r in runs])),
            "kept": [r["kept"] for r in runs], **{key: [v for r in runs for v in r[key]] for key in ("val", "test", "em")}}


def target_table(label: str, rows: list[dict]) -> Table:
    base = next((r for r in rows if r["method"] == "all"), None)
    table = Table(f"{label}: each method's mixture, fine-tuned for every seed (mean ± std over seeds); Δ: its test "
                  "loss minus all sources', paired by seed (mean ± standard error)",
                  [("method", "method", ""), ("groups", "groups", ""), ("rows", "rows", ""),
                   ("harmful", "harmful rows", ""), ("val", "validation loss", ".3f"), ("test", "test loss", ".3f"),
                   ("em", "test exact match", ".3f"), ("vs_all", "Δ test vs all", "+.4f")])
    for r in rows:
        table.rows.append({"method": r["method"], "groups": r["groups"], "rows": r["rows"], "harmful": r["harmful"],
                           "val": estimate(r["val"]), "test": estimate(r["test"]), "em": estimate(r["em"]),
                           "vs_all": None if base is None or r is base else paired(r["test"], base["test"])})
    for r in (r for r in rows if r.get("of")):
        chosen = next(c for c in rows if c["method"] == r["of"])
        table.rows.append({"method": f"{r['of']} minus {r['method']}", "vs_all": paired(chosen["test"], r["test"])})
    return table


def per_seed(per_target: dict[str, list[dict]], method: str) -> list[float]:
    """A method's test loss per seed, averaged over targets."""
    return list(np.mean([next(r for r in rs if r["method"] == method)["test"] for rs in per_target.values()], axis=0))


def over_targets(per_target: dict[str, list[dict]], results: Results) -> None:
    """Mean over targets of each method's test loss and of its std over seeds; on how many targets
    it is below each baseline; and its change against all sources and against gradient
    similarity (the strongest simple baseline), averaged over targets per seed, then mean ± se."""
    methods = [r["method"] for r in next(iter(per_target.values()))]
    mean = {m: [float(np.mean(next(r for r in rs if r["method"] == m)["test"])) for rs in per_target.values()]
            for m in methods}
    std = {m: [float(np.std(next(r for r in rs if r["method"] == m)["test"])) for rs in per_target.values()]
           for m in methods}
    baselines = [b for b in BASELINES if b in methods]
    table = Table(f"mean over {len(per_target)} targets of each method's test loss; lower than a baseline: on how "
                  "many targets; Δ: the test loss minus the baseline's, averaged over targets per seed, then mean ± "
                  "standard error over seeds",
                  [("method", "method", ""), ("test", "test loss", ".3f"), ("std", "mean std over seeds", ".3f"),
                   *[(f"below_{b}", f"lower than {b}", "") for b in baselines],
                   *[(f"vs_{b}", f"Δ vs {b}", "+.3f") for b in ("all", "gradient_similarity") if b in methods]])
    for m in methods:
        row = {"method": m, "test": float(np.mean(mean[m])), "std": float(np.mean(std[m]))}
        for b in baselines:
            row[f"below_{b}"] = f"{sum(a < c for a, c in zip(mean[m], mean[b]))}/{len(per_target)}"
        for b in ("all", "gradient_similarity"):
            if b in methods:
                row[f"vs_{b}"] = None if m == b else paired(per_seed(per_target, m), per_seed(per_target, b))
        table.rows.append(row)
    results.add("over_targets", table)
    results.raw["per_target_mean"] = mean


def fixed_fractions(per_target: dict[str, list[dict]], results: Results) -> None:
    """The default against each fixed share of a ranking (its confirm stage's "top eighth by
    gradient similarity" and the like, fine-tuned for every seed by --candidates) over the targets:
    a fixed budget that one ranking takes on every target is what a user without confirmation
    would pick, so the default must beat the best of them, paired by seed."""
    defaults = {label: next(r for r in rows if r["method"] == "group_effect") for label, rows in per_target.items()}
    if not all("candidates_measured" in r for r in defaults.values()):
        return
    names = [c["candidate"] for c in next(iter(defaults.values()))["candidates_measured"] if c["candidate"].startswith("top ")]
    table = Table(f"the default against each fixed share of a ranking, over {len(per_target)} targets (every share "
                  "fine-tuned for every seed): mean test loss; on how many targets the default is lower; Δ: the "
                  "default's test loss minus the share's, averaged over targets per seed, then mean ± standard error",
                  [("candidate", "fixed share", ""), ("test", "test loss", ".3f"), ("default", "the default's", ".3f"),
                   ("default_lower", "default lower on", ""), ("vs_default", "Δ default vs it", "+.3f")])
    ours = np.mean([r["test"] for r in defaults.values()], axis=0)
    for name in names:
        found = [next((c for c in r["candidates_measured"] if c["candidate"] == name), None) for r in defaults.values()]
        if any(c is None for c in found):
            continue  # a share some target did not propose (one ranking too short)
        theirs = np.mean([c["test"] for c in found], axis=0)
        lower = sum(np.mean(r["test"]) < np.mean(c["test"]) for r, c in zip(defaults.values(), found))
        table.rows.append({"candidate": name, "test": float(np.mean(theirs)), "default": float(np.mean(ours)),
                           "default_lower": f"{lower}/{len(found)}", "vs_default": paired(list(ours), list(theirs))})
    results.add("fixed_shares", table)


def confirmation(per_target: dict[str, list[dict]], seeds: list[int], results: Results) -> None:
    """What the default's confirm stage chose and spent per target, and how honest its prediction
    was: each landmark (a candidate trained in full) against its prediction from the others
    (leave one out), and the chosen mixture retrained with the benchmark's other seeds against the
    prediction the manifest states, beside the seed-to-seed noise of its validation loss."""
    table = Table("the default's confirm stage per target: the mixture it chose and what it cost (in full "
                  "fine-tunes of the pool); its predicted validation loss (90% interval) for a retrain, against the "
                  "retrains with the other seeds; each landmark predicted from the others; seed noise: the std of "
                  "the chosen mixture's validation loss over the seeds",
                  [("target", "target", ""), ("chosen", "chosen", ""), ("groups", "groups", ""),
                   ("cost", "cost", ".2f"), ("predicted", "predicted", ".3f"), ("interval", "± 90%", ".3f"),
                   ("retrains", "retrains inside", ""), ("landmarks", "landmarks inside", ""),
                   ("median_error", "landmarks' median error", ".3f"), ("noise", "seed noise", ".3f")])
    all_hits, all_errors, noises = [], [], []
    for label, rows in per_target.items():
        ours = next((r for r in rows if r["method"] == "group_effect" and r.get("confirm", {}).get("confirmed")), None)
        if ours is None:
            continue
        summary = ours["confirm"]
        landmarks = [c for c in ours["candidates"] if c["validation_loss"] is not None and c["predicted"] is not None]
        hits = [abs(c["validation_loss"] - c["predicted"]) <= c["predicted_interval90"] for c in landmarks]
        retrains = [v for seed, v in zip(seeds, ours["val"]) if seed != seeds[0]]
        predicted, half = summary["predicted_validation_loss"], summary["predicted_interval90"]
        covered = [abs(v - predicted) <= half for v in retrains] if predicted is not None else []
        all_hits += hits
        all_errors += [abs(c["validation_loss"] - c["predicted"]) for c in landmarks]
        noises += [float(np.std(ours["val"], ddof=1))] if len(ours["val"]) > 1 else []
        table.rows.append({"target": label, "chosen": summary["chosen"], "groups": ours["groups"],
                           "cost": summary["cost"], "predicted": predicted, "interval": half,
                           "retrains": f"{sum(covered)}/{len(covered)}", "landmarks": f"{sum(hits)}/{len(hits)}",
                           "median_error": float(np.median([abs(c["validation_loss"] - c["predicted"])
                                                            for c in landmarks])) if landmarks else None,
                           "noise": float(np.std(ours["val"], ddof=1)) if len(ours["val"]) > 1 else None})
    if len(table.rows) > 1:
        table.rows.append({"target": "over targets", "cost": float(np.mean([r["cost"] for r in table.rows])),
                           "landmarks": f"{sum(all_hits)}/{len(all_hits)}",
                           "median_error": float(np.median(all_errors)) if all_errors else None,
                           "noise": float(np.median(noises)) if noises else None})
    if table.rows:
        results.add("confirm", table)


def candidates(recipe, rows: list[dict], seeds: list[int], budget: str, finetunes: Path, label: str, key: str,
               results: Results) -> None:
    """Every candidate the default's confirm stage proposed, fine-tuned for every seed as the
    mixture will be trained: how far the one it chose is from the best of them, on the test split.
    Every fixed share of each ranking is measured too, also where the stage did not propose it (for
    this training) or merged it into a candidate with the same groups, so the default meets each
    one on every target."""
    ours = next((r for r in rows if r["method"] == "group_effect"), None)
    if ours is None or not ours.get("confirm", {}).get("confirmed"):
        return
    proposed = {c["candidate"] for c in ours["candidates"]}
    merged = [{"candidate": name, "groups": len(weights), "weights": [f"{g}×{w}" for g, w in weights.items()],
               "estimate": None, "validation_loss": None, "predicted": None,
               "decision": "not a candidate of the stage: not proposed for this training, or the same groups as one"}
              for name, weights in shares(recipe, ours["decisions"]).items() if name not in proposed]
    sources = source_rows(recipe)
    base = next((r for r in rows if r["method"] == "all"), None)
    table = Table(f"{label}: each candidate of the default's confirm stage, fine-tuned for every seed; the stage's own "
                  "validation loss (its seed) and prediction beside them",
                  [("candidate", "candidate", ""), ("groups", "groups", ""), ("rows", "rows", ""),
                   ("estimate", "estimate", ".3f"), ("stage", "stage's validation loss", ".3f"),
                   ("predicted", "predicted", ".3f"), ("val", "validation loss", ".3f"), ("test", "test loss", ".3f"),
                   ("vs_all", "Δ test vs all", "+.4f"), ("decision", "decision", "")])
    measured = []
    for c in ours["candidates"] + merged:
        weights = dict(w.rsplit("×", 1) for w in c["weights"])
        found = evaluate_mixture(recipe, sources, {g: int(n) for g, n in weights.items()}, seeds, budget, finetunes)
        measured.append({**c, "val": found["val"], "test": found["test"]})
        table.rows.append({"candidate": c["candidate"], "groups": c["groups"], "rows": found["rows"],
                           "estimate": c["estimate"], "stage": c["validation_loss"], "predicted": c["predicted"],
                           "val": estimate(found["val"]), "test": estimate(found["test"]),
                           "vs_all": paired(found["test"], base["test"]) if base else None, "decision": c["decision"]})
    ours["candidates_measured"] = measured
    results.add(f"candidates:{key}", table)


def shares(recipe, decisions: list[dict]) -> dict[str, dict[str, int]]:
    """The fixed shares of the three rankings the confirm stage takes its candidates from
    (`decisions`: the default's select stage, per group)."""
    import polars as pl

    from dataselect.confirm import fixed_shares, other_orders, rankings

    run = recipe.run
    decided = pl.DataFrame(decisions)
    others = other_orders(recipe, run.ingested, run.meta_init, run.sketches, run.estimates)
    return fixed_shares(rankings(decided, others), decided.height)


# --- leave-out ----------------------------------------------------------------------------------


def leave_out(recipe, patterns: list[str], seeds: list[int], budget: str, finetunes: Path, label: str, key: str,
              results: Results) -> None:
    """All sources against all sources without the groups each glob matches, beside the change
    the estimate predicts for that drop."""
    from dataselect.estimate import group_sums, subset_losses

    sources, effects = source_rows(recipe), recipe.run.estimates.group_gradients()
    sums = group_sums(recipe, recipe.run.estimates)
    groups = set(sources["group"])
    base = evaluate_mixture(recipe, sources, groups, seeds, budget, finetunes)
    table = Table(f"{label}: all sources without some groups, {budget} as all sources get; Δ: the mixture's loss "
                  "minus all sources', paired by seed, mean ± standard error (negative: dropping helped)",
                  [("mixture", "mixture", ""), ("dropped", "dropped", ""), ("rows", "rows", ""),
                   ("estimated", "estimated Δ", "+.4f"), ("val", "validation loss", ".3f"),
                   ("d_val", "Δ validation", "+.4f"), ("test", "test loss", ".3f"), ("d_test", "Δ test", "+.4f")])
    table.rows.append({"mixture": "all", "dropped": 0, "rows": base["rows"], "val": estimate(base["val"]),
                       "test": estimate(base["test"])})
    for pattern in patterns:
        dropped = sorted(g for g in groups if fnmatch.fnmatchcase(g, pattern))
        if not dropped or len(dropped) == len(groups):
            sys.exit(f"--drop {pattern!r} matches {len(dropped)} of the groups {sorted(groups)}")
        kept = groups - set(dropped)
        r = evaluate_mixture(recipe, sources, kept, seeds, budget, finetunes)
        mixture = effects["group"].is_in(list(kept)).to_numpy()
        predicted = subset_losses(np.vstack([np.ones_like(mixture), mixture]), sums, 0.0, budget)
        table.rows.append({"mixture": f"without {pattern}", "dropped": len(dropped), "rows": r["rows"],
                           "estimated": float(predicted[1] - predicted[0]), "val": estimate(r["val"]),
                           "d_val": paired(r["val"], base["val"]), "test": estimate(r["test"]),
                           "d_test": paired(r["test"], base["test"])})
    results.add(f"leave_out:{key}", table)


# --- ranks --------------------------------------------------------------------------------------


def ranks(recipe, method: str, by_point: bool, label: str, key: str, results: Results) -> None:
    """Each group's score under `method`, best first, with its 95% interval (for group_effect, its
    two parts: the noise over the group's rows and over the target's validation rows)."""
    from dataselect import run
    from dataselect.select import Inputs, score_groups

    recipe = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": method})})
    run(recipe, until="estimate")
    scores = score_groups(recipe, Inputs.of(recipe.run))[0].sort(["score", "group"], descending=[True, False],
                                                                 nulls_last=True)
    parts = {}
    if method == "group_effect":
        effects = recipe.run.estimates.group_gradients()
        parts = {r["group"]: (r["ci95_examples"], r["ci95_target"]) for r in effects.iter_rows(named=True)}
    table = Table(f"{label}: {method}'s score of every group (± its 95% interval), best first",
                  [("rank", "rank", ""), ("group", "group", ""), ("score", "score", "+.3e"), ("ci95", "± 95%", ".1e"),
                   *([("ci_rows", "± group rows", ".1e"), ("ci_target", "± target rows", ".1e")] if parts else [])])
    rank = {}
    for i, row in enumerate(scores.iter_rows(named=True), start=1):
        rank[row["group"]] = i
        table.rows.append({"rank": i, "group": row["group"], "score": row["score"], "ci95": row["ci95"],
                           **({"ci_rows": parts[row["group"]][0], "ci_target": parts[row["group"]][1]} if parts else {})})
    results.add(f"ranks:{key}", table)
    if by_point and method == "group_effect":
        by_point_table(recipe, rank, label, key, results)
    if all(f"{s}/True" in rank and f"{s}/False" in rank for s in GSM8K_MODEL_SOURCES):
        results.add(f"correct_above_incorrect:{key}", Table(
            f"{label}: per model-written source, the ranks of its correct and incorrect solutions",
            [("source", "source", ""), ("correct", "correct's rank", ""), ("incorrect", "incorrect's rank", ""),
             ("above", "correct above incorrect", "")],
            [{"source": s, "correct": rank[f"{s}/True"], "incorrect": rank[f"{s}/False"],
              "above": rank[f"{s}/True"] < rank[f"{s}/False"]} for s in GSM8K_MODEL_SOURCES]))


def by_point_table(recipe, rank: dict[str, int], label: str, key: str, results: Results) -> None:
    """Each group's effect split by the point of meta-init's path its gradients come from, with
    the cosine there between its summed gradient and the target's: the parts add up to the effect."""
    from dataselect.examples import response_tokens
    from dataselect.sketch import point_blocks, stacked_sources, target_sketches

    run_, points = recipe.run, len(recipe.sketch_path)
    examples = run_.ingested.examples()
    lengths = response_tokens(examples)
    ids, names, x, _ = stacked_sources(recipe, examples, run_.sketches)
    target_ids, target_x, _ = target_sketches(run_.sketches)
    target_tokens = sum(lengths[i] for i in target_ids)
    target = [t.astype(np.float64).sum(0) / target_tokens for t in point_blocks(target_x, points)]
    names, tokens = np.array(names), np.array([lengths[i] for i in ids], dtype=np.float64)
    scale = dict(run_.estimates.group_gradients().select("group", "scale").iter_rows())
    blocks = point_blocks(x, points)
    table = Table(f"{label}: each group's effect by the point of meta-init's path (and the cosine with the "
                  "target's gradient there)",
                  [("rank", "rank", ""), ("group", "group", ""), ("effect", "effect", "+.4f"),
                   *[(f"at_{p}", f"at {p}", "+.4f") for p in recipe.sketch_path],
                   *[(f"cos_{p}", f"cosine at {p}", "+.2f") for p in recipe.sketch_path]])
    for group, i in rank.items():
        rows = names == group
        row = {"rank": i, "group": group, "effect": 0.0}
        for p, block, t in zip(recipe.sketch_path, blocks, target):
            summed = block[rows].astype(np.float64).sum(0)
            part = scale[group] * float(summed @ t) / max(tokens[rows].sum(), 1.0)
            row[f"at_{p}"], row["effect"] = part, row["effect"] + part
            row[f"cos_{p}"] = float(summed @ t / max(np.linalg.norm(summed) * np.linalg.norm(t), 1e-300))
        table.rows.append(row)
    results.add(f"by_point:{key}", table)

