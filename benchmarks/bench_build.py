"""Time and peak memory of every stage of a build, and sketching against training throughput.

    python benchmarks/bench_build.py [--recipe recipes/demo.yaml] [--set key=value ...]
    python benchmarks/bench_build.py --t0-full      # the whole T0 pool: 55k rows, 294 templates as groups

Builds the recipe from scratch in a temporary folder, one stage per child process (each reusing
the stages before it), so each stage's wall seconds and peak resident memory are its own
(`os.wait4`'s rusage of that child; the ~0.5 GB of importing torch included). The baseline is
meta-initialization's own training throughput (forward and backward passes of the same model on
the same data); sketching is printed as a ratio to it.

`--t0-full` reads `../shared/data/t0/t0_templates.parquet` as one source grouped by template, with
the tiny pretrained base and the samsum target that `bench_selection.py --setting t0` writes into
the cache (run that first). The target's rows are also in the full pool, so the manifest's
duplicates section reports them as contamination, as it should.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from settings import CACHE, T0

from dataselect import STAGE_NAMES, load_recipe

T0_FULL = [f"sources.0.dataset={T0}", "sources.0.group_by=template", f"model.base={CACHE}/t0-base",
           f"target.dataset={CACHE}/t0-data/target-samsum.jsonl", "name=t0-full"]


def run_stage(recipe_path: str, overrides: list[str], stage: str) -> tuple[float, float]:
    """One stage in a child process: (wall seconds, the child's peak RSS in GiB)."""
    code = ("import sys, json; from dataselect import load_recipe, run; "
            "run(load_recipe(sys.argv[1], json.loads(sys.argv[2])), until=sys.argv[3])")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, recipe_path, json.dumps(overrides), stage])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"stage {stage} failed (exit {child.returncode})")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--t0-full", action="store_true", help="the whole T0 pool with recipes/t0.yaml")
    args = parser.parse_args()
    recipe_path = "recipes/t0.yaml" if args.t0_full else args.recipe
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*(T0_FULL if args.t0_full else []), f"workdir={tmp}/run", f"output.path={tmp}/out",
                     *args.overrides]
        recipe = load_recipe(recipe_path, overrides)
        measured = {stage: run_stage(recipe_path, overrides, stage) for stage in STAGE_NAMES}
        summaries = {s: recipe.run.summary(s) for s in STAGE_NAMES}

    meta = summaries["meta_init"]
    train_rate = meta["steps"] * recipe.meta_init.batch_size / measured["meta_init"][0]
    sketched = sum(v for k, v in summaries["sketch"]["examples"].items() if k != "target validation tokens")
    sketch_rate = sketched / measured["sketch"][0]
    ingest = summaries["ingest"]
    print(f"recipe {recipe_path} {' '.join(args.overrides)} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs")
    print("\n| stage | seconds | peak RSS (GiB) | notes |\n|---|---|---|---|")
    for stage, (seconds, rss) in measured.items():
        note = ""
        if stage == "ingest":
            note = json.dumps({k: v for k, v in ingest.items() if isinstance(v, int | float)})[:120]
        elif stage == "meta_init":
            note = f"{meta['steps']} steps, {train_rate:.0f} examples/s (baseline)"
        elif stage == "sketch":
            note = (f"{sketched} examples (sources and target validation), {sketch_rate:.0f} examples/s = "
                    f"{sketch_rate / train_rate:.2f}x training")
        elif stage == "estimate":
            e = summaries["estimate"]
            note = f"{e['subsets']} subsets of {e['groups']} groups, estimates {e['seconds']:.2f} s"
        elif stage == "select":
            s = summaries["select"]
            note = f"{s['groups_selected']} of {s['groups']} groups, {s['examples_selected']} examples"
        print(f"| {stage} | {seconds:.1f} | {rss:.2f} | {note} |")
    print(f"| total | {sum(s for s, _ in measured.values()):.1f} | {max(r for _, r in measured.values()):.2f} | |")


if __name__ == "__main__":
    main()
