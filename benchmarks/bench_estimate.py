"""Subset estimates: dataselect's batched solver against the research code's scikit-learn loop.

    python benchmarks/bench_estimate.py [--subsets 1000 --groups 100 --examples 20000 --dim 512]

On synthetic sketches of the given size (group centres plus noise, offsets F⁰ ~ N(1, 1), 2,000
target tokens) it times, in one run:
  - dataselect's `linear` estimates (logistic fit with offsets, all subsets batched, then the
    linearised target loss), and its `reference` mode;
  - the research code's loop: per subset, labels ~ Bernoulli(0.7), feature signs flipped for
    label 0, sklearn LogisticRegression(C=1e-4, liblinear) on the first 80% of the subset's
    rows, timed on `--sklearn-fits` subsets and scaled to all of them;
and, on the demo's tiny model, the `exact` mode (a target forward pass at θ* + Pŵ) per subset.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dataselect.estimate import estimate_subsets, exact_losses, load_pool, sample_subsets

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n_groups: int, n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, d)).astype(np.float32)
    group_of = np.repeat(np.arange(n_groups), -(-n // n_groups))[:n]
    x = ((centres[group_of] + 2 * rng.normal(size=(n, d))) * 0.1).astype(np.float32)
    f0 = rng.normal(1.0, 1.0, size=n).astype(np.float32)
    target = -(centres[rng.integers(0, n_groups, 200)] * 0.1 + 0.1 * rng.normal(size=(200, d))).mean(0)
    return x, f0, group_of, target.astype(np.float32), 1.0


def research_loop(x: np.ndarray, group_of: np.ndarray, subsets: np.ndarray, seed: int = 0) -> np.ndarray:
    """The research code's estimator, one scikit-learn fit per subset."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    coefs = []
    for member in subsets:
        rows = x[member[group_of]]
        labels = rng.random(len(rows)) < 0.7
        features = np.where(labels[:, None], rows, -rows)
        cut = int(0.8 * len(rows))
        fit = LogisticRegression(C=1e-4, solver="liblinear").fit(features[:cut], labels[:cut].astype(int))
        coefs.append(fit.coef_[0])
    return np.stack(coefs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sklearn-fits", type=int, default=20)
    parser.add_argument("--exact-subsets", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | {args.subsets} subsets of "
          f"{args.groups} groups (half each), {args.examples} examples, d = {args.dim}")
    x, f0, group_of, target, base = synthetic(args.groups, args.examples, args.dim)
    subsets = sample_subsets(args.groups, args.subsets, 0.5, seed=0)

    start = time.perf_counter()
    est = estimate_subsets(x, f0, group_of, target, base, subsets, l2=0.05, max_iter=100, tol=1e-5)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    estimate_subsets(x, f0, group_of, target, base, subsets, 0.05, 100, 1e-5, solver="reference", bound=1.0)
    reference = time.perf_counter() - start

    start = time.perf_counter()
    research_loop(x, group_of, subsets[: args.sklearn_fits])
    per_fit = (time.perf_counter() - start) / args.sklearn_fits
    loop = per_fit * args.subsets

    print("\n| estimator | seconds for all subsets | ratio to dataselect linear |\n|---|---|---|")
    print(f"| dataselect linear (logistic with offsets, {est.iterations} steps, {est.unconverged} unconverged) "
          f"| {ours:.2f} | 1.0 |")
    print(f"| dataselect reference (research estimator, closed form) | {reference:.2f} | {reference / ours:.2f} |")
    print(f"| research code: sklearn loop ({per_fit:.3f} s per fit, {args.sklearn_fits} fits timed, scaled) "
          f"| {loop:.0f} | {loop / ours:.0f} |")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TQDM_DISABLE"] = "1"
        from dataselect import load_recipe, run

        recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [f"workdir={tmp}/run", f"output.path={tmp}/out"])
        run(recipe, until="sketch")
        pool = load_pool(recipe)
        groups = pool.groups
        demo = sample_subsets(len(groups), args.exact_subsets, 0.5, seed=1)
        start = time.perf_counter()
        linear = pool.evaluate(demo)
        linear_s = (time.perf_counter() - start) / len(demo)
        start = time.perf_counter()
        exact = exact_losses(recipe, linear.steps)
        exact_s = (time.perf_counter() - start) / len(demo)
    rel = np.median(np.abs(exact - linear.loss) / exact)
    print(f"\ndemo model ({len(groups)} groups, 200 target examples): exact mode {exact_s:.3f} s per subset, "
          f"linear {1000 * linear_s:.2f} ms per subset in a batch of {len(demo)}; "
          f"median |exact − linear| / exact = {rel:.1e}")


if __name__ == "__main__":
    main()
