"""Stage 4, first-order estimates: the target loss after fine-tuning on a subset S, without training.

Fine-tuning on S moves the parameters along −∇L_S, S's token-averaged loss; to first order the
target's loss then changes by −Σ_k η_k ⟨∇L_target(θ_k), step_S(θ_k)⟩ over the points θ_k of
meta-init's path (η_k: the learning rate spent near θ_k). The sketches hold each example's
summed-loss gradient at every point (weighted by √η_k). Fine-tunes use AdamW, whose step is the
gradient divided by the root of its mean square over batches: signal plus batch noise. So a
subset whose gradient is large (a few short answers, each token near-certain to move) does not
step further than one whose gradient is small; its direction is what counts. With one such
scale for all coordinates,

    f̂(S) = L⁰ − (K_S / K) c_S ⟨ḡ_target, Σ_{j∈S} g_j⟩ / Σ_{j∈S} T_j,   c_S = √((s_pool + n_pool) / (s_S + n_S)),

with L⁰ the target's validation loss at the base model, ḡ_target its gradient's sketch (per
token), T_j the response tokens of example j, s_S = ‖ḡ_S‖² the squared length of S's per-token
gradient and n_S the spread of a batch's mean about it (the delta method, meta-init's batch
size, a batch drawn without replacement from S's rows as a shuffled epoch draws it). K_S / K
is how many steps the fine-tune of S takes against the whole pool's: with the recipe's epochs
over S's rows (`budget="epochs"`, how `verify` and a user's trainer fine-tune a mixture) it is
S's share of the pool's rows, so a half-sized subset takes half the steps; at a fixed number of
steps (`budget="steps"`) it is 1, and what is left is the value of one step.
c_pool = 1: the whole pool's estimate is meta-init's own step. Every quantity is a sum over
examples, so each group contributes a few numbers and two rows of group × group inner products,
and thousands of subsets cost a few small matrix products, whatever the number of rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .artifacts import Estimates, Ingested, Sketches
from .examples import response_tokens
from .recipe import Recipe, Training
from .sketch import stacked_sources, target_sketches


def sample_subsets(n_groups: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """m random subsets of round(fraction·n) groups each, as a boolean membership matrix."""
    size = min(n_groups, max(1, round(fraction * n_groups)))
    rng = np.random.default_rng(seed)
    members = np.zeros((m, n_groups), dtype=bool)
    for row in members:
        row[rng.choice(n_groups, size=size, replace=False)] = True
    return members


def alignments(x: np.ndarray, target: np.ndarray, group_of: np.ndarray, tokens: np.ndarray, n_groups: int,
               block: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One streamed pass over a (memory-mapped) sketch array: each row's inner product with the
    target gradient and its squared length; each group's summed sketch Σg_j and token-weighted
    sketch ΣT_j·g_j (groups × d), which is all the step scale and the target side of a group's
    interval need."""
    inner, squares = [], []
    sums = torch.zeros((n_groups, x.shape[1]), dtype=torch.float64)
    weighted, target = torch.zeros_like(sums), torch.from_numpy(np.asarray(target, np.float64))
    for i in range(0, len(x), block):
        rows = torch.from_numpy(np.asarray(x[i : i + block], dtype=np.float64))
        index = torch.from_numpy(np.asarray(group_of[i : i + block], dtype=np.int64))
        inner.append((rows @ target).numpy())
        squares.append((rows * rows).sum(1).numpy())
        sums.index_add_(0, index, rows)
        weighted.index_add_(0, index, rows * torch.from_numpy(np.asarray(tokens[i : i + block], np.float64))[:, None])
    empty = np.zeros(0)
    return (np.concatenate(inner) if inner else empty, np.concatenate(squares) if squares else empty,
            sums.numpy(), weighted.numpy())


@dataclass(frozen=True)
class GroupSums:
    """Per group, sums over its examples j (any subset's are the sums of its groups'): ⟨g_j,
    ḡ_target⟩, T_j, 1, ‖g_j‖², T_j²; and between groups, ⟨Σ_g g_j, Σ_h g_j⟩ (`gram`) and ⟨Σ_g
    T_j g_j, Σ_h g_j⟩ (`cross`), from which any subset's squared gradient length and batch spread
    follow. `batch`: the fine-tune's examples per step, which sets the batch noise."""

    alignment: np.ndarray
    tokens: np.ndarray
    count: np.ndarray
    squares: np.ndarray
    token_squares: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    batch: float

    def per_token(self, membership: np.ndarray) -> np.ndarray:
        """⟨ḡ_target, Σ_{j∈S} g_j⟩ / Σ_{j∈S} T_j: the drop per unit of plain gradient step."""
        member = _matrix(membership)
        return (member @ self.alignment) / np.maximum(member @ self.tokens, 1.0)

    def mean_square(self, membership: np.ndarray) -> np.ndarray:
        """s_S + n_S: the squared length of S's per-token gradient plus the variance of a batch's
        mean about it (Σ_{j∈B} g_j / Σ_{j∈B} T_j over `batch` examples, by the delta method). A
        fine-tune shuffles S's rows once per epoch and cuts them into batches, so a batch is drawn
        without replacement from S's N_S rows: its variance is the with-replacement one times
        (N_S − B) / (N_S − 1), which matters for a group of a few hundred rows or fewer (none for a
        group no larger than a batch, whose every step sees all of it)."""
        member = _matrix(membership)
        tokens, count = np.maximum(member @ self.tokens, 1.0), np.maximum(member @ self.count, 1.0)
        signal = _quadratic(member, self.gram) / tokens**2
        spread = (member @ self.squares - 2 * _quadratic(member, self.cross) / tokens
                  + (member @ self.token_squares) * signal) / count
        without_replacement = np.clip((count - self.batch) / np.maximum(count - 1.0, 1.0), 0.0, 1.0)
        return signal + without_replacement * np.maximum(spread, 0.0) / (self.batch * (tokens / count) ** 2)

    def training_lengths(self, membership: np.ndarray, budget: Training) -> np.ndarray:
        """K_S / K: the steps a fine-tune of S takes against the whole pool's. With the recipe's
        epochs over S, that is S's share of the pool's rows; at a fixed budget of steps, 1."""
        member = _matrix(membership)
        if budget == "steps":
            return np.ones(len(member))
        return (member @ self.count) / max(self.count.sum(), 1.0)

    def step_scales(self, membership: np.ndarray) -> np.ndarray:
        """c_S: how much longer AdamW's step on S is than on the whole pool, per unit of gradient."""
        pool = self.mean_square(np.ones(len(self.tokens)))
        return np.sqrt(pool / np.maximum(self.mean_square(membership), 1e-300))


def group_sums(recipe: Recipe, estimates: Estimates) -> GroupSums:
    """The groups' sums as the estimate stage stored them, in `estimates.read()`'s group order."""
    frame, (gram, cross) = estimates.group_gradients(), estimates.group_products()
    columns = [frame[c].to_numpy().astype(np.float64) for c in ("alignment", "tokens", "count", "squares", "token_squares")]
    return GroupSums(*columns, gram, cross, float(recipe.meta_init.batch_size))


def _quadratic(member: np.ndarray, products: np.ndarray) -> np.ndarray:
    """m_S · products · m_S for every subset's membership row m_S (one matrix product)."""
    return ((member @ products) * member).sum(1)


def _matrix(membership: np.ndarray) -> np.ndarray:
    return np.atleast_2d(membership).astype(np.float64)


def subset_losses(membership: np.ndarray, sums: GroupSums, base_loss: float, budget: Training) -> np.ndarray:
    """f̂(S) = L⁰ − (K_S / K) c_S ⟨ḡ_target, Σ_{j∈S} g_j⟩ / Σ_{j∈S} T_j for each row of
    `membership` (subsets × groups), from the groups' sums (`group_sums` reads a finished
    stage's). `budget="epochs"`: S fine-tuned for the recipe's epochs over its own rows, as
    `verify` does; `"steps"`: every subset fine-tuned for as many steps as the whole pool."""
    return base_loss - sums.training_lengths(membership, budget) * sums.step_scales(membership) \
        * sums.per_token(membership)


@dataclass
class Pool:
    """What the estimate of any subset of groups needs: the groups' sums and the target's loss at
    the base. For the groups' intervals, also each example's alignment and tokens, and each
    group's inner product with every target example."""

    ids: list[str]
    names: list[str]  # each example's group
    groups: list[str]
    group_of: np.ndarray  # each example's index into groups
    alignment: np.ndarray  # per example: ⟨g_j, ḡ_target⟩
    tokens: np.ndarray  # per example: response tokens
    base_loss: float
    per_target: np.ndarray  # groups × target examples: ⟨Σ_{j∈g} g_j, h_t⟩, h_t target example t's summed-loss gradient
    target_tokens: np.ndarray  # per target example: response tokens
    sums: GroupSums

    def group_effects(self) -> pl.DataFrame:
        """Per group: its summed alignment, tokens, the alignment per token, its step scale c_g and its own
        first-order effect L⁰ − f̂({g}) = c_g · alignment per token at a fixed budget of steps (the drop in
        target loss per step of training on it alone: what a group is worth whatever its size), with the
        95% interval of that effect. Both sides are samples: the group's examples of its source, and the
        validation examples of the target task. The interval adds the two ratio estimators' variances (over
        the group's examples, and over the target's), which counts their interaction twice, so it errs wide
        by a term of order 1/(examples × target rows); it takes c_g as known, so it measures the noise of
        the effect's sign, which is what the keep-rules test at `min_score: 0`. Written once here, so
        selection reads a few numbers per group instead of every sketch."""
        n = len(self.groups)
        count, tokens = self.sums.count, self.sums.tokens
        per_token = self.sums.alignment / np.maximum(tokens, 1.0)
        scale = self.sums.step_scales(np.eye(n))
        resid = self.alignment - per_token[self.group_of] * self.tokens
        se_examples = _ratio_se(np.bincount(self.group_of, weights=resid**2, minlength=n), count, tokens)
        m = len(self.target_tokens)
        by_target = self.per_target / np.maximum(tokens, 1.0)[:, None]  # per pool token, with each h_t
        resid_t = by_target - per_token[:, None] * self.target_tokens[None, :]
        se_target = _ratio_se((resid_t**2).sum(1), np.full(n, float(m)), np.full(n, self.target_tokens.sum()))
        return pl.DataFrame({"group": self.groups, "alignment": self.sums.alignment, "tokens": tokens,
                             "count": count, "squares": self.sums.squares, "token_squares": self.sums.token_squares,
                             "per_token": per_token, "scale": scale, "effect": scale * per_token,
                             "ci95": 1.96 * scale * np.hypot(se_examples, se_target),
                             "ci95_examples": 1.96 * scale * se_examples, "ci95_target": 1.96 * scale * se_target})

    def evaluate(self, membership: np.ndarray, budget: Training) -> np.ndarray:
        """f̂(S) for each row of `membership` (subsets × groups): the estimated target loss after
        S's fine-tune for the recipe's epochs (`"epochs"`) or for the pool's steps (`"steps"`)."""
        return subset_losses(membership, self.sums, self.base_loss, budget)


def _ratio_se(squared_residuals: np.ndarray, count: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The standard error of a ratio estimator Σa/Σt over `count` samples (the delta method), from
    its summed squared residuals a − ratio·t."""
    spread = squared_residuals / np.maximum(count - 1, 1)
    return np.sqrt(spread / np.maximum(count, 1)) / np.maximum(tokens / np.maximum(count, 1), 1e-30)


def load_pool(recipe: Recipe, ingested: Ingested, sketches: Sketches) -> Pool:
    """Every source example's alignment with the target's gradient and its tokens, by group.

    The target's loss is its validation loss at the base model (mean token cross-entropy of the
    responses), and its gradient the sketch of that loss's gradient along the path: fine-tuning on
    S changes the loss, to first order, by minus the inner product of this with S's step."""
    examples = ingested.examples()
    ids, names, x, _ = stacked_sources(recipe, examples, sketches)
    target_ids, target_x, target_loss = target_sketches(sketches)
    lengths = response_tokens(examples)
    return pool_of(ids, names, x, np.array([lengths[i] for i in ids], dtype=np.float64), target_x,
                   np.array([lengths[i] for i in target_ids], dtype=np.float64), target_loss,
                   recipe.meta_init.batch_size)


def pool_of(ids: list[str], names: list[str], x: np.ndarray, tokens: np.ndarray, target_x: np.ndarray,
            target_tokens: np.ndarray, target_loss: np.ndarray, batch: int) -> Pool:
    """The pool from the sketches: each source example's (x, its response tokens, its group name)
    and each target example's (sketch, tokens, summed loss at the base)."""
    target_x = np.asarray(target_x, dtype=np.float64)
    target = target_x.sum(0) / target_tokens.sum()
    groups = sorted(set(names))
    index = {g: i for i, g in enumerate(groups)}
    group_of = np.array([index[n] for n in names], dtype=np.int64)
    alignment, squares, summed, weighted = alignments(x, target, group_of, tokens, len(groups))
    n = len(groups)

    def by_group(values: np.ndarray) -> np.ndarray:
        return np.bincount(group_of, weights=values, minlength=n)

    sums = GroupSums(by_group(alignment), by_group(tokens), by_group(np.ones(len(tokens))), by_group(squares),
                     by_group(tokens**2), summed @ summed.T, weighted @ summed.T, float(batch))
    return Pool(ids, names, groups, group_of, alignment, tokens,
                float(np.sum(target_loss, dtype=np.float64) / target_tokens.sum()), summed @ target_x.T,
                target_tokens, sums)


def stage(recipe: Recipe, out: Path, ingested: Ingested, sketches: Sketches) -> dict:
    """Sample subsets of groups, estimate each, and keep everything selection needs as files. The
    subsets' estimates are at a fixed budget of steps: selection asks which mixture of a budget
    is best."""
    pool = load_pool(recipe, ingested, sketches)
    spec = recipe.estimate
    subsets = sample_subsets(len(pool.groups), spec.subsets, spec.subset_fraction, recipe.seed)
    start = time.perf_counter()
    loss = pool.evaluate(subsets, budget="steps")
    seconds = time.perf_counter() - start
    Estimates(out).write(pool.groups, subsets, loss, pl.DataFrame({"id": pool.ids, "group": pool.names}),
                         pool.group_effects(), np.stack([pool.sums.gram, pool.sums.cross]))
    return {"groups": len(pool.groups), "subsets": len(subsets), "subset_size": int(subsets[0].sum()),
            "base_loss": pool.base_loss, "loss_min": float(loss.min()), "loss_max": float(loss.max()),
            "seconds": round(seconds, 3)}
