"""θ* — meta-init, the seed's fine-tune on all sources — scored as bench_selection scores a mixture.

    python benchmarks/eval_theta_star.py [--setting demo|gsm8k] [--model tiny|smollm2]

Where running bench_selection's `all` method would fine-tune all sources again (hours for
SmolLM2 on a CPU), this builds the setting only up to meta-init and evaluates θ*: the target's
validation and test token cross-entropy and test exact match, for one seed (the recipe's).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import polars as pl
from settings import setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "gsm8k"], default="demo")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from dataselect import run
    from dataselect.evaluate import score
    from dataselect.meta_init import load_theta_star
    from dataselect.tokens import load_tokenizer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = setting(args.setting, args.model).load(Path(tmp))
        run(recipe, until="meta_init")
        examples = recipe.run.ingested.examples()
        rows = examples.filter((pl.col("role") == "source") & (pl.col("status") == "ok")).height
        scores = score(recipe, load_theta_star(recipe, recipe.run.ingested, recipe.run.meta_init.theta),
                       load_tokenizer(recipe, recipe.run.ingested), ("validation", "test"), ("test",))
        val, tst = scores["validation"]["loss"], scores["test"]["loss"]
        em = f"{scores['test']['exact_match']:.3f}" if recipe.target.answer else "—"
    print("| method | rows | validation loss | test loss | test exact match |\n|---|---|---|---|---|")
    print(f"| all (θ*, seed {recipe.seed}) | {rows} | {val:.3f} | {tst:.3f} | {em} |")
    print(f"\n{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
