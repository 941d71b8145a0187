"""Text to token ids: the tokenizer, the chat template, and a conversation as ids with its prompt
masked, the form every stage that runs the model consumes.

The base model's location is resolved here too (`pretrained_args`), since a pretrained tokenizer
ships beside its model; `meta_init` loads the model from the same place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .artifacts import Ingested
from .errors import UserError
from .recipe import Model, Recipe

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


class ModelError(UserError, RuntimeError):
    """A model or tokenizer that cannot be loaded, named by its path or Hub id."""


GGUF_INSTALL = "pip install 'dataselect[gguf]' (or pip install 'gguf>=0.10')"


def model_error(spec: Model, what: str, error: Exception) -> ModelError:
    """`what` (the model, its tokenizer) did not load from `model.base`: the error names it and the
    cause. A GGUF file read without the `gguf` package, which transformers reports as "Please
    install torch and gguf>=0.10.0", says how to install it instead: torch is there, and the
    `gguf` extra is what is missing."""
    if (isinstance(error, ImportError) and error.name == "gguf") or re.search(r"install\b[^.]*\bgguf", str(error), re.I):
        file = spec.base if not spec.gguf_file else f"{spec.gguf_file} in {spec.base}"
        return ModelError(f"model.base: reading the GGUF file {file} needs the `gguf` package, which is not "
                          f"installed: {GGUF_INSTALL}")
    return ModelError(f"model.base: cannot load {what} from {spec.base}: {error}")


def pretrained_args(spec: Model) -> tuple[str, dict]:
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


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int):
    """A BPE tokenizer with single-digit tokens, trained on the recipe's own text."""
    from transformers import PreTrainedTokenizerFast  # transformers takes seconds to import: only when used

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


def load_tokenizer(recipe: Recipe, ingested: Ingested):
    """The tiny model's tokenizer `ingested` holds, or the base model's, with a pad token and a chat template."""
    from transformers import AutoTokenizer  # transformers takes seconds to import: only when used

    if recipe.model.tiny is not None:
        return AutoTokenizer.from_pretrained(ingested.base)
    name, kwargs = pretrained_args(recipe.model)
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as e:  # transformers raises many types; the user needs the name and cause
        raise model_error(recipe.model, "tokenizer", e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        log.info("tokenizer of %s has no chat template; using dataselect's plain template", recipe.model.base)
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


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
