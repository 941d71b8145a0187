"""Stage 2, meta-initialization: load the base model, fine-tune it once on all sources (θ*).

Also owns what every later stage needs from the model: the tokenizer, turning a conversation
into token ids with the prompt masked, padding a batch, and reloading θ*.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .artifacts import FineTune
from .recipe import MetaInit, Model, Recipe

log = logging.getLogger(__name__)

TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# Used by the tiny model, and by base models that ship without a chat template.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% else %}User: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def progress(**kwargs) -> tqdm:
    """A progress bar with rate and ETA, off when the CLI runs quiet (TQDM_DISABLE=1)."""
    return tqdm(disable=os.environ.get("TQDM_DISABLE") == "1", **kwargs)


class ModelError(RuntimeError):
    """A model or tokenizer that cannot be loaded, named by its path or Hub id."""


# --- tokenizer and base model -------------------------------------------------------------

def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int):
    """A BPE tokenizer with single-digit tokens, trained on the recipe's own text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = PLAIN_CHAT_TEMPLATE
    return fast


def build_tiny_model(recipe: Recipe, tokenizer):
    """A randomly initialised Llama-style LM sized by `model.tiny`, seeded by the recipe."""
    from transformers import LlamaConfig, LlamaForCausalLM

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


def _pretrained_args(spec: Model) -> tuple[str, dict]:
    """Resolve `model.base` to from_pretrained arguments (Hub id, folder, or GGUF file)."""
    base, kwargs = spec.base, {"trust_remote_code": spec.trust_remote_code}
    assert base is not None
    if spec.revision:
        kwargs["revision"] = spec.revision
    path = Path(base)
    if base.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.base: GGUF file {base} not found")
        return str(path.parent), {**kwargs, "gguf_file": path.name}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    if (base.startswith((".", "/", "~")) or path.exists()) and not path.is_dir():
        raise ModelError(f"model.base: local model folder {base} not found")
    if path.is_dir() and not spec.gguf_file and not (path / "config.json").exists():
        raise ModelError(f"model.base: {base} has no config.json; not a model folder")
    return base, kwargs


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    if recipe.model.tiny is not None:
        return AutoTokenizer.from_pretrained(recipe.run.ingested.base)
    name, kwargs = _pretrained_args(recipe.model)
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as e:  # transformers raises many types; the user needs the name and cause
        raise ModelError(f"model.base: cannot load tokenizer from {recipe.model.base}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        log.info("tokenizer of %s has no chat template; using dataselect's plain template", recipe.model.base)
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def load_base_model(recipe: Recipe):
    """The pretrained (or freshly built tiny) model, float32, eager attention for per-example grads."""
    from transformers import AutoModelForCausalLM

    if recipe.model.tiny is not None:
        path, kwargs = recipe.run.ingested.base, {}
    else:
        path, kwargs = _pretrained_args(recipe.model)
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
    from peft import LoraConfig, get_peft_model

    spec = recipe.model.lora
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(recipe.seed)
    return get_peft_model(model, config)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters meta-init trains and sketches differentiate: one definition for both."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- examples as token ids ----------------------------------------------------------------

def encode(tokenizer, messages: list[dict], max_length: int,
           overlong: str = "truncate") -> tuple[list[int], int, bool] | str:
    """Token ids of a conversation and how many belong to the prompt, or a rejection reason.

    The prompt is everything before the final assistant turn as the chat template renders it;
    loss and gradients see only the response tokens. A row over `max_length` is cut at its end
    (`truncate`), or, with `cut_prompt`, loses the middle of its prompt first (an instruction's
    head and its question at the tail survive a long passage), so the response stays whole.
    """
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        return "chat template does not render the prompt as a prefix of the conversation"
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n_prompt = sum(1 for start, _ in offsets if start < len(prompt_text))
    if n_prompt >= len(ids):
        return "response has no tokens"
    overflow = len(ids) > max_length
    if overlong == "cut_prompt" and overflow:
        ids, n_prompt = cut_prompt_middle(ids, n_prompt, max_length)
    elif n_prompt >= max_length:
        return f"prompt alone is {n_prompt} tokens, not shorter than sketch.max_length={max_length}"
    return ids[:max_length], n_prompt, overflow


def cut_prompt_middle(ids: list[int], n_prompt: int, max_length: int) -> tuple[list[int], int]:
    """Drop the middle of the prompt so the response fits; the prompt keeps at least a quarter of
    `max_length` (a response longer than the rest is then cut at its end by the caller)."""
    keep = min(n_prompt, max(max_length - (len(ids) - n_prompt), max_length // 4))
    head = keep // 2
    return ids[:head] + ids[n_prompt - (keep - head) :], keep


def pad_batch(rows: Sequence[tuple[Sequence[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and a mask of the positions whose next token is gold."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target[i, n_prompt - 1 : len(ids) - 1] = True  # position t predicts token t+1
    return {"input_ids": input_ids, "attention_mask": attention, "target_mask": target}


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log p(gold next token) at every position (zero where target_mask is off)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nxt = torch.roll(input_ids, -1, dims=-1)
    gold = torch.gather(logp, -1, nxt.unsqueeze(-1)).squeeze(-1)
    return torch.where(target_mask, gold, torch.zeros_like(gold))


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
    from safetensors import safe_open

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


def meta_init(recipe: Recipe, rows: list[tuple[list[int], int]], out_dir: Path, pad_id: int,
              snapshots: Sequence[float] = ()) -> dict:
    """Fine-tune the base on `rows` (token CE on response tokens) and save θ* as safetensors.

    A checkpoint every 5% of the steps (or 10 minutes) lets a killed run continue where it was,
    to the same θ* bit for bit as an uninterrupted run. `snapshots`: fractions of the steps at
    which the trainable parameters are also kept (`FineTune.snapshot`; 0 is the start), points
    along the path from the base to θ*.
    """
    spec = recipe.meta_init
    model = with_trainable(load_base_model(recipe), recipe)
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


def mean_token_loss(model, rows: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> float:
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


def exact_match(model, tokenizer, rows: list[tuple[list[int], int]], gold: list[str], pattern: str,
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


def load_theta_star(recipe: Recipe, path: Path | None = None):
    """The base model with the trainable parameters set to θ* (or to a fine-tune saved the same
    way at `path`), in eval mode."""
    model = with_trainable(load_base_model(recipe), recipe)
    path = path or recipe.run.meta_init.theta
    state = load_file(path)
    params = trainable_parameters(model)
    if set(state) != set(params):
        raise ModelError(f"{path} does not match the recipe's trainable parameters; rerun with --force")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return model.eval()


def stage(recipe: Recipe, out: Path) -> dict:
    from .sources import token_rows, usable

    examples = recipe.run.ingested.examples()
    by_source = {s.name: token_rows(usable(examples, "source", s.name)) for s in recipe.sources}
    rows = meta_train_rows(recipe, by_source)
    return meta_init(recipe, rows, out, load_tokenizer(recipe).pad_token_id, recipe.sketch_path)
