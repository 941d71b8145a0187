"""Subset estimates: dataselect's group-level estimate against the research code's per-subset fits.

    python benchmarks/bench_estimate.py [--subsets 1000 --groups 100 --examples 20000 --dim 512]

On synthetic sketches of the given size (written to a memory-mapped .npy file in a temporary
folder, as the sketch stage stores them: group centres plus noise) it measures, in one run:
  - dataselect's estimates: one streamed pass computing each row's inner product with the target
    gradient, then two matrix-vector products over the groups for all subsets; seconds and the
    process's peak resident memory;
  - the same estimates computed row by row for `--check` subsets (the sum over each subset's rows),
    and the largest difference from the group-level ones;
  - the research code's estimator: per subset, labels ~ Bernoulli(0.7), feature signs flipped for
    label 0, sklearn LogisticRegression(C=1e-4, liblinear) on the first 80% of the subset's rows,
    timed on `--sklearn-fits` subsets and scaled to all of them.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from dataselect.estimate import Pool, alignments, sample_subsets


def synthetic(path: Path, n_groups: int, n: int, d: int, seed: int = 0, block: int = 50_000):
    """Sketches in a memory-mapped file, written block by block; each row's group and tokens."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, d)).astype(np.float32)
    group_of = rng.integers(0, n_groups, n)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for i in range(0, n, block):
        g = group_of[i : i + block]
        x[i : i + block] = (centres[g] + 2 * rng.normal(size=(len(g), d)).astype(np.float32)) * 0.1
    x.flush()
    del x
    tokens = rng.integers(1, 200, n).astype(np.float64)
    target = (centres[rng.integers(0, n_groups, 200)].mean(0) * 0.1).astype(np.float64)
    return np.load(path, mmap_mode="r"), group_of, tokens, target


def research_loop(x: np.ndarray, group_of: np.ndarray, subsets: np.ndarray, seed: int = 0) -> np.ndarray:
    """The research code's estimator, one scikit-learn fit per subset."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    coefs = []
    for member in subsets:
        rows = np.asarray(x[np.flatnonzero(member[group_of])])
        labels = rng.random(len(rows)) < 0.7
        features = np.where(labels[:, None], rows, -rows)
        cut = int(0.8 * len(rows))
        fit = LogisticRegression(C=1e-4, solver="liblinear").fit(features[:cut], labels[:cut].astype(int))
        coefs.append(fit.coef_[0])
    return np.stack(coefs)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--check", type=int, default=20)
    parser.add_argument("--sklearn-fits", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.subsets} subsets of {args.groups} groups (half each), {args.examples} examples, d = {args.dim}")
    with tempfile.TemporaryDirectory() as tmp:
        x, group_of, tokens, target = synthetic(Path(tmp) / "sketches.npy", args.groups, args.examples, args.dim)
        subsets = sample_subsets(args.groups, args.subsets, 0.5, seed=0)
        before = peak_rss_gib()
        start = time.perf_counter()
        pool = Pool([], [], [str(g) for g in range(args.groups)], group_of, alignments(x, target), tokens, 1.0)
        loss = pool.evaluate(subsets)
        ours = time.perf_counter() - start
        rss = peak_rss_gib()

        rows = []
        for member in subsets[: args.check]:
            keep = np.flatnonzero(member[group_of])
            rows.append(1.0 - float((np.asarray(x[keep], np.float64) @ target).sum()) / tokens[keep].sum())
        difference = float(np.max(np.abs(np.array(rows) - loss[: args.check]) / np.abs(loss[: args.check])))

        start = time.perf_counter()
        research_loop(x, group_of, subsets[: args.sklearn_fits])
        per_fit = (time.perf_counter() - start) / args.sklearn_fits
    loop = per_fit * args.subsets
    print("\n| estimator | seconds for all subsets | peak RSS (GiB) | ratio to dataselect |\n|---|---|---|---|")
    print(f"| dataselect (group sums of row alignments) | {ours:.2f} | {rss:.2f} (before: {before:.2f}) | 1.0 |")
    print(f"| research code: sklearn loop ({per_fit:.3f} s per fit, {args.sklearn_fits} fits timed, scaled) "
          f"| {loop:.0f} | — | {loop / ours:.0f} |")
    print(f"\nrow-by-row estimates of {args.check} subsets against the group-level ones: largest relative "
          f"difference {difference:.1e}")


if __name__ == "__main__":
    main()
