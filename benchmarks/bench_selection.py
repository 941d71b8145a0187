"""Does selecting by estimate give a better fine-tune? Every method's mixture, really fine-tuned.

    python benchmarks/bench_selection.py [--setting demo|gsm8k|t0] [--model tiny|smollm2]
        [--targets samsum,imdb,...] [--regime pretrained|scratch] [--seeds 0,1,2] [--budget epochs|steps]
        [--set select.keep_fraction=0.3 ...] [--size-matched group_effect] [--step-matched group_effect]

Per target, one θ*, sketch and estimate stage is built (reused from `--cache` when it exists;
estimates and selections are always recomputed); each method then selects groups with the
recipe's keep-rules; the base model is fine-tuned on each mixture with meta-init's settings for
every seed (the seed changes the fine-tune's data order, not the base model nor the selection),
and the target's validation and test token cross-entropy (and test exact match where the target
defines an answer) are measured. The test split is read only here, to report. Prints mean ± std
over seeds per target, and for several targets the mean over targets of each method's test loss;
beside `all`, each method's change against it paired by seed (mean ± standard error); over
targets, the same against `all` and against gradient similarity, the strongest simple baseline.
`--size-matched group_effect` adds a control beside that method: as many groups dropped, drawn at
random per seed. At equal steps any drop changes the loss (fewer distinct rows, repeated more);
the method's change against its control is what its choice of *which* groups is worth.
`--step-matched gradient_similarity` (with `--budget epochs`) adds another: all sources trained
for as many steps as that method's mixture takes. A smaller mixture also trains for fewer steps;
against this control its change is what its rows are worth, not the shorter training.

`--budget epochs` (the default) trains each mixture for meta-init's epochs, so a smaller mixture
gets fewer steps, as a user who swaps in the selected data would; `--budget steps` trains every
mixture for as many steps as all sources get (more epochs over a smaller mixture), which
separates what the data is from how much of it there is. Each also sets the recipe's
`select.training`, and with it the default keep rule (`threshold_on` unset: `low_end` for
epochs, `high_end` for steps); `--set select.threshold_on=...` overrides it. Settings: see
`settings.py`.
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
from settings import CACHE, REGIMES, REGIME_HELP, T0_IN_POOL, T0_TRANSFER, setting

from dataselect.selectors import SELECTORS

# the baselines first, then the selectors that read the estimates
METHODS = ",".join(sorted(SELECTORS, key=lambda name: SELECTORS[name].kind == "estimate"))


def harmful_rows(mixture: pl.DataFrame, demo_data: Path) -> int:
    """Rows whose ground truth says they are wrong: the demo's corrupted rows (its generated
    `quality` column, so those inside the unlabeled source count too), GSM8K's incorrect solutions."""
    wrong = mixture.filter(pl.col("group").str.ends_with("/False")).height
    for path in demo_data.glob("*.jsonl"):
        quality = pl.read_ndjson(path).select("quality").with_row_index("row").cast({"row": pl.Int64})
        rows = mixture.filter(pl.col("source") == path.stem).select(pl.col("row").cast(pl.Int64))
        wrong += rows.join(quality, on="row").filter(pl.col("quality") == "corrupted").height
    return wrong


def fresh_estimates(recipe) -> None:
    """θ*, sketches reused from the cache; estimates, selections and exports made again (cheap,
    and what the benchmarks compare, so never left from older code)."""
    from dataselect import run

    run(recipe, until="sketch")
    for stage in ("estimate", "select", "export"):
        shutil.rmtree(recipe.run.stage_dir(stage), ignore_errors=True)
    run(recipe, until="estimate")


def source_rows(recipe) -> pl.DataFrame:
    """Every usable source row with the group the estimate stage put it in."""
    examples = recipe.run.ingested.examples()
    sources = examples.filter((pl.col("role") == "source") & (pl.col("status") == "ok")).drop("group")
    return sources.join(recipe.run.estimates.assignments(), on="id")


def evaluate_mixture(recipe, sources: pl.DataFrame, kept: set[str], seeds: list[int], budget: str,
                     finetunes: Path) -> dict:
    """The rows of the `kept` groups fine-tuned from the base for every seed, scored on the target."""
    from dataselect.evaluate import finetune_and_score
    from dataselect.examples import token_rows

    mixture = sources.filter(pl.col("group").is_in(list(kept)))
    rows = token_rows(mixture)
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
    return {"groups": len(kept), "rows": len(rows), "harmful": harmful_rows(mixture, recipe.run.demo_data),
            "val": val, "test": tst, "em": em}


def evaluate_methods(recipe, methods: list[str], seeds: list[int], budget: str, finetunes: Path,
                     size_matched: tuple[str, ...] = (), step_matched: tuple[str, ...] = ()) -> list[dict]:
    """Per method: its mixture fine-tuned from the base for every seed, scored on the target; for
    each method in `size_matched`, then its size-matched random control, and in `step_matched`,
    all sources for as many steps as its mixture."""
    from dataselect import run

    sources = source_rows(recipe)
    out, kept_by = [], {}
    for method in methods:
        chosen = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": method})})
        run(chosen, until="select")
        kept_by[method] = set(chosen.run.selection.read().filter(pl.col("selected"))["group"])
        out.append({"method": method, **evaluate_mixture(recipe, sources, kept_by[method], seeds, budget, finetunes)})
    for method in size_matched:
        out.append(size_matched_control(recipe, sources, method, len(kept_by[method]), seeds, budget, finetunes))
    for method in step_matched:
        rows = next(r["rows"] for r in out if r["method"] == method)
        out.append(step_matched_control(recipe, sources, method, rows, seeds, finetunes))
    return out


def step_matched_control(recipe, sources: pl.DataFrame, method: str, rows: int, seeds: list[int],
                         finetunes: Path) -> dict:
    """All sources, trained at the recipe's epochs scaled to take as many steps as `method`'s
    mixture of `rows` rows: at a budget of epochs a kept fraction also trains less, which alone
    can lower the target's loss when the whole pool pulls the model elsewhere."""
    scale = rows / len(sources)  # token_rows keeps every source row
    shorter = recipe.model_copy(update={"meta_init": recipe.meta_init.model_copy(
        update={"epochs": recipe.meta_init.epochs * scale})})
    result = evaluate_mixture(shorter, sources, set(sources["group"]), seeds, "epochs", finetunes)
    return {"method": f"all, as many steps as {method}", "of": method, **result}


def size_matched_control(recipe, sources: pl.DataFrame, method: str, n_kept: int, seeds: list[int], budget: str,
                         finetunes: Path) -> dict:
    """As many groups dropped as `method` dropped, but drawn at random, a new draw per seed. At equal
    steps, dropping any group changes the target's loss (fewer distinct rows, each repeated more), so
    a selector's margin over all sources is evidence that it chose well only beyond this control's."""
    groups = sorted(set(sources["group"]))
    n_drop = len(groups) - n_kept
    runs, drawn = [], []
    for seed in seeds:
        dropped = {str(g) for g in np.random.default_rng([seed, n_drop]).choice(groups, n_drop, replace=False)}
        runs.append(evaluate_mixture(recipe, sources, set(groups) - dropped, [seed], budget, finetunes))
        drawn.append(f"seed {seed}: " + (", ".join(sorted(dropped)) or "none"))
    return {"method": f"random, as many as {method}", "of": method, "groups": n_kept,
            "rows": round(np.mean([r["rows"] for r in runs])), "harmful": round(np.mean([r["harmful"] for r in runs])),
            **{key: [v for r in runs for v in r[key]] for key in ("val", "test", "em")}, "drawn": drawn}


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "—"


def paired_change(values: list[float], base: list[float]) -> str:
    """Mean ± standard error over seeds of a method's loss minus all sources' with the same seed.

    The seed sets the data order of both fine-tunes, so their noise is shared: paired, a margin
    far smaller than either std over seeds can still be told from 0."""
    diff = np.asarray(values) - np.asarray(base)
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return f"{diff.mean():+.4f} ± {se:.4f}"


def print_target(label: str, results: list[dict]) -> None:
    base = next((r for r in results if r["method"] == "all"), None)
    paired = " Δ test vs all (paired, ± se) |" if base else ""
    print(f"\n{label}\n\n| method | groups | rows | harmful rows | validation loss | test loss | test exact match |"
          f"{paired}\n|---|---|---|---|---|---|---|" + ("---|" if base else ""))
    for r in results:
        change = "" if not base else " — |" if r is base else f" {paired_change(r['test'], base['test'])} |"
        print(f"| {r['method']} | {r['groups']} | {r['rows']} | {r['harmful']} | {_ms(r['val'])} | {_ms(r['test'])} | "
              f"{_ms(r['em'])} |{change}", flush=True)
    for r in (r for r in results if r.get("of")):
        chosen = next(c for c in results if c["method"] == r["of"])
        drawn = (f"\n{r['method']}, the groups dropped: " + "; ".join(r["drawn"]) + ".") if r.get("drawn") else ""
        print(f"{drawn}\n{r['of']} minus {r['method']}, test loss paired by seed (± se): "
              f"{paired_change(chosen['test'], r['test'])}")


def print_over_targets(per_target: dict[str, list[dict]]) -> None:
    """Mean over targets of each method's test loss (and of its std over seeds); how many targets
    it beats gradient similarity, all and random on."""
    methods = [r["method"] for r in next(iter(per_target.values()))]
    mean = {m: [np.mean(next(r for r in rs if r["method"] == m)["test"]) for rs in per_target.values()]
            for m in methods}
    std = {m: [np.std(next(r for r in rs if r["method"] == m)["test"]) for rs in per_target.values()] for m in methods}
    print(f"\nmean over {len(per_target)} targets\n\n| method | test loss | mean std over seeds | lower than "
          + " | lower than ".join(b for b in ("all", "random", "gradient_similarity") if b in methods) + " |\n"
          "|---|---|---|" + "---|" * sum(b in methods for b in ("all", "random", "gradient_similarity")))
    for m in methods:
        beats = [f"{sum(a < b for a, b in zip(mean[m], mean[o]))}/{len(per_target)}"
                 for o in ("all", "random", "gradient_similarity") if o in methods]
        print(f"| {m} | {np.mean(mean[m]):.3f} | {np.mean(std[m]):.3f} | " + " | ".join(beats) + " |")
    for base in ("all", "gradient_similarity"):
        if base in methods:
            print_paired_over_targets(per_target, methods, base)
    for control in (r for r in next(iter(per_target.values())) if r.get("of")):
        print(f"\n{control['of']} minus {control['method']}, the same way: "
              f"{paired_change(_per_seed(per_target, control['of']), _per_seed(per_target, control['method']))}")


def _per_seed(per_target: dict[str, list[dict]], method: str) -> list[float]:
    """A method's test loss per seed, averaged over targets."""
    return list(np.mean([next(r for r in rs if r["method"] == method)["test"] for rs in per_target.values()], axis=0))


def print_paired_over_targets(per_target: dict[str, list[dict]], methods: list[str], base: str) -> None:
    """Each method's test loss minus `base`'s (all sources, or the strongest simple baseline,
    gradient similarity), averaged over targets for each seed, then mean ± standard error over
    seeds: whether a mean margin is more than seed noise."""
    whose = "all sources'" if base == "all" else f"{base}'s"
    print(f"\nmean over {len(per_target)} targets of the test loss minus {whose}, per seed, then over seeds\n\n"
          f"| method | Δ test vs {base} (paired, ± se) |\n|---|---|")
    for m in (m for m in methods if m != base):
        print(f"| {m} | {paired_change(_per_seed(per_target, m), _per_seed(per_target, base))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "gsm8k", "t0"], default="demo")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--targets", default=",".join(T0_IN_POOL + T0_TRANSFER), help="t0 targets")
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--budget", choices=["epochs", "steps"], default="epochs")
    parser.add_argument("--size-matched", default="", metavar="METHODS",
                        help="beside each of these methods, a control that drops as many groups at random")
    parser.add_argument("--step-matched", default="", metavar="METHODS",
                        help="with --budget epochs: beside each of these methods, all sources for as many steps")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every target, e.g. select.min_score=null (stages it does not "
                             "touch are reused)")
    args = parser.parse_args()
    size_matched = tuple(m for m in args.size_matched.split(",") if m)
    step_matched = tuple(m for m in args.step_matched.split(",") if m)
    for flag, chosen_methods in (("--size-matched", size_matched), ("--step-matched", step_matched)):
        if not set(chosen_methods) <= set(args.methods.split(",")):
            parser.error(f"{flag}: each must be one of --methods {args.methods}")
    if step_matched and args.budget != "epochs":
        parser.error("--step-matched: at --budget steps every mixture already takes as many steps as all sources")
    os.environ["TQDM_DISABLE"] = "1"

    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    print(f"command: python benchmarks/bench_selection.py {' '.join(sys.argv[1:])}")
    targets = args.targets.split(",") if args.setting == "t0" else [None]
    per_target = {}
    for target in targets:
        chosen = setting(args.setting, args.model, target=target, regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-{args.model}",
                             f"select.training={args.budget}", *args.set)
        print(f"\nsetting {chosen.name}, model {args.model}: recipe {chosen.recipe.name} with "
              f"{' '.join(chosen.overrides) or 'no overrides'}; seeds {seeds}; fine-tunes from the base with "
              f"meta-init's settings, {args.budget} as in meta-init", flush=True)
        fresh_estimates(recipe)
        label = target + (" (in-pool)" if target in T0_IN_POOL else " (transfer)") if target else chosen.name
        per_target[label] = evaluate_methods(recipe, args.methods.split(","), seeds, args.budget,
                                             args.cache / "finetunes", size_matched, step_matched)
        print_target(label, per_target[label])
    if len(per_target) > 1:
        print_over_targets(per_target)
    print(f"\n{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
