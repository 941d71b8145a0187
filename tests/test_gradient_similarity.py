"""The LESS baseline's FAISS search against a plain numpy computation of its definition."""

import numpy as np

from dataselect.select import gradient_similarity


def _plain(x: np.ndarray, target: np.ndarray, weights: list[float]) -> np.ndarray:
    """max over target examples of Σ_k w_k cos(x_k, target_k), in float64, one point at a time."""
    d = x.shape[1] // len(weights)
    total = np.zeros((len(x), len(target)))
    for k, w in enumerate(weights):
        a, b = x[:, k * d : (k + 1) * d].astype(np.float64), target[:, k * d : (k + 1) * d].astype(np.float64)
        a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-30)
        b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-30)
        total += w * a @ b.T
    return total.max(1)


def test_faiss_max_over_the_target_equals_the_weighted_sum_of_cosines():
    rng = np.random.default_rng(0)
    weights = [0.5, 0.3, 0.2]
    x = rng.normal(size=(5000, 3 * 16)).astype(np.float32) * rng.uniform(0.1, 10, size=(5000, 1)).astype(np.float32)
    target = rng.normal(size=(37, 3 * 16)).astype(np.float32)
    x[:3, 16:32] = 0  # a point where the gradient vanishes counts as cosine 0, as before
    x[10] = 4 * target[5]  # the same direction as a target example: the largest possible score
    got = gradient_similarity(x, target, weights)
    want = _plain(x, target, weights)
    assert got.shape == (5000,) and got.dtype == np.float32  # more than one block of 4096 queries
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert abs(got[10] - sum(weights)) < 1e-5
