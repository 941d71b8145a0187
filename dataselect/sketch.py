"""Stage 3, gradient sketches: per-example ∇F at θ* and F⁰, randomly projected to `dim`.

F is the mean log-odds of the gold response tokens, logit(p) = log p − log(1 − p), computed from
log-softmax so it stays finite for any p. Per-example gradients come from one batched forward and
one backward pass: hooks on the sketched linear layers keep each layer's inputs x and catch its
output gradients δ, and the projection of Σ_t δ_t x_tᵀ is formed from those directly
(`projection.py`). The backward pass computes activation gradients only — no weight gradient is
ever formed — so a sketch costs about what a training step costs.

Which weights are sketched: the LoRA adapters (lora_A, lora_B) when the model has them, otherwise
every linear layer not tied to the input embeddings; or the layers matched by `sketch.modules`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .model import ModelError, pad_batch, progress, response_logprobs
from .projection import KIND as PROJECTION
from .projection import KroneckerProjector
from .recipe import Recipe
from .shards import Shard, check_complete, chunk_file, load_chunk, save_chunk, write_done
from .store import SketchStore, read_store

OUTPUT_FUNCTION = "mean_log_odds"


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """logit(p) from log p, stable for p → 0; p → 1 is clamped at about 1 − 1e-6."""
    logp = logp.clamp(max=-1e-6)
    return logp - torch.log(-torch.expm1(logp))


def output_function(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """F per example: mean log-odds of the gold next token over response positions."""
    gold = response_logprobs(logits, input_ids, target_mask)
    odds = torch.where(target_mask, log_odds(gold), torch.zeros_like(gold))
    return odds.sum(-1) / target_mask.sum(-1).clamp(min=1)


def sketched_modules(model, patterns: list[str] | tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The linear layers whose weights are sketched, checked to be weights meta-init trained."""
    embedding = model.get_input_embeddings().weight
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if patterns:
        chosen = {n: m for n, m in linears.items() if any(fnmatch(n, p) for p in patterns)}
    elif any(".lora_A." in n for n in linears):
        chosen = {n: m for n, m in linears.items() if ".lora_A." in n or ".lora_B." in n}
    else:
        chosen = {n: m for n, m in linears.items() if m.weight is not embedding}
    if not chosen:
        raise ModelError(f"sketch.modules {list(patterns)} matches no linear layer of the model")
    for name, m in chosen.items():
        if not m.weight.requires_grad:
            raise ModelError(f"sketch.modules: {name} was not trained at meta-init (frozen weight)")
        if m.weight is embedding:
            raise ModelError(f"sketch.modules: {name} is tied to the input embeddings; leave it out")
        if m.bias is not None and m.bias.requires_grad:
            raise ModelError(f"sketch.modules: {name} has a trained bias, which the sketcher does not cover")
    return chosen


@contextlib.contextmanager
def _no_weight_grads(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Sketcher:
    """Sketches of ∇F for every example of a batch from one forward and one backward pass."""

    def __init__(self, model, modules: dict[str, nn.Linear], projector: KroneckerProjector):
        self.model, self.modules, self.projector = model, modules, projector

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = batch["input_ids"].shape[0]
        sketch = torch.zeros(n, self.projector.proj_dim)
        fired: set[str] = set()

        def capture(name):
            def hook(module, args, output):
                x = args[0].detach()

                def on_grad(g):
                    fired.add(name)
                    sketch.add_(self.projector.project_factored(name, x, g))

                output.register_hook(on_grad)
            return hook

        handles = [m.register_forward_hook(capture(n)) for n, m in self.modules.items()]
        try:
            with torch.enable_grad(), _no_weight_grads(self.model):
                embeds = self.model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
                logits = self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
                values = output_function(logits, batch["input_ids"], batch["target_mask"])
                values.sum().backward(inputs=[embeds])
        finally:
            for h in handles:
                h.remove()
        if len(fired) != len(self.modules):
            missing = sorted(set(self.modules) - fired)[:3]
            raise ModelError(f"sketched layers never reached by the backward pass, e.g. {missing}")
        return sketch, values.detach()


def per_token_gradients(model, modules: dict[str, nn.Linear], batch: dict[str, torch.Tensor]):
    """∇ logit(p_t) of the sketched weights and logit(p_t), for every position of every example.

    Used for the target's validation tokens (its loss linearises token by token) and as the
    materialized reference in tests; costs one backward pass per token.
    """
    names = [f"{n}.weight" for n in modules]
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    frozen.update(dict(model.named_buffers()))

    def f(p, ids, attention, target):
        logits = functional_call(model, {**frozen, **p}, (ids[None],), {"attention_mask": attention[None]}).logits
        odds = log_odds(response_logprobs(logits, ids[None], target[None]))[0]
        out = torch.where(target, odds, torch.zeros_like(odds))
        return out, out

    grads, values = vmap(jacrev(f, has_aux=True), in_dims=(None, 0, 0, 0))(
        params, batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    return {n: grads[f"{n}.weight"] for n in modules}, values


def sketch_tokens(model, modules, projector: KroneckerProjector, rows: list[tuple[list[int], int]],
                  batch_size: int, pad_id: int, memory_bytes: int = 1 << 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token sketches and log-odds of the target's response tokens, and each token's example.

    The Jacobian of a batch holds examples × positions × p floats, so the batch is cut down to
    fit `memory_bytes` (one example at a time for long targets of large adapters).
    """
    width = max(len(ids) for ids, _ in rows)
    batch_size = max(1, min(batch_size, memory_bytes // (4 * width * projector.grad_dim)))
    sketches, odds, owner = [], [], []
    with progress(total=len(rows), desc="target tokens", unit="ex") as bar:
        for start in range(0, len(rows), batch_size):
            batch = pad_batch(rows[start : start + batch_size], pad_id)
            grads, values = per_token_gradients(model, modules, batch)
            n, width = values.shape
            flat = projector.project({k: g.reshape(n * width, *g.shape[2:]) for k, g in grads.items()})
            mask = batch["target_mask"]
            sketches.append(flat.reshape(n, width, -1)[mask].numpy())
            odds.append(values[mask].numpy())
            owner.append((torch.arange(n).unsqueeze(1).expand(n, width)[mask] + start).numpy())
            bar.update(n)
    return np.concatenate(sketches), np.concatenate(odds), np.concatenate(owner)


def length_order(rows: list[tuple[list[int], int]]) -> list[int]:
    """Rows sorted by length (cheap padding); chunks are cut from this order."""
    return sorted(range(len(rows)), key=lambda i: (len(rows[i][0]), i))


def sketch_chunk(sketcher: Sketcher, rows: list[tuple[list[int], int]], idx: list[int], batch_size: int,
                 pad_id: int, bar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, sketches, F⁰) of one chunk, batched the same way whichever process computes it."""
    sketches, values = [], []
    for start in range(0, len(idx), batch_size):
        s, v = sketcher(pad_batch([rows[i] for i in idx[start : start + batch_size]], pad_id))
        sketches.append(s)
        values.append(v)
        bar.update(len(s))
    return np.array(idx), torch.cat(sketches).numpy(), torch.cat(values).numpy()


def sketch_into_store(sketcher: Sketcher, store: SketchStore, rows: list[tuple[list[int], int]], batch_size: int,
                      pad_id: int, desc: str, shards: Path | None = None) -> None:
    """Fill a store chunk by chunk, resuming where it stopped; chunks finished by shard jobs
    (files in `shards`) are copied in rather than computed."""
    order = length_order(rows)
    done = min(store.progress()["chunks_done"] * store.chunk_rows, len(rows))
    with progress(total=len(rows), initial=done, desc=desc, unit="ex") as bar:
        for chunk in store.pending_chunks():
            saved = shards and chunk_file(shards, desc, chunk)
            if saved and saved.exists():
                idx, sketches, values = load_chunk(saved)
                bar.update(len(idx))
            else:
                idx = order[chunk * store.chunk_rows : (chunk + 1) * store.chunk_rows]
                idx, sketches, values = sketch_chunk(sketcher, rows, idx, batch_size, pad_id, bar)
            store.write_chunk(chunk, idx, sketches, values)
    store.finish()


def cluster(sketches: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means (FAISS) on the sketches: groups of examples with similar gradients."""
    import faiss

    x = np.array(sketches, dtype=np.float32)
    faiss.normalize_L2(x)
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, max_points_per_centroid=len(x))
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def sketch_space(recipe: Recipe):
    """(model at θ*, its sketched layers, their projector): the space every stage after
    meta-init measures in — sketches are taken there and steps Pŵ are lifted back through it."""
    from .model import load_theta_star

    model = load_theta_star(recipe)
    modules = sketched_modules(model, recipe.sketch.modules)
    projector = KroneckerProjector({n: tuple(m.weight.shape) for n, m in modules.items()}, recipe.sketch.dim,
                                   recipe.seed)
    return model, modules, projector


def store_settings(recipe: Recipe, model, modules: dict[str, nn.Linear]) -> dict:
    """Everything a sketch depends on; stores made with other settings are refused."""
    weights = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(p.detach().cpu().contiguous().numpy().tobytes())
    theta = (recipe.run_dir / "meta_init" / "theta.safetensors").read_bytes()
    return {"model_sha256": weights.hexdigest()[:16], "adapter_sha256": hashlib.sha256(theta).hexdigest()[:16],
            "seed": recipe.seed, "dim": recipe.sketch.dim, "projection": PROJECTION,
            "output_function": OUTPUT_FUNCTION, "max_length": recipe.sketch.max_length,
            "modules": len(modules), "modules_sha256": hashlib.sha256("\n".join(modules).encode()).hexdigest()[:16],
            "grad_dim": sum(m.weight.numel() for m in modules.values())}


@dataclass
class Plan:
    """What the sketch stage computes: one store per source and one for the target's validation
    split, cut into chunks of `chunk_rows`."""

    model: nn.Module
    modules: dict[str, nn.Linear]
    projector: KroneckerProjector
    settings: dict
    pad_id: int
    chunk_rows: int
    parts: list[tuple[str, object, Path, int | None]]  # (name, examples, store folder, clusters)

    def units(self) -> list[tuple[str, int]]:
        """Every (store, chunk) in a fixed order: the work shards divide among themselves."""
        return [(name, c) for name, part, _, _ in self.parts for c in range(-(-len(part) // self.chunk_rows))]


def plan(recipe: Recipe, out: Path) -> Plan:
    from .model import load_tokenizer
    from .sources import read_ingested, usable

    examples = read_ingested(recipe)
    model, modules, projector = sketch_space(recipe)
    assert projector.grad_dim == sum(m.weight.numel() for m in modules.values())
    chunk_rows = -(-recipe.sketch.chunk_size // recipe.sketch.batch_size) * recipe.sketch.batch_size
    parts = [(s.name, usable(examples, "source", s.name), out / "sources" / s.name, s.clusters)
             for s in recipe.sources]
    parts.append(("target validation", usable(examples, "validation"), out / "target" / "validation", None))
    return Plan(model, modules, projector, store_settings(recipe, model, modules), load_tokenizer(recipe).pad_token_id,
                chunk_rows, parts)


def sketch_shard(recipe: Recipe, out: Path, shard: Shard) -> dict:
    """Compute this shard's chunks into `out/shards` (skipping those already there) and mark it done."""
    from .sources import token_rows

    p = plan(recipe, out)
    folder = out / "shards"
    sketcher = Sketcher(p.model, p.modules, p.projector)
    mine = [u for i, u in enumerate(p.units()) if shard.owns(i)]
    rows = {name: token_rows(part) for name, part, _, _ in p.parts}
    orders = {name: length_order(r) for name, r in rows.items()}
    with progress(total=len(mine), desc=f"shard {shard.index}/{shard.count}", unit="chunk") as bar:
        for name, chunk in mine:
            path = chunk_file(folder, name, chunk)
            if not path.exists():
                idx = orders[name][chunk * p.chunk_rows : (chunk + 1) * p.chunk_rows]
                with progress(total=len(idx), desc=name, unit="ex", leave=False) as inner:
                    save_chunk(path, *sketch_chunk(sketcher, rows[name], idx, recipe.sketch.batch_size, p.pad_id, inner))
            bar.update(1)
    write_done(folder, shard, p.settings, mine)
    return {"shard": shard.index, "count": shard.count, "chunks": len(mine), "of": len(p.units())}


def stage(recipe: Recipe, out: Path) -> dict:
    """Fill the stores (from finished shards when there are any), cluster, sketch target tokens."""
    from .sources import token_rows

    p = plan(recipe, out)
    shards = out / "shards" if check_complete(out / "shards", p.settings, p.units()) else None
    sketcher = Sketcher(p.model, p.modules, p.projector)
    counts = {}
    for name, part, folder, clusters in p.parts:
        store = SketchStore.open(folder, p.settings, part["id"].to_list(), recipe.sketch.dim, p.chunk_rows)
        if not store.progress()["complete"]:
            sketch_into_store(sketcher, store, token_rows(part), recipe.sketch.batch_size, p.pad_id, name, shards)
        if clusters and not (folder / "clusters.npy").exists():
            labels = cluster(np.load(folder / "sketches.npy", mmap_mode="r"), clusters, recipe.seed)
            np.save(folder / "clusters.npy", labels, allow_pickle=False)
        counts[name] = len(part)
    target = p.parts[-1][2]
    if not (target / "token_example.npy").exists():
        tokens, odds, owner = sketch_tokens(p.model, p.modules, p.projector, token_rows(p.parts[-1][1]),
                                            recipe.sketch.batch_size, p.pad_id)
        np.save(target / "token_sketches.npy", tokens, allow_pickle=False)
        np.save(target / "token_log_odds.npy", odds, allow_pickle=False)
        np.save(target / "token_example.npy", owner, allow_pickle=False)
    counts["target validation tokens"] = int(np.load(target / "token_example.npy").shape[0])
    if shards:
        shutil.rmtree(shards)  # merged: the stores hold every chunk now
    manifest = {**p.settings, "examples": counts, "merged_from_shards": bool(shards)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def finished_settings(recipe: Recipe) -> dict:
    """The settings the finished sketch stage ran with; every store it wrote must carry them."""
    manifest = json.loads((recipe.run_dir / "sketch" / "manifest.json").read_text())
    return {k: v for k, v in manifest.items() if k not in ("examples", "merged_from_shards")}


def target_tokens(recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """Per-token sketches and log-odds of the target's validation responses."""
    folder = recipe.run_dir / "sketch" / "target" / "validation"
    read_store(folder, finished_settings(recipe))
    return np.load(folder / "token_sketches.npy"), np.load(folder / "token_log_odds.npy")


def stacked_sources(recipe: Recipe, examples) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """All source stores stacked: ids, each row's group (task value, cluster or source), sketches, F⁰."""
    from .sources import usable

    root = recipe.run_dir / "sketch"
    settings = finished_settings(recipe)
    all_ids, names, xs, f0s = [], [], [], []
    for s in recipe.sources:
        folder = root / "sources" / s.name
        ids, x, f0 = read_store(folder, settings)
        all_ids += ids
        if s.clusters:
            names += [f"{s.name}/c{c}" for c in np.load(folder / "clusters.npy")]
        else:
            names += usable(examples, "source", s.name)["group"].to_list()
        xs.append(np.asarray(x))
        f0s.append(f0)
    return all_ids, names, np.concatenate(xs), np.concatenate(f0s)

