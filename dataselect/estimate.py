"""Stage 4, first-order estimates: the target loss after fine-tuning on a subset S, without training.

Fine-tuning on S moves the parameters along −∇L_S, S's token-averaged loss, with meta-init's
learning rate; to first order the target's loss then changes by −Σ_k η_k ⟨∇L_target(θ_k), ∇L_S(θ_k)⟩
over the points θ_k of meta-init's path (η_k: the learning rate spent near θ_k). The sketches
hold each example's summed-loss gradient at every point (weighted by √η_k), so

    f̂(S) = L⁰ − ⟨ḡ_target, Σ_{j∈S} g_j⟩ / Σ_{j∈S} T_j,

with L⁰ the target's validation loss at the base model, ḡ_target its gradient's sketch (per
token) and T_j the response tokens of example j. Only two numbers per group enter — the sum of
its examples' inner products with ḡ_target and its token count — so thousands of subsets cost
two matrix-vector products, whatever the number of rows.
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
from .recipe import Recipe
from .sketch import stacked_sources, target_sketches


def sample_subsets(n_groups: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """m random subsets of round(fraction·n) groups each, as a boolean membership matrix."""
    size = min(n_groups, max(1, round(fraction * n_groups)))
    rng = np.random.default_rng(seed)
    members = np.zeros((m, n_groups), dtype=bool)
    for row in members:
        row[rng.choice(n_groups, size=size, replace=False)] = True
    return members


def alignments(x: np.ndarray, target: np.ndarray, group_of: np.ndarray, n_groups: int,
               block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """One streamed pass over a (memory-mapped) sketch array: each row's inner product with the
    target gradient, and each group's summed sketch (groups × d), which is all the target side
    of a group's interval needs."""
    inner, sums = [], torch.zeros((n_groups, x.shape[1]), dtype=torch.float64)
    for i in range(0, len(x), block):
        rows = np.asarray(x[i : i + block], dtype=np.float64)
        inner.append(rows @ target)
        sums.index_add_(0, torch.from_numpy(np.asarray(group_of[i : i + block], dtype=np.int64)), torch.from_numpy(rows))
    return (np.concatenate(inner) if inner else np.zeros(0)), sums.numpy()


@dataclass
class Pool:
    """What the estimate of any subset of groups needs: per group, the summed inner product of its
    examples' gradients with the target's, and its response tokens; the target's loss at the base.
    For the groups' intervals, also each group's inner product with every target example."""

    ids: list[str]
    names: list[str]  # each example's group
    groups: list[str]
    group_of: np.ndarray  # each example's index into groups
    alignment: np.ndarray  # per example: ⟨g_j, ḡ_target⟩
    tokens: np.ndarray  # per example: response tokens
    base_loss: float
    per_target: np.ndarray  # groups × target examples: ⟨Σ_{j∈g} g_j, h_t⟩, h_t target example t's summed-loss gradient
    target_tokens: np.ndarray  # per target example: response tokens

    def group_sums(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.groups)
        return (np.bincount(self.group_of, weights=self.alignment, minlength=n),
                np.bincount(self.group_of, weights=self.tokens, minlength=n))

    def group_effects(self) -> pl.DataFrame:
        """Per group: its summed alignment, tokens, and its own first-order effect L⁰ − f̂({g})
        (alignment per token: the drop in target loss per step of training on it alone) with the
        95% interval of that ratio. Both sides are samples: the group's examples of its source,
        and the validation examples of the target task. The interval adds the two ratio
        estimators' variances (over the group's examples, and over the target's); that counts
        their interaction twice, so it errs wide by a term of order 1/(examples × target rows).
        Written once here, so selection reads a few numbers per group instead of every sketch."""
        n = len(self.groups)
        count = np.bincount(self.group_of, minlength=n).astype(np.float64)
        alignment, tokens = self.group_sums()
        per_token = alignment / np.maximum(tokens, 1.0)
        resid = self.alignment - per_token[self.group_of] * self.tokens
        se_examples = _ratio_se(np.bincount(self.group_of, weights=resid**2, minlength=n), count, tokens)
        m = len(self.target_tokens)
        by_target = self.per_target / np.maximum(tokens, 1.0)[:, None]  # per pool token, with each h_t
        resid_t = by_target - per_token[:, None] * self.target_tokens[None, :]
        se_target = _ratio_se((resid_t**2).sum(1), np.full(n, float(m)), np.full(n, self.target_tokens.sum()))
        return pl.DataFrame({"group": self.groups, "alignment": alignment, "tokens": tokens, "per_token": per_token,
                             "ci95": 1.96 * np.hypot(se_examples, se_target),
                             "ci95_examples": 1.96 * se_examples, "ci95_target": 1.96 * se_target})

    def evaluate(self, membership: np.ndarray) -> np.ndarray:
        """f̂(S) for each row of `membership` (subsets × groups): the estimated target loss."""
        return subset_losses(membership, *self.group_sums(), self.base_loss)


def subset_losses(membership: np.ndarray, alignment: np.ndarray, tokens: np.ndarray, base_loss: float) -> np.ndarray:
    """f̂(S) = L⁰ − Σ_{g∈S} alignment_g / Σ_{g∈S} tokens_g for each row of `membership` (subsets ×
    groups), from each group's summed alignment and response tokens (`group_gradients.parquet`)."""
    member = np.atleast_2d(membership).astype(np.float64)
    return base_loss - (member @ alignment) / np.maximum(member @ tokens, 1.0)


def _ratio_se(squared_residuals: np.ndarray, count: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The standard error of a ratio estimator Σa/Σt over `count` samples (the delta method), from
    its summed squared residuals a − ratio·t."""
    spread = squared_residuals / np.maximum(count - 1, 1)
    return np.sqrt(spread / np.maximum(count, 1)) / np.maximum(tokens / np.maximum(count, 1), 1e-30)


def load_pool(recipe: Recipe, ingested: Ingested, sketches: Sketches) -> Pool:
    """Every source example's alignment with the target's gradient and its tokens, by group.

    The target's loss is its validation loss at the base model (mean token cross-entropy of the
    responses), and its gradient the sketch of that loss's gradient along the path: fine-tuning on
    S changes the loss, to first order, by minus the inner product of this with S's gradient."""
    examples = ingested.examples()
    ids, names, x, _ = stacked_sources(recipe, examples, sketches)
    target_ids, target_x, target_loss = target_sketches(sketches)
    lengths = response_tokens(examples)
    target_tokens = np.array([lengths[i] for i in target_ids], dtype=np.float64)
    target_x = np.asarray(target_x, dtype=np.float64)
    target = target_x.sum(0) / target_tokens.sum()
    groups = sorted(set(names))
    index = {g: i for i, g in enumerate(groups)}
    group_of = np.array([index[n] for n in names], dtype=np.int64)
    alignment, group_sketches = alignments(x, target, group_of, len(groups))
    return Pool(ids, names, groups, group_of, alignment, np.array([lengths[i] for i in ids], dtype=np.float64),
                float(np.sum(target_loss, dtype=np.float64) / target_tokens.sum()), group_sketches @ target_x.T,
                target_tokens)


def stage(recipe: Recipe, out: Path, ingested: Ingested, sketches: Sketches) -> dict:
    """Sample subsets of groups, estimate each, and keep everything selection needs as files."""
    pool = load_pool(recipe, ingested, sketches)
    spec = recipe.estimate
    subsets = sample_subsets(len(pool.groups), spec.subsets, spec.subset_fraction, recipe.seed)
    start = time.perf_counter()
    loss = pool.evaluate(subsets)
    seconds = time.perf_counter() - start
    Estimates(out).write(pool.groups, subsets, loss, pl.DataFrame({"id": pool.ids, "group": pool.names}),
                         pool.group_effects())
    return {"groups": len(pool.groups), "subsets": len(subsets), "subset_size": int(subsets[0].sum()),
            "base_loss": pool.base_loss, "loss_min": float(loss.min()), "loss_max": float(loss.max()),
            "seconds": round(seconds, 3)}
