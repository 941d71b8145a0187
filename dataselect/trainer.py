"""What training on some rows really does: the one code path for every real fine-tune.

Meta-init (θ* on all sources), verify's subsets, the confirm stage's candidates and the
benchmarks' mixtures all fine-tune the base model here, with the recipe's `meta_init` settings
(AdamW, linear warm-up and decay, loss on response tokens), and score it on the target here. A
fine-tune checkpoints as it goes, so a killed run resumes to the same parameters bit for bit, and
it is kept in a folder named by everything it depends on (the base model's files, the settings,
the seed, the rows' token ids in order), so a second run, or another target over the same pool,
reuses it.

Also the model itself: the base (pretrained, or the tiny one ingest builds), its trainable
parameters (LoRA adapters or every weight), and trained parameters loaded back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .artifacts import FineTune, Ingested
from .examples import token_rows, usable
from .progress import progress
from .recipe import MetaInit, Recipe
from .tokens import ModelError, load_tokenizer, model_error, pad_batch, pretrained_args, response_logprobs

log = logging.getLogger(__name__)

Rows = list[tuple[list[int], int]]  # (token ids, prompt length) per training row


# --- the model -----------------------------------------------------------------------------------

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
        if recipe.model.tiny is not None:
            raise ModelError(f"model.tiny: cannot load the tiny model from {path}: {e}") from e
        raise model_error(recipe.model, "model", e) from e


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


# --- training --------------------------------------------------------------------------------

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


def train(recipe: Recipe, ingested: Ingested, rows: Rows, out_dir: Path, pad_id: int,
          snapshots: Sequence[float] = (), desc: str = "meta-init", until: float = 1.0) -> dict:
    """Fine-tune the base on `rows` (token CE on response tokens) and save the trained
    parameters (θ* for meta-init) as safetensors.

    A checkpoint every 5% of the steps (or 10 minutes) lets a killed run continue where it was,
    to the same θ* bit for bit as an uninterrupted run. `snapshots`: fractions of the steps at
    which the trainable parameters are also kept (`FineTune.snapshot`; 0 is the start), points
    along the path from the base to θ*. `until` < 1 stops after that fraction of the steps, with
    the parameters there kept as a snapshot and a checkpoint to go on from: a short rung of
    successive halving, which a later call with `until` 1 finishes, to the same parameters as a
    run never stopped.
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
        log.info("training: resuming at step %d of %d from %s", start, steps, checkpoint)
    every, last_saved = max(1, steps // 20), time.monotonic()
    stop = steps if until >= 1 else max(1, round(until * steps))
    keep = {round(f * steps) for f in (*snapshots, until)} - {steps}  # θ* itself is folder.theta
    if 0 in keep and start == 0:
        save_params(folder.snapshot(0.0, steps), params)
    for step in progress(iterable=range(start, stop), initial=start, total=stop, desc=desc, unit="step"):
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
        if step + 1 < steps and (step + 1 == stop or (step + 1) % every == 0 or time.monotonic() - last_saved > 600):
            save_checkpoint(checkpoint, params, opt, sched, step + 1, order, rng, losses)
            last_saved = time.monotonic()
    if stop < steps:
        return {"steps": steps, "stopped_at": stop, "examples": len(rows)}
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


def load_trained(recipe: Recipe, ingested: Ingested, path: Path):
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


# --- scoring, and the fine-tunes kept for reuse ----------------------------------------------

def mean_token_loss(model, rows: Rows, batch_size: int, pad_id: int) -> float:
    """Token cross-entropy of the response tokens of `rows` (the target's validation loss)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = pad_batch(rows[i : i + batch_size], pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total -= float(response_logprobs(logits, b["input_ids"], b["target_mask"]).sum())
            count += int(b["target_mask"].sum())
    return total / max(count, 1)


def extract_answer(text: str, pattern: str) -> str | None:
    """The last match of `pattern` (its first group, if it has one), without whitespace or commas:
    the tiny tokenizer's decoder drops spaces, and "1,000" states the same answer as "1000"."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[-1]
    return "".join((m.group(1) if m.re.groups else m.group(0)).replace(",", "").split())


def exact_match(model, tokenizer, rows: Rows, gold: list[str], pattern: str,
                batch_size: int) -> float:
    """Share of rows whose greedy generation from the prompt states the gold response's answer."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    max_new = max(len(ids) - n for ids, n in rows) + 8
    hits = 0
    for i in range(0, len(rows), batch_size):
        prompts = [ids[:n] for ids, n in rows[i : i + batch_size]]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for text, answer in zip(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True), gold[i:]):
            expected = extract_answer(answer, pattern)
            hits += expected is not None and extract_answer(text, pattern) == expected
    return hits / max(len(rows), 1)


def finetune_folder(recipe: Recipe, rows: Rows, finetunes: Path) -> Path:
    """Where the fine-tune of `rows` is kept, named by everything it depends on: the base model,
    meta-init's settings, the seed, and the training rows' token ids in their order (so a change
    of sources, tokenizer or max_length is a new fine-tune; another recipe with the same base and
    rows shares it)."""
    key = hashlib.sha256(f"{recipe.fingerprint('model', 'meta_init', 'seed')}:{base_identity(recipe)}".encode())
    for ids, n_prompt in rows:
        key.update(np.asarray(ids, dtype=np.int64).tobytes())
        key.update(int(n_prompt).to_bytes(8, "little"))
        key.update(b"|")
    return finetunes / key.hexdigest()[:16]


def base_identity(recipe: Recipe) -> str:
    """A hash of the base model's weight files when they are local (the tiny model ingest built,
    a folder or a GGUF file); a Hub id and revision are already in the recipe's fingerprint."""
    base = recipe.run.ingested.base if recipe.model.tiny is not None else Path(recipe.model.base or "")
    if base.is_file():
        files = [base]
    elif base.is_dir():
        files = sorted(p for pattern in ("*.safetensors", "*.gguf", "*.bin") for p in base.glob(pattern))
    else:
        files = []
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def score(recipe: Recipe, model, tokenizer, splits: Sequence[str] = ("validation",),
          exact_on: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Per target split (`validation`, `test`): the model's token loss on its responses and, where
    the target defines an answer, the exact match of greedy generations on the splits `exact_on`
    (default: all of them; generating is the slow part, so a caller asks only where it reports it)."""
    examples = recipe.run.ingested.examples()
    batch, pad = recipe.sketch.batch_size, tokenizer.pad_token_id
    out = {}
    for split in splits:
        frame = usable(examples, split)
        rows = token_rows(frame)
        out[split] = {"loss": mean_token_loss(model, rows, batch, pad)}
        if recipe.target.answer and (exact_on is None or split in exact_on):
            out[split]["exact_match"] = exact_match(model, tokenizer, rows, frame["response"].to_list(),
                                                    recipe.target.answer, batch)
    return out


def finetuned(recipe: Recipe, rows: Rows, finetunes: Path, pad_id: int, until: float = 1.0):
    """The base model fine-tuned on `rows` with meta-init's settings (or, `until` < 1, that
    fine-tune stopped after that fraction of its steps), in eval mode; a fine-tune of the same rows
    in `finetunes` is reused, or continued from where a shorter one stopped."""
    folder = finetune_folder(recipe, rows, finetunes)
    trained = FineTune(folder)
    wanted = trained.theta if until >= 1 else trained.snapshot(until, training_steps(recipe.meta_init, len(rows)))
    if not wanted.exists():
        folder.mkdir(parents=True, exist_ok=True)
        train(recipe, recipe.run.ingested, rows, folder, pad_id, desc="fine-tune", until=until)
        if trained.theta.exists():  # a short rung asked of a fine-tune that had already finished
            trained.checkpoint.unlink(missing_ok=True)
    return load_trained(recipe, recipe.run.ingested, wanted)


def finetune_and_score(recipe: Recipe, rows: Rows, finetunes: Path, splits: Sequence[str] = ("validation",),
                       exact_on: Sequence[str] | None = None, until: float = 1.0) -> dict[str, dict[str, float]]:
    """Fine-tune the base model on `rows` (or reuse that fine-tune) and `score` it on the target:
    the one measure of "what training on these rows really does" that verify, the confirm stage
    and the benchmarks share."""
    tokenizer = load_tokenizer(recipe, recipe.run.ingested)
    return score(recipe, finetuned(recipe, rows, finetunes, tokenizer.pad_token_id, until), tokenizer, splits,
                 exact_on)


def score_trained(recipe: Recipe, ingested: Ingested, trained: FineTune,
                  splits: Sequence[str] = ("validation",)) -> dict[str, dict[str, float]]:
    """A finished fine-tune (θ* included) scored on the target, as `finetune_and_score` scores one."""
    tokenizer = load_tokenizer(recipe, ingested)
    return score(recipe, load_trained(recipe, ingested, trained.theta), tokenizer, splits, exact_on=())
