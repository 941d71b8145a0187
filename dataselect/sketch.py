"""Stage 3, gradient sketches: per-example ∇F at θ* and F⁰, randomly projected to `dim`.

F is the mean log-odds of the gold response tokens, logit(p) = log p − log(1 − p), computed from
log-softmax so it stays finite for any p. The target's validation examples are sketched through
their loss instead — the sum of their response tokens' cross-entropy — because the estimate is
of that loss: its first-order change along a step is the step's product with these sketches.

Per-example gradients come from one batched forward and one backward pass: hooks on the
sketched linear layers keep each layer's inputs x and catch its output gradients δ, and the
projection of Σ_t δ_t x_tᵀ is formed from those directly (`projection.py`). The backward pass
computes activation gradients only — no weight gradient is ever formed — so a sketch costs about
what a training step costs.

Which weights are sketched: the LoRA adapters (lora_A, lora_B) when the model has them, otherwise
every linear layer not tied to the input embeddings; or the layers matched by `sketch.modules`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model import ModelError, pad_batch, progress, response_logprobs
from .projection import KIND as PROJECTION
from .projection import KroneckerProjector
from .recipe import Recipe
from .shards import Shard, check_complete, chunk_file, load_chunk, save_chunk, write_done
from .store import SketchStore, read_store

OUTPUT_FUNCTION = "mean_log_odds"
TARGET_FUNCTION = "response_cross_entropy_sum"


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """logit(p) from log p, stable for p → 0; p → 1 is clamped at about 1 − 1e-6."""
    logp = logp.clamp(max=-1e-6)
    return logp - torch.log(-torch.expm1(logp))


def output_function(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """F per example: mean log-odds of the gold next token over response positions."""
    gold = response_logprobs(logits, input_ids, target_mask)
    odds = torch.where(target_mask, log_odds(gold), torch.zeros_like(gold))
    return odds.sum(-1) / target_mask.sum(-1).clamp(min=1)


def response_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per example: the summed cross-entropy of its response tokens. Its gradient weighs each token
    by 1 − p, so the tokens the model still gets wrong (a translation, a final number) dominate —
    in ∇F every token counts alike, and well-fitted format tokens drown the answer."""
    return -response_logprobs(logits, input_ids, target_mask).sum(-1)


FUNCTIONS: dict[str, Callable] = {OUTPUT_FUNCTION: output_function, TARGET_FUNCTION: response_loss}


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
    """Sketches of ∇F (or of another per-example `function` of the logits) for every example of a
    batch from one forward and one backward pass."""

    def __init__(self, model, modules: dict[str, nn.Linear], projector: KroneckerProjector,
                 function: Callable = output_function):
        self.model, self.modules, self.projector, self.function = model, modules, projector, function

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
                values = self.function(logits, batch["input_ids"], batch["target_mask"])
                values.sum().backward(inputs=[embeds])
        finally:
            for h in handles:
                h.remove()
        if len(fired) != len(self.modules):
            missing = sorted(set(self.modules) - fired)[:3]
            raise ModelError(f"sketched layers never reached by the backward pass, e.g. {missing}")
        return sketch, values.detach()


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
class Part:
    """One store the sketch stage fills: a source, or the target's validation split."""

    name: str
    examples: object  # the part's rows of the ingested table
    folder: Path
    clusters: int | None
    function: str  # what is differentiated: OUTPUT_FUNCTION, or TARGET_FUNCTION for the target


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
    parts: list[Part]

    def units(self) -> list[tuple[str, int]]:
        """Every (store, chunk) in a fixed order: the work shards divide among themselves."""
        return [(p.name, c) for p in self.parts for c in range(-(-len(p.examples) // self.chunk_rows))]

    def sketcher(self, part: Part) -> Sketcher:
        return Sketcher(self.model, self.modules, self.projector, FUNCTIONS[part.function])

    def settings_of(self, part: Part) -> dict:
        return part_settings(self.settings, part.function)


def part_settings(settings: dict, function: str) -> dict:
    """A store's settings: the stage's, with the function its sketches differentiate."""
    return {**settings, "output_function": function}


def plan(recipe: Recipe, out: Path) -> Plan:
    from .model import load_tokenizer
    from .sources import read_ingested, usable

    examples = read_ingested(recipe)
    model, modules, projector = sketch_space(recipe)
    assert projector.grad_dim == sum(m.weight.numel() for m in modules.values())
    chunk_rows = -(-recipe.sketch.chunk_size // recipe.sketch.batch_size) * recipe.sketch.batch_size
    parts = [Part(s.name, usable(examples, "source", s.name), out / "sources" / s.name, s.clusters, OUTPUT_FUNCTION)
             for s in recipe.sources]
    parts.append(Part("target validation", usable(examples, "validation"), out / "target" / "validation", None,
                      TARGET_FUNCTION))
    return Plan(model, modules, projector, store_settings(recipe, model, modules), load_tokenizer(recipe).pad_token_id,
                chunk_rows, parts)


def sketch_shard(recipe: Recipe, out: Path, shard: Shard) -> dict:
    """Compute this shard's chunks into `out/shards` (skipping those already there) and mark it done."""
    from .sources import token_rows

    p = plan(recipe, out)
    folder = out / "shards"
    mine = [u for i, u in enumerate(p.units()) if shard.owns(i)]
    parts = {part.name: part for part in p.parts}
    rows = {name: token_rows(part.examples) for name, part in parts.items()}
    orders = {name: length_order(r) for name, r in rows.items()}
    with progress(total=len(mine), desc=f"shard {shard.index}/{shard.count}", unit="chunk") as bar:
        for name, chunk in mine:
            path = chunk_file(folder, name, chunk)
            if not path.exists():
                idx = orders[name][chunk * p.chunk_rows : (chunk + 1) * p.chunk_rows]
                with progress(total=len(idx), desc=name, unit="ex", leave=False) as inner:
                    save_chunk(path, *sketch_chunk(p.sketcher(parts[name]), rows[name], idx, recipe.sketch.batch_size,
                                                   p.pad_id, inner))
            bar.update(1)
    write_done(folder, shard, p.settings, mine)
    return {"shard": shard.index, "count": shard.count, "chunks": len(mine), "of": len(p.units())}


def stage(recipe: Recipe, out: Path) -> dict:
    """Fill the stores (from finished shards when there are any) and cluster the sources asked to be."""
    from .sources import token_rows

    p = plan(recipe, out)
    shards = out / "shards" if check_complete(out / "shards", p.settings, p.units()) else None
    counts = {}
    for part in p.parts:
        store = SketchStore.open(part.folder, p.settings_of(part), part.examples["id"].to_list(), recipe.sketch.dim,
                                 p.chunk_rows)
        if not store.progress()["complete"]:
            sketch_into_store(p.sketcher(part), store, token_rows(part.examples), recipe.sketch.batch_size, p.pad_id,
                              part.name, shards)
        if part.clusters and not (part.folder / "clusters.npy").exists():
            labels = cluster(np.load(part.folder / "sketches.npy", mmap_mode="r"), part.clusters, recipe.seed)
            np.save(part.folder / "clusters.npy", labels, allow_pickle=False)
        counts[part.name] = len(part.examples)
    counts[TARGET_TOKENS] = sum(len(ids) - n_prompt for ids, n_prompt in token_rows(p.parts[-1].examples))
    if shards:
        shutil.rmtree(shards)  # merged: the stores hold every chunk now
    manifest = {**p.settings, "examples": counts, "merged_from_shards": bool(shards)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


TARGET_TOKENS = "target validation tokens"


def finished_settings(recipe: Recipe) -> dict:
    """The settings the finished sketch stage ran with; every store it wrote must carry them."""
    manifest = json.loads((recipe.run_dir / "sketch" / "manifest.json").read_text())
    return {k: v for k, v in manifest.items() if k not in ("examples", "merged_from_shards")}


def target_gradient(recipe: Recipe) -> tuple[np.ndarray, float]:
    """The target's validation loss at θ* (mean token cross-entropy of the responses) and its
    sketched gradient: the loss at θ* + Pw is that plus w · gradient, to first order."""
    folder = recipe.run_dir / "sketch"
    tokens = json.loads((folder / "manifest.json").read_text())["examples"][TARGET_TOKENS]
    _, x, loss = read_store(folder / "target" / "validation", part_settings(finished_settings(recipe), TARGET_FUNCTION))
    return np.asarray(x, dtype=np.float64).sum(0) / tokens, float(np.sum(loss, dtype=np.float64) / tokens)


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

