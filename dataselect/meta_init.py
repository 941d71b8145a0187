"""Stage 2, meta-initialization: load the base model, fine-tune it once on all sources (θ*).

Also owns the model every later stage runs: the base (pretrained, or the tiny one ingest builds),
its trainable parameters (LoRA adapters or every weight), the points of meta-init's path and
their weights, and θ* reloaded. Training checkpoints as it goes, so a killed run resumes to the
same θ* bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .artifacts import FineTune, Ingested
from .examples import token_rows, usable
from .progress import progress
from .recipe import MetaInit, Recipe
from .tokens import ModelError, load_tokenizer, pad_batch, pretrained_args, response_logprobs

log = logging.getLogger(__name__)


# --- the base model -------------------------------------------------------------------------

def build_tiny_model(recipe: Recipe, tokenizer):
    """A randomly initialised Llama-style LM sized by `model.tiny`, seeded by the recipe."""
    from transformers import LlamaConfig, LlamaForCausalLM  # transformers takes seconds to import: only when used

    spec = recipe.model.tiny
    assert spec is not None
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=recipe.sketch.max_length, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)

def load_base_model(recipe: Recipe, ingested: Ingested):
    """The pretrained model (or the tiny one `ingested` holds), float32, eager attention for per-example grads."""
    from transformers import AutoModelForCausalLM  # transformers takes seconds to import: only when used

    if recipe.model.tiny is not None:
        path, kwargs = ingested.base, {}
    else:
        path, kwargs = pretrained_args(recipe.model)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                    **kwargs)
    except Exception as e:
        raise ModelError(f"model.base: cannot load model from {recipe.model.base or path}: {e}") from e


def with_trainable(model, recipe: Recipe):
    """Attach LoRA adapters (peft) or make every weight trainable for full fine-tuning."""
    if recipe.model.lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model  # peft takes seconds to import: only for LoRA

    spec = recipe.model.lora
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(recipe.seed)
    return get_peft_model(model, config)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters meta-init trains and sketches differentiate: one definition for both."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}



# --- meta-initialization --------------------------------------------------------------------

def meta_train_rows(recipe: Recipe, rows_by_source: dict[str, list[tuple[list[int], int]]]) -> list:
    """All sources together, each capped at max_examples_per_source by a seeded sample."""
    cap = recipe.meta_init.max_examples_per_source
    rng = random.Random(recipe.seed)
    chosen = []
    for name in sorted(rows_by_source):
        rows = rows_by_source[name]
        chosen += rng.sample(rows, cap) if cap and len(rows) > cap else rows
    return chosen


def save_checkpoint(path: Path, params: dict, opt, sched, step: int, order: list[int], rng: random.Random,
                    losses: list[float]) -> None:
    """Everything training needs to continue exactly, in one safetensors file renamed into place."""
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    state = opt.state_dict()
    for i, slots in state["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().reshape(-1).contiguous() if v.dim() == 0 else v.contiguous()
                        for k, v in slots.items()})
    tensors["torch_rng"] = torch.get_rng_state()
    version, internal, gauss = rng.getstate()
    meta = {"step": step, "order": order, "losses": losses, "python_rng": [version, list(internal), gauss],
            "param_groups": state["param_groups"], "scheduler": sched.state_dict()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"training": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, params: dict, opt, sched, rng: random.Random) -> tuple[int, list[int], list[float]]:
    """Restore what save_checkpoint wrote: parameters, optimizer, scheduler, both RNGs."""
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["training"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            slots.setdefault(int(i), {})[name] = value.reshape(()) if name == "step" else value
    opt.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["torch_rng"])
    version, internal, gauss = meta["python_rng"]
    rng.setstate((version, tuple(internal), gauss))
    return meta["step"], meta["order"], meta["losses"]


def training_steps(spec: MetaInit, rows: int) -> int:
    return max(1, math.ceil(rows * spec.epochs / spec.batch_size))


def lr_factor(spec: MetaInit, steps: int, step: int) -> float:
    """The learning rate at `step` as a fraction of `spec.lr`: linear warm-up, then linear decay."""
    warmup = int(spec.warmup_ratio * steps)
    return min((step + 1) / max(1, warmup), max(0.0, (steps - step) / max(1, steps - warmup)))


def path_weights(spec: MetaInit, steps: int, fractions: Sequence[float]) -> list[float]:
    """How far meta-init moved near each point of its path: the learning rate summed over the steps
    closer to it than to any other point (TracIn's η × steps per checkpoint). A fine-tune's
    first-order change of a loss is the sum over points of this weight times the gradients' inner
    product there."""
    at = [round(f * steps) for f in fractions]
    edges = [0] + [(a + b) // 2 for a, b in zip(at, at[1:])] + [steps]
    return [spec.lr * sum(lr_factor(spec, steps, s) for s in range(lo, hi)) for lo, hi in zip(edges, edges[1:])]


def meta_init(recipe: Recipe, ingested: Ingested, rows: list[tuple[list[int], int]], out_dir: Path, pad_id: int,
              snapshots: Sequence[float] = ()) -> dict:
    """Fine-tune the base on `rows` (token CE on response tokens) and save θ* as safetensors.

    A checkpoint every 5% of the steps (or 10 minutes) lets a killed run continue where it was,
    to the same θ* bit for bit as an uninterrupted run. `snapshots`: fractions of the steps at
    which the trainable parameters are also kept (`FineTune.snapshot`; 0 is the start), points
    along the path from the base to θ*.
    """
    spec = recipe.meta_init
    model = with_trainable(load_base_model(recipe, ingested), recipe)
    model.train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps = training_steps(spec, len(rows))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, steps, s))
    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    order: list[int] = []
    losses: list[float] = []
    folder = FineTune(out_dir)
    start, checkpoint = 0, folder.checkpoint
    if checkpoint.exists():
        start, order, losses = load_checkpoint(checkpoint, params, opt, sched, rng)
        log.info("meta-init: resuming at step %d of %d from %s", start, steps, checkpoint)
    every, last_saved = max(1, steps // 20), time.monotonic()
    keep = {round(f * steps) for f in snapshots} - {steps}  # θ* itself is folder.theta
    if 0 in keep and start == 0:
        save_params(folder.snapshot(0.0, steps), params)
    for step in progress(iterable=range(start, steps), initial=start, total=steps, desc="meta-init", unit="step"):
        if len(order) < spec.batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        batch = pad_batch([rows[i] for i in order[: spec.batch_size]], pad_id)
        del order[: spec.batch_size]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gold = response_logprobs(logits, batch["input_ids"], batch["target_mask"])
        loss = -gold.sum() / batch["target_mask"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step + 1 in keep:
            save_params(folder.snapshot((step + 1) / steps, steps), params)
        if step + 1 < steps and ((step + 1) % every == 0 or time.monotonic() - last_saved > 600):
            save_checkpoint(checkpoint, params, opt, sched, step + 1, order, rng, losses)
            last_saved = time.monotonic()
    save_params(folder.theta, params)  # its presence means "finished"
    checkpoint.unlink(missing_ok=True)
    first, last = _mean(losses[: max(1, steps // 10)]), _mean(losses[-max(1, steps // 10):])
    summary = {"steps": steps, "examples": len(rows), "trainable_parameters": sum(p.numel() for p in params.values()),
               "loss_first_10pct": first, "loss_last_10pct": last}
    folder.write_losses(losses)
    return summary


def save_params(path: Path, params: dict) -> None:
    """The trainable parameters, written whole or not at all."""
    save_file({n: p.detach().contiguous() for n, p in params.items()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def load_theta_star(recipe: Recipe, ingested: Ingested, path: Path):
    """The base model with the trainable parameters set to θ* (or another fine-tune saved the same
    way) at `path`, in eval mode."""
    model = with_trainable(load_base_model(recipe, ingested), recipe)
    state = load_file(path)
    params = trainable_parameters(model)
    if set(state) != set(params):
        raise ModelError(f"{path} does not match the recipe's trainable parameters; rerun with --force")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return model.eval()


def stage(recipe: Recipe, out: Path, ingested: Ingested) -> dict:
    """θ* from every source's usable rows, and the snapshots at the points of `sketch.path`."""
    examples = ingested.examples()
    by_source = {s.name: token_rows(usable(examples, "source", s.name)) for s in recipe.sources}
    rows = meta_train_rows(recipe, by_source)
    return meta_init(recipe, ingested, rows, out, load_tokenizer(recipe, ingested).pad_token_id, recipe.sketch_path)
