"""Subset estimates: dataselect's group-level estimate against the research code's per-subset fits.

    python benchmarks/bench_estimate.py [--subsets 1000 --groups 100 --examples 20000,200000 --dim 512]

On synthetic sketches of the given size (written to a memory-mapped .npy file in a temporary
folder, as the sketch stage stores them: group centres plus noise) it measures, in one run:
  - dataselect's estimates: one streamed pass computing each row's inner product with the target
    gradient and each group's summed sketches, then a few products over the groups for all
    subsets, and every group's own effect with its interval (over the group's rows and over 200
    target rows); seconds and the process's peak resident memory;
  - the same estimates computed the slow way for `--check` subsets (each subset's rows' gradients,
    token-weighted gradients and squares summed in a pass over the sketches, then the step scale
    and the inner product with the target; base loss 0, so the change itself is compared), and
    the largest relative difference from the group-level ones;
  - the research code's estimator: per subset, labels ~ Bernoulli(0.7), feature signs flipped for
    label 0, sklearn LogisticRegression(C=1e-4, liblinear) on the first 80% of the subset's rows,
    timed on `--sklearn-fits` subsets and scaled to all of them (only for pools up to
    `--sklearn-max-rows`: one fit on a million rows takes minutes).

`--examples 200000,1000000 --groups 1000` gives issue 14's figures: seconds and peak memory of a
million-row pool beside a 200k one, in one run.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from dataselect.estimate import pool_of, sample_subsets

BATCH = 8  # the fine-tune's examples per step (meta-init's default)


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
    target_rows = (centres[rng.integers(0, n_groups, 200)] * 0.1).astype(np.float64)  # 200 validation rows
    target_tokens = rng.integers(1, 50, 200).astype(np.float64)
    return np.load(path, mmap_mode="r"), group_of, tokens, target_rows, target_tokens


def row_level(x: np.ndarray, group_of: np.ndarray, tokens: np.ndarray, target: np.ndarray,
              subsets: np.ndarray, batch: int, block: int = 65536) -> np.ndarray:
    """The estimate the slow way, as a check: each subset's rows' sums (of g, T·g, ‖g‖², over a
    pass over the sketches in blocks), then its per-token gradient, the spread of a batch's mean
    about it, and the step scale against the whole pool's."""
    subsets = np.vstack([subsets, np.ones(subsets.shape[1], dtype=bool)])  # the last: the whole pool
    sums, weighted, squares = np.zeros((len(subsets), x.shape[1])), np.zeros((len(subsets), x.shape[1])), 0.0
    for i in range(0, len(x), block):
        member = subsets[:, group_of[i : i + block]].astype(np.float64)
        rows = np.asarray(x[i : i + block], dtype=np.float64)
        sums += member @ rows
        weighted += member @ (rows * tokens[i : i + block, None])
        squares = squares + member @ (rows * rows).sum(1)
    member = subsets[:, group_of].astype(np.float64)
    total, count = member @ tokens, member.sum(1)
    gradient = sums / total[:, None]
    signal = (gradient * gradient).sum(1)
    spread = (squares - 2 * (weighted * gradient).sum(1) + (member @ tokens**2) * signal) / count
    mean_square = signal + spread / (batch * (total / count) ** 2)
    drop = np.sqrt(mean_square[-1] / mean_square[:-1]) * (gradient[:-1] @ target)
    return -drop


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


def measure(size: int, args, tmp: Path) -> dict:
    """One pool size: dataselect's estimates (seconds, peak RSS), checked row by row on a few subsets."""
    path = tmp / f"sketches-{size}.npy"
    x, group_of, tokens, target_rows, target_tokens = synthetic(path, args.groups, size, args.dim)
    target = target_rows.sum(0) / target_tokens.sum()
    subsets = sample_subsets(args.groups, args.subsets, 0.5, seed=0)
    start = time.perf_counter()
    labels = [f"g{g:05d}" for g in range(args.groups)]  # sorted as numbered, so the subsets' columns match
    pool = pool_of([], [labels[g] for g in group_of], x, tokens, target_rows, target_tokens,
                   np.zeros(len(target_tokens)), BATCH)
    loss = pool.evaluate(subsets, budget="steps")
    pool.group_effects()
    seconds = time.perf_counter() - start
    rows = row_level(x, group_of, tokens, target, subsets[: args.check], BATCH)
    difference = float(np.max(np.abs(rows - loss[: args.check]) / np.abs(rows)))  # base loss 0: the change itself
    per_fit = None
    if size <= args.sklearn_max_rows:
        fit_start = time.perf_counter()
        research_loop(x, group_of, subsets[: args.sklearn_fits])
        per_fit = (time.perf_counter() - fit_start) / args.sklearn_fits
    del x, pool
    path.unlink()
    return {"size": size, "seconds": seconds, "rss": peak_rss_gib(), "difference": difference, "per_fit": per_fit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--examples", default="20000", help="pool sizes, comma-separated, run smallest first")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--check", type=int, default=20)
    parser.add_argument("--sklearn-fits", type=int, default=20)
    parser.add_argument("--sklearn-max-rows", type=int, default=20000,
                        help="time the research code's per-subset fits only up to this pool size")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.examples.split(","))
    print(f"{args.subsets} subsets of {args.groups} groups (half each), d = {args.dim}; "
          f"peak RSS is the process's, so each size's includes the smaller ones before it (they are smaller)")
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(size, args, Path(tmp)) for size in sizes]
    print("\n| rows | dataselect: seconds for all subsets | peak RSS (GiB) | row-by-row check: largest relative "
          "difference of the estimated drop | research code: sklearn loop, seconds (scaled) | ratio |\n|---|---|---|---|---|---|")
    for r in results:
        loop = "—" if r["per_fit"] is None else f"{r['per_fit'] * args.subsets:.0f} ({r['per_fit']:.3f} s per fit)"
        ratio = "—" if r["per_fit"] is None else f"{r['per_fit'] * args.subsets / r['seconds']:.0f}"
        print(f"| {r['size']:,} | {r['seconds']:.2f} | {r['rss']:.2f} | {r['difference']:.1e} | {loop} | {ratio} |")


if __name__ == "__main__":
    main()
