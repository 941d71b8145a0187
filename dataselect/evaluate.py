"""Scoring a model on the target, and the real fine-tunes that verify and the benchmarks score.

A fine-tune here is meta-init's training from the base model on some rows (a subset of groups,
a selected mixture), kept in a folder keyed by everything it depends on, so a second verify or
benchmark run, or another target over the same pool, reuses it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .artifacts import FineTune
from .examples import token_rows, usable
from .meta_init import load_theta_star, meta_init
from .recipe import Recipe
from .tokens import load_tokenizer, pad_batch, response_logprobs

Rows = list[tuple[list[int], int]]


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


def finetuned(recipe: Recipe, rows: Rows, finetunes: Path, pad_id: int):
    """The base model fine-tuned on `rows` with meta-init's settings, in eval mode; a finished
    fine-tune of the same rows in `finetunes` is reused."""
    folder = finetune_folder(recipe, rows, finetunes)
    theta = FineTune(folder).theta
    if not theta.exists():
        folder.mkdir(parents=True, exist_ok=True)
        meta_init(recipe, recipe.run.ingested, rows, folder, pad_id)
    return load_theta_star(recipe, recipe.run.ingested, theta)


def finetune_and_score(recipe: Recipe, rows: Rows, finetunes: Path, splits: Sequence[str] = ("validation",),
                       exact_on: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Fine-tune the base model on `rows` (or reuse that fine-tune) and `score` it on the target:
    the one measure of "what training on these rows really does" that verify and the benchmarks share."""
    tokenizer = load_tokenizer(recipe, recipe.run.ingested)
    return score(recipe, finetuned(recipe, rows, finetunes, tokenizer.pad_token_id), tokenizer, splits, exact_on)
