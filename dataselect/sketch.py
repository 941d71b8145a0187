"""Stage 3, gradient sketches: per-example ∇F at θ* and F⁰, randomly projected to `dim`.

F is the mean log-odds of the gold response tokens, logit(p) = log p − log(1 − p), computed from
log-softmax so it stays finite for any p. The projection P (p × d, Rademacher ±1/√d) is generated
per parameter tensor from a hash of (seed, tensor name), so the full matrix never exists at once
and the same seed gives the same sketch in any process.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, jacrev, vmap

from .model import pad_batch, progress, response_logprobs, trainable_parameters
from .recipe import Recipe

OUTPUT_FUNCTION = "mean_log_odds"
PROJECTION = "rademacher_per_tensor"


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """logit(p) from log p, stable for p → 0; p → 1 is clamped at about 1 − 1e-6."""
    logp = logp.clamp(max=-1e-6)
    return logp - torch.log(-torch.expm1(logp))


def output_function(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """F per example: mean log-odds of the gold next token over response positions."""
    gold = response_logprobs(logits, input_ids, target_mask)
    odds = torch.where(target_mask, log_odds(gold), torch.zeros_like(gold))
    return odds.sum(-1) / target_mask.sum(-1).clamp(min=1)


class Projector:
    """x ↦ Pᵀx for a seeded Rademacher P, built one parameter tensor at a time.

    Blocks are cached while they fit in `cache_bytes`; beyond that they are regenerated per
    call, which is slower but never holds more than one tensor's block.
    """

    def __init__(self, sizes: dict[str, int], dim: int, seed: int, cache_bytes: int = 1 << 30):
        self.sizes, self.dim, self.seed = dict(sizes), dim, seed
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_ok = sum(sizes.values()) * dim * 4 <= cache_bytes

    def block(self, name: str) -> torch.Tensor:
        if name in self._cache:
            return self._cache[name]
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        signs = torch.randint(0, 2, (self.sizes[name], self.dim), generator=gen, dtype=torch.int8)
        block = (signs.float() * 2 - 1) / math.sqrt(self.dim)
        if self._cache_ok:
            self._cache[name] = block
        return block

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over tensors of g_k P_k: (batch, p_k) @ (p_k, d)."""
        out = None
        for name, g in grads.items():
            part = g.reshape(g.shape[0], -1).float() @ self.block(name)
            out = part if out is None else out + part
        return out


def per_example_gradients(model, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """∇_θ F and F for every example of a padded batch, via vmap over single-example grads."""
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    frozen.update(dict(model.named_buffers()))

    def f(p, ids, attention, target):
        logits = functional_call(model, {**frozen, **p}, (ids[None],), {"attention_mask": attention[None]}).logits
        return output_function(logits, ids[None], target[None])[0]

    grads, values = vmap(grad_and_value(f), in_dims=(None, 0, 0, 0))(
        params, batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    return grads, values


def sketch_rows(model, rows: list[tuple[list[int], int]], projector: Projector, batch_size: int, pad_id: int,
                desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Sketches (n × d) and F⁰ (n) in the order of `rows`; batches are formed by length."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    sketches = np.zeros((len(rows), projector.dim), dtype=np.float32)
    f0 = np.zeros(len(rows), dtype=np.float32)
    with progress(total=len(rows), desc=desc, unit="ex") as bar:
        for start in range(0, len(rows), batch_size):
            idx = order[start : start + batch_size]
            grads, values = per_example_gradients(model, pad_batch([rows[i] for i in idx], pad_id))
            sketches[idx] = projector.project(grads).numpy()
            f0[idx] = values.numpy()
            bar.update(len(idx))
    return sketches, f0


def sketch_tokens(model, rows: list[tuple[list[int], int]], projector: "Projector", batch_size: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token sketches and log-odds of the target's response tokens, and each token's example.

    The target's loss is token cross-entropy, and −log p = ℓ(logit p) exactly per token, so it
    linearises token by token; a per-example mean of log-odds would hide the few tokens that
    decide an answer among many already-fitted ones.
    """
    sketches, odds, owner = [], [], []
    with progress(total=len(rows), desc="target tokens", unit="ex") as bar:
        for start in range(0, len(rows), batch_size):
            batch = pad_batch(rows[start : start + batch_size], pad_id)
            grads, values = per_token_gradients(model, batch)
            n, width = values.shape
            flat = projector.project({k: g.reshape(n * width, -1) for k, g in grads.items()}).reshape(n, width, -1)
            mask = batch["target_mask"]
            sketches.append(flat[mask].numpy())
            odds.append(values[mask].numpy())
            owner.append((torch.arange(n).unsqueeze(1).expand(n, width)[mask] + start).numpy())
            bar.update(n)
    return np.concatenate(sketches), np.concatenate(odds), np.concatenate(owner)


def write_store(folder: Path, ids: list[str], sketches: np.ndarray, f0: np.ndarray) -> None:
    """One store: plain .npy arrays (no pickle) and the example ids in row order."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "sketches.npy", sketches, allow_pickle=False)
    np.save(folder / "f0.npy", f0, allow_pickle=False)
    (folder / "ids.json").write_text(json.dumps(ids))


def read_store(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids = json.loads((folder / "ids.json").read_text())
    return (ids, np.load(folder / "sketches.npy", mmap_mode="r", allow_pickle=False),
            np.load(folder / "f0.npy", allow_pickle=False))


def cluster(sketches: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means (FAISS) on the sketches: groups of examples with similar gradients."""
    import faiss

    x = np.ascontiguousarray(sketches, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, max_points_per_centroid=len(x))
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def parameter_summary(model) -> dict:
    params = trainable_parameters(model)
    return {"count": sum(p.numel() for p in params.values()), "tensors": len(params),
            "names_sha256": hashlib.sha256("\n".join(params).encode()).hexdigest()[:16]}


def stage(recipe: Recipe, out: Path) -> dict:
    """One store per source and one for the target's validation split, plus cluster labels."""
    from .model import load_theta_star, load_tokenizer
    from .sources import read_ingested, token_rows, usable

    examples = read_ingested(recipe)
    model = load_theta_star(recipe)
    pad_id = load_tokenizer(recipe).pad_token_id
    sizes = {n: p.numel() for n, p in trainable_parameters(model).items()}
    projector = Projector(sizes, recipe.sketch.dim, recipe.seed)
    parts = [(s.name, usable(examples, "source", s.name), out / "sources" / s.name, s.clusters)
             for s in recipe.sources]
    counts = {}
    for name, part, folder, clusters in parts:
        sketches, f0 = sketch_rows(model, token_rows(part), projector, recipe.sketch.batch_size, pad_id, name)
        write_store(folder, part["id"].to_list(), sketches, f0)
        if clusters:
            np.save(folder / "clusters.npy", cluster(sketches, clusters, recipe.seed), allow_pickle=False)
        counts[name] = len(part)
    target = usable(examples, "validation")
    folder = out / "target" / "validation"
    sketches, f0 = sketch_rows(model, token_rows(target), projector, recipe.sketch.batch_size, pad_id,
                               "target validation")
    write_store(folder, target["id"].to_list(), sketches, f0)
    tokens, odds, owner = sketch_tokens(model, token_rows(target), projector, recipe.sketch.batch_size, pad_id)
    np.save(folder / "token_sketches.npy", tokens, allow_pickle=False)
    np.save(folder / "token_log_odds.npy", odds, allow_pickle=False)
    np.save(folder / "token_example.npy", owner, allow_pickle=False)
    counts["target validation"] = len(target)
    counts["target validation tokens"] = len(odds)
    theta = (recipe.run_dir / "meta_init" / "theta.safetensors").read_bytes()
    manifest = {"dim": recipe.sketch.dim, "seed": recipe.seed, "projection": PROJECTION,
                "output_function": OUTPUT_FUNCTION, "parameters": parameter_summary(model),
                "theta_sha256": hashlib.sha256(theta).hexdigest()[:16], "examples": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def stacked_sources(recipe: Recipe, examples) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """All source stores stacked: ids, each row's group (task value, cluster or source), sketches, F⁰."""
    from .sources import usable

    all_ids, names, xs, f0s = [], [], [], []
    for s in recipe.sources:
        folder = recipe.run_dir / "sketch" / "sources" / s.name
        ids, x, f0 = read_store(folder)
        all_ids += ids
        if s.clusters:
            names += [f"{s.name}/c{c}" for c in np.load(folder / "clusters.npy")]
        else:
            names += usable(examples, "source", s.name)["group"].to_list()
        xs.append(np.asarray(x))
        f0s.append(f0)
    return all_ids, names, np.concatenate(xs), np.concatenate(f0s)


def per_token_gradients(model, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """∇_θ logit(p_t) and logit(p_t) for every position t of every example (zeros off target)."""
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    frozen.update(dict(model.named_buffers()))

    def f(p, ids, attention, target):
        logits = functional_call(model, {**frozen, **p}, (ids[None],), {"attention_mask": attention[None]}).logits
        odds = log_odds(response_logprobs(logits, ids[None], target[None]))[0]
        out = torch.where(target, odds, torch.zeros_like(odds))
        return out, out

    grads, values = vmap(jacrev(f, has_aux=True), in_dims=(None, 0, 0, 0))(
        params, batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    return grads, values
