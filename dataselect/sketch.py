"""Stage 3, gradient sketches: per-example loss gradients along meta-init's path, randomly projected.

What is differentiated is the example's loss, the summed cross-entropy of its response tokens, for
the sources and the target alike. It is taken at the points `sketch.path` of meta-init's path
(fractions of its steps: 0 is the base model, 1 is θ*): what a fine-tune on a subset S does to
the target's loss is, to first order, a sum over the points of the learning rate spent near
each times ⟨∇L_target, ∇L_S⟩ there (TracIn's checkpoint form). Each point gets its
own projection to `dim` dimensions; a stored sketch holds the points side by side, each scaled by
the square root of its weight, so one inner product of two stored sketches is that weighted sum.

Per-example gradients come from one batched forward and one backward pass: hooks on the
sketched linear layers keep each layer's inputs x and catch its output gradients δ, and the
projection of Σ_t δ_t x_tᵀ is formed from those directly (`projection.py`). The backward pass
computes activation gradients only — no weight gradient is ever formed — so a sketch costs about
what a training step costs, once per point.

Which weights are sketched: the LoRA adapters (lora_A, lora_B) when the model has them, otherwise
every linear layer not tied to the input embeddings; or the layers matched by `sketch.modules`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .artifacts import FineTune, Ingested, Sketches
from .clustering import Clusters, describe, spherical_kmeans, unit_rows
from .examples import token_rows, usable
from .meta_init import path_weights
from .trainer import load_base_model, with_trainable
from .progress import progress
from .projection import KIND as PROJECTION
from .projection import KroneckerProjector
from .recipe import Recipe
from .shards import Shard, check_complete, chunk_file, load_chunk, save_chunk, write_done
from .store import SketchStore, read_store
from .tokens import ModelError, load_tokenizer, pad_batch, response_logprobs

FUNCTION = "response_cross_entropy_sum"


def response_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per example: the summed cross-entropy of its response tokens. A subset's gradient is the sum
    of its examples' over its number of response tokens, as a token-averaged training loss has it."""
    return -response_logprobs(logits, input_ids, target_mask).sum(-1)


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
    """Sketches of the gradient of a per-example `function` of the logits (the response loss) for
    every example of a batch, from one forward and one backward pass."""

    def __init__(self, model, modules: dict[str, nn.Linear], projector: KroneckerProjector,
                 function=response_loss):
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


@dataclass
class Point:
    """One point of meta-init's path: where its parameters are, its weight, its projection."""

    fraction: float
    params: Path
    weight: float
    projector: KroneckerProjector


class PathSketcher:
    """The model moved from point to point of meta-init's path, sketching examples at each."""

    def __init__(self, model, modules: dict[str, nn.Linear], points: list[Point]):
        self.model, self.modules, self.points = model, modules, points
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    @property
    def dim(self) -> int:
        return sum(p.projector.proj_dim for p in self.points)

    def move_to(self, point: Point) -> None:
        state = load_file(str(point.params))
        if set(state) != set(self.params):
            raise ModelError(f"{point.params} does not match the recipe's trainable parameters; rerun with --force")
        with torch.no_grad():
            for name, value in state.items():
                self.params[name].copy_(value)

    def sketch_rows(self, rows: list[tuple[list[int], int]], idx: list[int], batch_size: int, pad_id: int,
                    bar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, sketches, losses at the first point) of the rows `idx`, batched the same way whichever
        process computes them: each point's sketch, scaled by √weight, side by side."""
        parts, values = [], None
        for k, point in enumerate(self.points):
            self.move_to(point)
            sketcher = Sketcher(self.model, self.modules, point.projector)
            sketches, losses = [], []
            for start in range(0, len(idx), batch_size):
                s, v = sketcher(pad_batch([rows[i] for i in idx[start : start + batch_size]], pad_id))
                sketches.append(s)
                losses.append(v)
                bar.update(len(s))
            parts.append(torch.cat(sketches) * math.sqrt(point.weight))
            values = torch.cat(losses) if k == 0 else values
        return np.array(idx), torch.cat(parts, dim=1).numpy(), values.numpy()


def sketch_into_store(sketcher: PathSketcher, store: SketchStore, rows: list[tuple[list[int], int]], batch_size: int,
                      pad_id: int, desc: str, shards: Path | None = None) -> None:
    """Fill a store chunk by chunk, resuming where it stopped; chunks finished by shard jobs
    (files in `shards`) are copied in rather than computed."""
    order = length_order(rows)
    points = len(sketcher.points)
    done = min(store.progress()["chunks_done"] * store.chunk_rows, len(rows))
    with progress(total=len(rows) * points, initial=done * points, desc=desc, unit="ex") as bar:
        for chunk in store.pending_chunks():
            saved = shards and chunk_file(shards, desc, chunk)
            if saved and saved.exists():
                idx, sketches, values = load_chunk(saved)
                bar.update(len(idx) * points)
            else:
                idx = order[chunk * store.chunk_rows : (chunk + 1) * store.chunk_rows]
                idx, sketches, values = sketcher.sketch_rows(rows, idx, batch_size, pad_id, bar)
            store.write_chunk(chunk, idx, sketches, values)
    store.finish()


def point_blocks(sketches: np.ndarray, points: int) -> list[np.ndarray]:
    """A stored sketch's parts, one per point of the path (each still scaled by √weight)."""
    d = sketches.shape[1] // points
    return [np.asarray(sketches[:, k * d : (k + 1) * d], dtype=np.float32) for k in range(points)]


def directions(sketches: np.ndarray, points: int) -> np.ndarray:
    """Each point's part scaled to norm 1: a gradient's direction along the whole path, every
    point counting alike (the weights say how far meta-init moved there, not how alike two
    examples are)."""
    parts = point_blocks(sketches, points)
    return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True).clip(1e-30) for p in parts], axis=1)


def cluster(sketches: np.ndarray, k: int, seed: int, points: int = 1) -> Clusters:
    """Groups of examples whose gradients point the same way along the path: spherical k-means
    on their directions (each point's part at norm 1, so every point counts alike)."""
    return spherical_kmeans(sketches, k, seed, prepare=lambda rows: unit_rows(directions(rows, points)))


def point_seed(seed: int, k: int) -> int:
    """Each point's projection is drawn independently of the others'."""
    return int.from_bytes(hashlib.sha256(f"{seed}:point:{k}".encode()).digest()[:4], "little") & ((1 << 31) - 1)


def path_sketcher(recipe: Recipe, ingested: Ingested, meta: FineTune) -> PathSketcher:
    """The base model with its trainable layers, and meta-init's points with their weights and
    projections: the space every later stage measures in."""
    model = with_trainable(load_base_model(recipe, ingested), recipe).eval()
    modules = sketched_modules(model, recipe.sketch.modules)
    steps = meta.summary()["steps"]
    weights = path_weights(recipe.meta_init, steps, recipe.sketch_path)
    layers = {n: tuple(m.weight.shape) for n, m in modules.items()}
    points = [Point(f, meta.snapshot(f, steps), w,
                    KroneckerProjector(layers, recipe.sketch.dim, point_seed(recipe.seed, k)))
              for k, (f, w) in enumerate(zip(recipe.sketch_path, weights))]
    return PathSketcher(model, modules, points)


def store_settings(recipe: Recipe, sketcher: PathSketcher) -> dict:
    """Everything a sketch depends on; stores made with other settings are refused."""
    weights = hashlib.sha256()
    for name, p in sorted(sketcher.model.state_dict().items()):
        if name not in sketcher.params:
            weights.update(name.encode())
            weights.update(p.detach().cpu().contiguous().numpy().tobytes())
    for point in sketcher.points:
        weights.update(point.params.read_bytes())
    modules = sketcher.modules
    return {"model_sha256": weights.hexdigest()[:16], "seed": recipe.seed, "dim": recipe.sketch.dim,
            "points": [{"fraction": p.fraction, "weight": p.weight} for p in sketcher.points],
            "projection": PROJECTION, "function": FUNCTION, "max_length": recipe.sketch.max_length,
            "modules": len(modules), "modules_sha256": hashlib.sha256("\n".join(modules).encode()).hexdigest()[:16],
            "grad_dim": sum(m.weight.numel() for m in modules.values())}


@dataclass
class Part:
    """One store the sketch stage fills: a source, or the target's validation split."""

    name: str
    examples: object  # the part's rows of the ingested table
    folder: Path
    clusters: int | None


@dataclass
class Plan:
    """What the sketch stage computes: one store per source and one for the target's validation
    split, cut into chunks of `chunk_rows`."""

    sketcher: PathSketcher
    settings: dict
    pad_id: int
    chunk_rows: int
    parts: list[Part]

    def units(self) -> list[tuple[str, int]]:
        """Every (store, chunk) in a fixed order: the work shards divide among themselves."""
        return [(p.name, c) for p in self.parts for c in range(-(-len(p.examples) // self.chunk_rows))]


def plan(recipe: Recipe, out: Path, ingested: Ingested, meta: FineTune) -> Plan:
    examples = ingested.examples()
    sketcher = path_sketcher(recipe, ingested, meta)
    chunk_rows = -(-recipe.sketch.chunk_size // recipe.sketch.batch_size) * recipe.sketch.batch_size
    folder = Sketches(out)
    parts = [Part(s.name, usable(examples, "source", s.name), folder.source_store(s.name), s.clusters)
             for s in recipe.sources]
    parts.append(Part("target validation", usable(examples, "validation"), folder.target_store, None))
    return Plan(sketcher, store_settings(recipe, sketcher), load_tokenizer(recipe, ingested).pad_token_id, chunk_rows,
                parts)


def sketch_shard(recipe: Recipe, out: Path, shard: Shard, ingested: Ingested, meta: FineTune) -> dict:
    """Compute this shard's chunks into the stage's shards folder (skipping those already there) and
    mark it done."""
    p = plan(recipe, out, ingested, meta)
    folder = Sketches(out).shards
    mine = [u for i, u in enumerate(p.units()) if shard.owns(i)]
    parts = {part.name: part for part in p.parts}
    rows = {name: token_rows(part.examples) for name, part in parts.items()}
    orders = {name: length_order(r) for name, r in rows.items()}
    with progress(total=len(mine), desc=f"shard {shard.index}/{shard.count}", unit="chunk") as bar:
        for name, chunk in mine:
            path = chunk_file(folder, name, chunk)
            if not path.exists():
                idx = orders[name][chunk * p.chunk_rows : (chunk + 1) * p.chunk_rows]
                with progress(total=len(idx) * len(p.sketcher.points), desc=name, unit="ex", leave=False) as inner:
                    save_chunk(path, *p.sketcher.sketch_rows(rows[name], idx, recipe.sketch.batch_size, p.pad_id,
                                                             inner))
            bar.update(1)
    write_done(folder, shard, p.settings, mine)
    return {"shard": shard.index, "count": shard.count, "chunks": len(mine), "of": len(p.units())}


def stage(recipe: Recipe, out: Path, ingested: Ingested, meta: FineTune) -> dict:
    """Fill the stores (from finished shards when there are any) and cluster the sources asked to be."""
    p = plan(recipe, out, ingested, meta)
    folder = Sketches(out)
    shards = folder.shards if check_complete(folder.shards, p.settings, p.units()) else None
    counts = {}
    for part in p.parts:
        store = SketchStore.open(part.folder, p.settings, part.examples["id"].to_list(), p.sketcher.dim,
                                 p.chunk_rows)
        if not store.progress()["complete"]:
            sketch_into_store(p.sketcher, store, token_rows(part.examples), recipe.sketch.batch_size, p.pad_id,
                              part.name, shards)
        if part.clusters and folder.clusters(part.name) is None:
            _, sketches, _ = read_store(part.folder)
            found = cluster(sketches, part.clusters, recipe.seed, len(p.sketcher.points))
            folder.write_clusters(part.name, found.labels, {**found.summary(), **described(part.examples, found)})
        counts[part.name] = len(part.examples)
    counts[TARGET_TOKENS] = sum(len(ids) - n_prompt for ids, n_prompt in token_rows(p.parts[-1].examples))
    if shards:
        shutil.rmtree(shards)  # merged: the stores hold every chunk now
    return folder.write_settings(p.settings, counts, bool(shards), folder.cluster_summaries())


TARGET_TOKENS = "target validation tokens"


def described(examples, found: Clusters) -> dict:
    """What each cluster of a source holds, so that `unlabeled/c0` can be read without joining
    rows.parquet back to the file: per cluster its size, its label columns' most frequent values,
    its distinctive words and typical prompts (`clustering.describe`); and the source's label
    columns (ingest keeps a clustered source's columns that the format does not read and that hold
    a few repeated values; none: the clusters are described by their words and prompts alone)."""
    labels = examples["labels"].to_list() if "labels" in examples.columns else None
    columns = list(dict.fromkeys(pair["column"] for pairs in labels or () for pair in pairs or ()))
    texts = (examples["prompt"] + "\n" + examples["response"]).to_list()
    return {"label_columns": columns,
            "descriptions": describe(found.labels, found.margins, examples["prompt"].to_list(), texts, labels)}


def target_sketches(sketches: Sketches) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per target validation example: its id, its loss gradient's sketch and its loss at the base model."""
    ids, x, loss = read_store(sketches.target_store, sketches.settings())
    return ids, np.asarray(x), loss


def stacked_sources(recipe: Recipe, examples, sketches: Sketches) -> tuple[list[str], list[str], np.ndarray,
                                                                          np.ndarray]:
    """All source stores stacked: ids, each row's group (task value, cluster or source), sketches,
    each row's loss at the base model."""
    settings = sketches.settings()
    all_ids, names, xs, f0s = [], [], [], []
    for s in recipe.sources:
        ids, x, f0 = read_store(sketches.source_store(s.name), settings)
        all_ids += ids
        if s.clusters:
            names += [f"{s.name}/c{c}" for c in sketches.clusters(s.name)]
        else:
            names += usable(examples, "source", s.name)["group"].to_list()
        xs.append(np.asarray(x))
        f0s.append(f0)
    return all_ids, names, np.concatenate(xs), np.concatenate(f0s)
