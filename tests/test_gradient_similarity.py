"""The LESS baseline against a plain numpy computation of its definition, and its interval's target side."""

import numpy as np

from dataselect.select import gradient_similarity


def _cosines(x: np.ndarray, target: np.ndarray, weights: list[float]) -> np.ndarray:
    """Σ_k w_k cos(x_k, target_k) for every example and target example, in float64, one point at a time."""
    d = x.shape[1] // len(weights)
    total = np.zeros((len(x), len(target)))
    for k, w in enumerate(weights):
        a, b = x[:, k * d : (k + 1) * d].astype(np.float64), target[:, k * d : (k + 1) * d].astype(np.float64)
        a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-30)
        b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-30)
        total += w * a @ b.T
    return total


def _plain(x: np.ndarray, target: np.ndarray, weights: list[float]) -> np.ndarray:
    """max over target examples of Σ_k w_k cos(x_k, target_k)."""
    return _cosines(x, target, weights).max(1)


def _plain_se(x: np.ndarray, target: np.ndarray, weights: list[float], group_of: np.ndarray, n_groups: int,
              seed: int, draws: int = 100) -> np.ndarray:
    """The target side's standard error by its definition: redraw the target's rows with replacement
    (the same redraws, from the same seed), score every example against each redraw, and take the
    spread over redraws of each group's mean score minus the pool's mean."""
    rng = np.random.default_rng(seed)
    sims = _cosines(x, target, weights)
    centred = []
    for _ in range(draws):
        picks = np.unique(rng.integers(0, len(target), len(target)))
        best = sims[:, picks].max(1)
        centred.append([best[group_of == g].mean() - best.mean() for g in range(n_groups)])
    return np.std(centred, axis=0, ddof=1)


def test_blocked_max_over_the_target_equals_the_weighted_sum_of_cosines():
    rng = np.random.default_rng(0)
    weights = [0.5, 0.3, 0.2]
    x = rng.normal(size=(5000, 3 * 16)).astype(np.float32) * rng.uniform(0.1, 10, size=(5000, 1)).astype(np.float32)
    target = rng.normal(size=(37, 3 * 16)).astype(np.float32)
    x[:3, 16:32] = 0  # a point where the gradient vanishes counts as cosine 0, as before
    x[10] = 4 * target[5]  # the same direction as a target example: the largest possible score
    got, se = gradient_similarity(x, target, weights, np.arange(5000) % 7, 7, seed=0)
    want = _plain(x, target, weights)
    assert got.shape == (5000,) and got.dtype == np.float32  # more than one block of 4096 queries
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert abs(got[10] - sum(weights)) < 1e-5
    np.testing.assert_allclose(se, _plain_se(x, target, weights, np.arange(5000) % 7, 7, seed=0), rtol=1e-3)
    assert se.min() > 0


def test_a_group_that_matches_one_target_example_is_uncertain_on_the_targets_side():
    """Group 0's rows all point at target example 0, so its score rises and falls with whether a
    redraw of the target holds that example; group 1's rows are near no target example in
    particular, so redrawing the target barely moves their max (nor the pool's mean, which centres
    every score)."""
    rng = np.random.default_rng(1)
    target = rng.normal(size=(50, 32)).astype(np.float32)
    near_one = target[0] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    anywhere = rng.normal(size=(800, 32)).astype(np.float32)  # groups 1 to 4: most of the pool, whose mean centres
    x = np.concatenate([near_one, anywhere])
    _, se = gradient_similarity(x, target, [1.0], np.repeat([0, 1, 2, 3, 4], [50, 200, 200, 200, 200]), 5, seed=0)
    assert se[0] > 5 * se[1:].max()
