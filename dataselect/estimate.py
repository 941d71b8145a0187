"""Stage 4, first-order estimates: the target loss after fine-tuning on a subset S, without training.

Fine-tuning on S, linearised around θ* inside the sketch subspace θ = θ* + P w, is the
logistic regression

    ŵ_S = argmin_w  mean_{j∈S} ℓ(F⁰_j + ĝ_j·w) + λ‖w‖²,    ℓ(m) = log(1 + e^{−m}),

with the offsets F⁰_j kept (the research code drops them). The target estimate is the target's
validation token cross-entropy at θ* + P ŵ_S to first order, L⁰ + ŵ_S·ĝ_L, from the sketch ĝ_L
of that loss's gradient at θ*: no model pass (`exact` mode makes one).
λ is `estimate.l2` times the mean squared sketch norm, which makes it independent of the model's
gradient scale; it sets how far the linearised fine-tune moves from θ*.

All subsets are solved together: Newton-like steps preconditioned by the pool's Hessian at
w = 0, on a batch of subsets at a time (two matrix products per step).
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
    base_loss: float  # the same at θ* (the empty subset), measured
    iterations: int
    unconverged: int
    steps: np.ndarray  # (m, d) ŵ_S


def sample_subsets(n_groups: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """m random subsets of round(fraction·n) groups each, as a boolean membership matrix."""
    size = min(n_groups, max(1, round(fraction * n_groups)))
    rng = np.random.default_rng(seed)
    members = np.zeros((m, n_groups), dtype=bool)
    for row in members:
        row[rng.choice(n_groups, size=size, replace=False)] = True
    return members


def solve_subsets(x: torch.Tensor, f0: torch.Tensor, weights: torch.Tensor, lam: float, max_iter: int,
                  tol: float, precond: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """ŵ for each row of `weights` (subsets × examples, rows summing to 1).

    Newton-like steps w ← w − P⁻¹∇f_S(w) with one preconditioner shared by all subsets, the
    pool's Hessian at w = 0 (`pool_preconditioner`); a step that raises a subset's objective is
    halved for that subset. Each step costs two matrix products over the batch of subsets.
    Returns (w, steps run, subsets whose gradient norm is still above tol × its value at w = 0).
    """
    m, d = weights.shape[0], x.shape[1]
    chol = torch.linalg.cholesky(precond if precond is not None else pool_preconditioner(x, f0, lam))
    w = torch.zeros(m, d, dtype=x.dtype)
    step = torch.ones(m, 1, dtype=x.dtype)
    loss, grad = _objective(x, f0, weights, lam, w)
    g0 = grad.norm(dim=1).clamp(min=1e-30)
    it = 0
    for it in range(1, max_iter + 1):
        if bool((grad.norm(dim=1) <= tol * g0).all()):
            break
        proposal = w - step * torch.cholesky_solve(grad.T, chol).T
        new_loss, new_grad = _objective(x, f0, weights, lam, proposal)
        better = (new_loss <= loss + 1e-5 * loss.abs()).unsqueeze(1)  # float32 rounding is no overshoot
        w = torch.where(better, proposal, w)
        grad = torch.where(better, new_grad, grad)
        loss = torch.where(better.squeeze(1), new_loss, loss)
        step = torch.where(better, step, step / 2)
    unconverged = int((grad.norm(dim=1) > tol * g0).sum())
    return w, it, unconverged


def pool_preconditioner(x: torch.Tensor, f0: torch.Tensor, lam: float) -> torch.Tensor:
    """Hessian of the objective at w = 0 over the whole pool: Xᵀ diag(σ'(F⁰)/n) X + 2λI."""
    curvature = torch.sigmoid(f0) * torch.sigmoid(-f0) / len(f0)
    return (x.T * curvature) @ x + 2 * lam * torch.eye(x.shape[1], dtype=x.dtype)


def _objective(x, f0, weights, lam, w) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-subset mean logistic loss + λ‖w‖², and its gradient."""
    margins = f0 + w @ x.T  # (m, n)
    loss = (weights * nnf.softplus(-margins)).sum(1) + lam * (w * w).sum(1)
    grad = -(weights * torch.sigmoid(-margins)) @ x + 2 * lam * w
    return loss, grad


def target_loss(gradient: torch.Tensor, base: float, w: torch.Tensor) -> torch.Tensor:
    """The target's token cross-entropy at θ* + P w for each row of w, to first order."""
    return base + w @ gradient


def reference_steps(x: torch.Tensor, weights: torch.Tensor, bound: float) -> torch.Tensor:
    """The research code's estimator, in closed form: its all-positive logistic fit at C = 1e-4
    (random labels, flipped signs, no offsets) is the subset's mean sketch direction, rescaled to
    a fixed norm."""
    mean = weights @ x
    return bound * mean / mean.norm(dim=1, keepdim=True).clamp(min=1e-30)


def clip_norm(w: torch.Tensor, bound: float | None) -> torch.Tensor:
    if bound is None:
        return w
    return w * (bound / w.norm(dim=1, keepdim=True).clamp(min=1e-30)).clamp(max=1.0)


def estimate_subsets(x: np.ndarray, f0: np.ndarray, group_of: np.ndarray, target_grad: np.ndarray,
                     target_base: float, subsets: np.ndarray, l2: float, max_iter: int, tol: float,
                     solver: str = "logistic", bound: float | None = None, chunk: int = 256) -> Estimates:
    """f̂(S) (first-order target loss) and ŵ_S for every subset row of `subsets`, in chunks.

    `bound` limits ‖ŵ‖ (the sketch-space image of the radius); the reference solver needs it.
    """
    xt = torch.from_numpy(np.array(x, dtype=np.float32))
    ft = torch.from_numpy(np.array(f0, dtype=np.float32))
    tg = torch.from_numpy(np.array(target_grad, dtype=np.float32))
    lam = l2 * float((xt**2).sum(1).mean())
    precond = pool_preconditioner(xt, ft, lam) if solver == "logistic" else None
    losses, steps, its, bad = [], [], 0, 0
    for start in range(0, len(subsets), chunk):
        member = torch.from_numpy(subsets[start : start + chunk][:, group_of]).float()  # (c, n)
        weights = member / member.sum(1, keepdim=True).clamp(min=1)
        if solver == "reference":
            w = reference_steps(xt, weights, bound)
        else:
            w, it, unconverged = solve_subsets(xt, ft, weights, lam, max_iter, tol, precond)
            w, its, bad = clip_norm(w, bound), max(its, it), bad + unconverged
        losses.append(target_loss(tg, target_base, w).numpy())
        steps.append(w.numpy())
    return Estimates(subsets=subsets, loss=np.concatenate(losses), base_loss=target_base, iterations=its,
                     unconverged=bad, steps=np.concatenate(steps))


def exact_losses(recipe: Recipe, steps: np.ndarray) -> np.ndarray:
    """Target validation token cross-entropy from a real forward pass at θ* + Pŵ for each ŵ.

    Pŵ is lifted layer by layer: with Kronecker factors, layer l's part is P_out ŵ_l P_inᵀ where
    ŵ_l is ŵ reshaped to k_out × k_in — one small product per layer, never the p × d matrix.
    """
    from .model import load_tokenizer, mean_token_loss, progress
    from .sketch import sketch_space
    from .sources import read_ingested, token_rows, usable

    model, modules, projector = sketch_space(recipe)
    rows = token_rows(usable(read_ingested(recipe), "validation"))
    pad = load_tokenizer(recipe).pad_token_id
    originals = {n: m.weight.detach().clone() for n, m in modules.items()}
    out = np.zeros(len(steps))
    with torch.no_grad():
        for s, w in enumerate(progress(iterable=steps, desc="exact estimates", unit="subset")):
            set_step(modules, projector, originals, torch.from_numpy(w))
            out[s] = mean_token_loss(model, rows, recipe.sketch.batch_size, pad)
    return out


def set_step(modules, projector, originals: dict, w: torch.Tensor) -> None:
    """Set the sketched weights to θ* + Pw, layer by layer: P_out w_l P_inᵀ with w_l = w reshaped."""
    with torch.no_grad():
        for name, m in modules.items():
            p_out, p_in = projector.factors(name)
            m.weight.copy_(originals[name] + p_out @ w.reshape(p_out.shape[1], p_in.shape[1]) @ p_in.T)


@dataclass
class Pool:
    """Every source example's sketch, loaded once, and what the estimate of a subset needs."""

    recipe: Recipe
    ids: list[str]
    names: list[str]  # each example's group
    groups: list[str]
    group_of: np.ndarray  # each example's index into groups
    x: np.ndarray
    f0: np.ndarray
    target_grad: np.ndarray  # (d,) sketch of the target validation loss's gradient at θ*
    target_base: float  # that loss at θ*

    def evaluate(self, membership: np.ndarray, l2: float | None = None) -> Estimates:
        """Estimates of the subsets in `membership` (subsets × groups) with the recipe's solver and
        target mode; `l2` overrides the recipe's."""
        spec = self.recipe.estimate
        bound = None if spec.radius is None else spec.radius / self.step_scale()
        est = estimate_subsets(self.x, self.f0, self.group_of, self.target_grad, self.target_base, membership,
                               spec.l2 if l2 is None else l2, spec.max_iter, spec.tol, spec.solver, bound)
        if spec.target == "exact":
            est.loss = exact_losses(self.recipe, est.steps)
        return est

    def step_scale(self) -> float:
        """‖Pŵ‖ / ‖ŵ‖ ≈ √(p/d) for this projection (E[PᵀP] = (p/d)·I)."""
        return math.sqrt(grad_dim(self.recipe) / self.recipe.sketch.dim)


def load_pool(recipe: Recipe) -> Pool:
    from .sketch import stacked_sources, target_gradient
    from .sources import read_ingested

    ids, names, x, f0 = stacked_sources(recipe, read_ingested(recipe))
    groups = sorted(set(names))
    index = {g: i for i, g in enumerate(groups)}
    group_of = np.array([index[n] for n in names], dtype=np.int64)
    return Pool(recipe, ids, names, groups, group_of, np.asarray(x), f0, *target_gradient(recipe))


def stage(recipe: Recipe, out: Path) -> dict:
    """Sample subsets of groups, estimate each, and keep everything selection needs as files."""
    pool = load_pool(recipe)
    spec = recipe.estimate
    subsets = sample_subsets(len(pool.groups), spec.subsets, spec.subset_fraction, recipe.seed)
    start = time.perf_counter()
    est = pool.evaluate(subsets)
    seconds = time.perf_counter() - start
    np.save(out / "subsets.npy", est.subsets, allow_pickle=False)
    np.save(out / "loss.npy", est.loss, allow_pickle=False)
    np.save(out / "steps.npy", est.steps, allow_pickle=False)
    pl.DataFrame({"id": pool.ids, "group": pool.names}).write_parquet(out / "assignments.parquet")
    (out / "groups.json").write_text(json.dumps(pool.groups))
    norms = np.linalg.norm(est.steps, axis=1) * pool.step_scale()
    return {"groups": len(pool.groups), "subsets": len(subsets), "subset_size": int(subsets[0].sum()),
            "solver": spec.solver, "target": spec.target, "base_loss": est.base_loss,
            "loss_min": float(est.loss.min()), "loss_max": float(est.loss.max()),
            "step_norm_median": float(np.median(norms)), "solver_iterations": est.iterations,
            "unconverged": est.unconverged, "seconds": round(seconds, 3)}


def step_norms(recipe: Recipe, finetuned: list[Path]) -> list[float]:
    """‖θ_S − θ*‖ over the sketched layers for fine-tunes saved like meta-init's
    `theta.safetensors` (the trainable parameters): how far real fine-tunes land from θ*, the
    distance the estimator's steps ‖Pŵ‖ stand for (`verify` reports both)."""
    from safetensors.torch import load_file

    from .sketch import sketch_space

    _, modules, _ = sketch_space(recipe)
    star = {f"{name}.weight": module.weight.detach() for name, module in modules.items()}
    norms = []
    for path in finetuned:
        state = load_file(str(path))
        missing = sorted(set(star) - set(state))
        if missing:
            raise ValueError(f"{path}: no tensor {missing[0]}; save the fine-tune's trainable parameters")
        norms.append(math.sqrt(sum(float((state[k] - v).square().sum()) for k, v in star.items())))
    return norms


def grad_dim(recipe: Recipe) -> int:
    """p, the number of sketched weights: ‖Pw‖ ≈ √(p/d)‖w‖ for this projection."""
    from .sketch import finished_settings

    return finished_settings(recipe)["grad_dim"]


def read_estimates(recipe: Recipe) -> tuple[list[str], np.ndarray, np.ndarray]:
    folder = recipe.run_dir / "estimate"
    return (json.loads((folder / "groups.json").read_text()), np.load(folder / "subsets.npy"),
            np.load(folder / "loss.npy"))
