"""Stage 4, first-order estimates: the target loss after fine-tuning on a subset S, without training.

Fine-tuning on S, linearised around θ* inside the sketch subspace θ = θ* + P w, is the
logistic regression

    ŵ_S = argmin_w  mean_{j∈S} ℓ(F⁰_j + ĝ_j·w) + λ‖w‖²,    ℓ(m) = log(1 + e^{−m}),

with the offsets F⁰_j kept (the research code drops them). The target estimate is the target's
validation token cross-entropy at θ* + P ŵ_S, linearised token by token from per-token sketches:
mean_k ℓ(logit p_k + ĝ_k·ŵ_S), no model pass. (−log p = ℓ(logit p) holds exactly per token.)
λ is `estimate.l2` times the mean squared sketch norm, which makes it independent of the model's
gradient scale; it sets how far the linearised fine-tune moves from θ*.

All subsets are solved together: Nesterov-accelerated gradient descent on a batch of subsets,
with each subset's step size from a power-iteration bound on its curvature.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as nnf

from .recipe import Recipe


@dataclass
class Estimates:
    subsets: np.ndarray  # (m, n_groups) bool
    loss: np.ndarray  # (m,) estimated target validation token cross-entropy
    base_loss: float  # the same at θ* (the empty subset)
    iterations: int
    unconverged: int


def sample_subsets(n_groups: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """m random subsets of round(fraction·n) groups each, as a boolean membership matrix."""
    size = min(n_groups, max(1, round(fraction * n_groups)))
    rng = np.random.default_rng(seed)
    members = np.zeros((m, n_groups), dtype=bool)
    for row in members:
        row[rng.choice(n_groups, size=size, replace=False)] = True
    return members


def solve_subsets(x: torch.Tensor, f0: torch.Tensor, weights: torch.Tensor, lam: float,
                  max_iter: int, tol: float) -> tuple[torch.Tensor, int, int]:
    """ŵ for each row of `weights` (subsets × examples, rows summing to 1).

    Returns (w of shape subsets × d, iterations run, subsets not converged to `tol`, measured
    as the gradient norm relative to its value at w = 0).
    """
    m, d = weights.shape[0], x.shape[1]
    lipschitz = 0.25 * _top_eigenvalue(x, weights) + 2 * lam
    step = (1.0 / lipschitz).unsqueeze(1)
    kappa = lipschitz / (2 * lam)
    momentum = ((kappa.sqrt() - 1) / (kappa.sqrt() + 1)).unsqueeze(1)

    def gradient(w: torch.Tensor) -> torch.Tensor:
        margins = f0 + w @ x.T  # (m, n)
        return -(weights * torch.sigmoid(-margins)) @ x + 2 * lam * w

    w = torch.zeros(m, d, dtype=x.dtype)
    g0 = gradient(w).norm(dim=1).clamp(min=1e-30)
    y, it = w, 0
    for it in range(1, max_iter + 1):
        g = gradient(y)
        if bool((g.norm(dim=1) <= tol * g0).all()):
            w = y
            break
        w_next = y - step * g
        y = w_next + momentum * (w_next - w)
        w = w_next
    unconverged = int((gradient(w).norm(dim=1) > tol * g0 * 10).sum())
    return w, it, unconverged


def _top_eigenvalue(x: torch.Tensor, weights: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Largest eigenvalue of Xᵀ diag(weights_s) X for every subset s, by power iteration."""
    v = torch.ones(weights.shape[0], x.shape[1], dtype=x.dtype) / math.sqrt(x.shape[1])
    est = torch.ones(weights.shape[0], dtype=x.dtype)
    for _ in range(iters):
        u = (weights * (v @ x.T)) @ x
        est = u.norm(dim=1)
        v = u / est.clamp(min=1e-30).unsqueeze(1)
    return est * 1.05  # power iteration approaches from below


def target_loss(token_x: torch.Tensor, token_odds: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linearised target token cross-entropy at θ* + P w for each row of w: −log p = ℓ(logit p)."""
    return nnf.softplus(-(token_odds + w @ token_x.T)).mean(dim=1)


def estimate_subsets(x: np.ndarray, f0: np.ndarray, group_of: np.ndarray, token_x: np.ndarray,
                     token_odds: np.ndarray, subsets: np.ndarray, l2: float, max_iter: int, tol: float,
                     chunk: int = 256) -> Estimates:
    """f̂(S) for every subset row of `subsets` (membership over groups), in chunks of subsets."""
    xt = torch.from_numpy(np.array(x, dtype=np.float32))
    ft = torch.from_numpy(np.array(f0, dtype=np.float32))
    tx = torch.from_numpy(np.array(token_x, dtype=np.float32))
    tf = torch.from_numpy(np.array(token_odds, dtype=np.float32))
    lam = l2 * float((xt**2).sum(1).mean())
    losses, its, bad = [], 0, 0
    for start in range(0, len(subsets), chunk):
        member = torch.from_numpy(subsets[start : start + chunk][:, group_of]).float()  # (c, n)
        weights = member / member.sum(1, keepdim=True).clamp(min=1)
        w, it, unconverged = solve_subsets(xt, ft, weights, lam, max_iter, tol)
        losses.append(target_loss(tx, tf, w).numpy())
        its, bad = max(its, it), bad + unconverged
    base = float(nnf.softplus(-tf).mean())
    return Estimates(subsets=subsets, loss=np.concatenate(losses), base_loss=base, iterations=its, unconverged=bad)


def stage(recipe: Recipe, out: Path) -> dict:
    """Sample subsets of groups, estimate each, and keep everything selection needs as files."""
    from .sketch import stacked_sources, target_tokens
    from .sources import read_ingested

    ids, names, x, f0 = stacked_sources(recipe, read_ingested(recipe))
    groups = sorted(set(names))
    index = {g: i for i, g in enumerate(groups)}
    group_of = np.array([index[n] for n in names], dtype=np.int64)
    tx, tf0 = target_tokens(recipe)
    spec = recipe.estimate
    subsets = sample_subsets(len(groups), spec.subsets, spec.subset_fraction, recipe.seed)
    start = time.perf_counter()
    est = estimate_subsets(x, f0, group_of, tx, tf0, subsets, spec.l2, spec.max_iter, spec.tol)
    seconds = time.perf_counter() - start
    np.save(out / "subsets.npy", est.subsets, allow_pickle=False)
    np.save(out / "loss.npy", est.loss, allow_pickle=False)
    pl.DataFrame({"id": ids, "group": names}).write_parquet(out / "assignments.parquet")
    (out / "groups.json").write_text(json.dumps(groups))
    return {"groups": len(groups), "subsets": len(subsets), "subset_size": int(subsets[0].sum()),
            "base_loss": est.base_loss, "loss_min": float(est.loss.min()), "loss_max": float(est.loss.max()),
            "solver_iterations": est.iterations, "unconverged": est.unconverged, "seconds": round(seconds, 3)}


def read_estimates(recipe: Recipe) -> tuple[list[str], np.ndarray, np.ndarray]:
    folder = recipe.run_dir / "estimate"
    return (json.loads((folder / "groups.json").read_text()), np.load(folder / "subsets.npy"),
            np.load(folder / "loss.npy"))
