"""Time every stage of a build and compare sketching with training throughput, in one run.

    python benchmarks/bench_build.py [--recipe recipes/demo.yaml] [--set key=value ...]

Builds the recipe from scratch in a temporary folder and prints, per stage, wall seconds and
examples per second. The baseline is meta-initialization's own training throughput (forward
and backward passes of the same model on the same data); sketching is printed as a ratio to it.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from dataselect import load_recipe, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, [f"workdir={tmp}/run", f"output.path={tmp}/out", *args.overrides])
        start = time.perf_counter()
        summaries = run(recipe, force=True)
        total = time.perf_counter() - start
        seconds = {s: recipe.run.record(s)["seconds"] for s in summaries}

    meta = summaries["meta_init"]
    train_rate = meta["steps"] * recipe.meta_init.batch_size / seconds["meta_init"]
    sketched = sum(v for k, v in summaries["sketch"]["examples"].items() if k != "target validation tokens")
    sketch_rate = sketched / seconds["sketch"]
    print(f"recipe {args.recipe} {' '.join(args.overrides)} | torch {torch.__version__} | "
          f"{platform.processor() or platform.machine()} | threads {torch.get_num_threads()}")
    print(f"{'stage':<10} {'seconds':>8}  notes")
    for stage, s in seconds.items():
        note = ""
        if stage == "meta_init":
            note = f"{meta['steps']} steps, {train_rate:.0f} examples/s (baseline)"
        elif stage == "sketch":
            note = (f"{sketched} examples (sources and target validation), {sketch_rate:.0f} examples/s = "
                    f"{sketch_rate / train_rate:.2f}x training")
        elif stage == "estimate":
            e = summaries["estimate"]
            note = f"{e['subsets']} subsets of {e['groups']} groups, estimates {e['seconds']:.2f} s"
        print(f"{stage:<10} {s:>8.1f}  {note}")
    print(f"{'total':<10} {total:>8.1f}")


if __name__ == "__main__":
    main()
