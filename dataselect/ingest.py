"""Stage 1, ingestion: read every source and the target into one table of canonical examples.

A canonical example is (id, source, role, row, group, messages, prompt, response) plus its token
ids (`examples.EXAMPLE_SCHEMA`). Rows that cannot be mapped stay in the table with status
"rejected" and a reason, so every input row is accounted for from here to the manifest.
Opening a dataset, and saying why a file does not load, is `sources`'s job.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
from jinja2 import TemplateError

from .artifacts import Ingested
from .examples import EXAMPLE_SCHEMA, reasons_by_class
from .meta_init import build_tiny_model
from .progress import progress
from .recipe import Messages, Recipe, Source, Split, Target
from .sources import SourceError, open_dataset
from .tokens import encode, load_tokenizer, train_tiny_tokenizer

log = logging.getLogger(__name__)

def field(row: dict[str, Any], name: str) -> Any:
    """A column, or a nested value by dotted path (`6b_finetuning.solution`)."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


CHAT_ROLES = ("system", "user", "assistant", "tool")


def map_row(row: dict[str, Any], fmt) -> tuple[list[dict], str | None] | str:
    """Canonical messages (and an optional id) of one row, or the reason it cannot be mapped."""
    if fmt == "messages" or isinstance(fmt, Messages):
        column = fmt.messages if isinstance(fmt, Messages) else "messages"
        turns = row.get(column)
        if not isinstance(turns, list) or not turns:
            return f"field {column!r} is not a non-empty list of turns"
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
                return f"field {column!r} turn {i} lacks a string role and content"
            if t["role"] not in CHAT_ROLES:
                return f"field {column!r} turn {i}: role {t['role']!r} is not one of {', '.join(CHAT_ROLES)}"
            messages.append({"role": t["role"], "content": t["content"]})
        if messages[-1]["role"] != "assistant":
            return f"field {column!r}: last turn is {messages[-1]['role']!r}, not an assistant response"
        if not any(m["role"] != "assistant" for m in messages[:-1]):
            return f"field {column!r}: no prompt turn before the response"
        if not any(m["content"].strip() for m in messages[:-1] if m["role"] != "assistant"):
            return f"field {column!r}: every prompt turn is blank (empty prompt)"
        if not messages[-1]["content"].strip():
            return f"field {column!r}: last turn is blank (empty response)"
    else:
        messages = []
        if fmt.system and field(row, fmt.system):
            messages.append({"role": "system", "content": str(field(row, fmt.system))})
        for key, role, what in ((fmt.prompt, "user", "prompt"), (fmt.response, "assistant", "response")):
            value = field(row, key)
            if not isinstance(value, str):
                return f"field {key!r} is {'null' if value is None else type(value).__name__}, not text"
            if not value.strip():
                return f"field {key!r} is blank (empty {what})"
            messages.append({"role": role, "content": value})
    id_field = getattr(fmt, "id", None)
    given = None if id_field is None else field(row, id_field)
    return messages, (None if given is None else str(given))


def _check_columns(ds, fmt, group_by: str | None, where: str) -> None:
    """Fail fast when the format names a column the dataset does not have at all."""
    if fmt == "messages":
        wanted = ["messages"]
    elif isinstance(fmt, Messages):
        wanted = [fmt.messages] + ([fmt.id] if fmt.id else [])
    else:
        wanted = [c for c in (fmt.prompt, fmt.response, fmt.system, fmt.id) if c]
    wanted += [group_by] if group_by else []
    missing = [c for c in wanted if c.split(".")[0] not in ds.column_names]
    if missing:
        raise SourceError(f"{where}: no column {', '.join(map(repr, missing))}; it has {ds.column_names}")


def _rows(name: str, role: str, ds, fmt, group_by: str | None, where: str) -> Iterator[dict]:
    _check_columns(ds, fmt, group_by, where)
    seen: dict[str, int] = {}  # id -> the row that first used it
    prefix = name if role == "source" else f"{name}/{role}"  # target splits may reuse row numbers
    for i, row in enumerate(ds):
        out = {"id": f"{prefix}/{i}", "source": name, "role": role, "row": i, "group": None,
               "messages": None, "prompt": None, "response": None, "status": "ok", "reason": None}
        mapped = map_row(row, fmt)
        if isinstance(mapped, str):
            yield {**out, "status": "rejected", "reason": mapped}
            continue
        messages, given_id = mapped
        if given_id is not None:
            out["id"] = f"{prefix}/{given_id}"
        if out["id"] in seen:
            yield {**out, "status": "rejected",
                   "reason": f"duplicate id {out['id']!r}, first seen at row {seen[out['id']]}"}
            continue
        group = name
        if group_by is not None:
            value = field(row, group_by)
            if value is None or not str(value).strip():
                yield {**out, "status": "rejected",
                       "reason": f"field {group_by!r} (group_by) is {'null' if value is None else 'blank'}"}
                continue
            group = f"{name}/{value}"
        seen[out["id"]] = i
        user = [m["content"] for m in messages[:-1] if m["role"] == "user"]
        yield {**out, "group": group, "messages": messages, "prompt": user[-1] if user else "",
               "response": messages[-1]["content"]}


def _open(where: str, dataset: str, config: str | None, split: str, run_dir: Path, seed: int):
    """open_dataset, with errors prefixed by where the recipe names the dataset; no rows is an error."""
    try:
        ds = open_dataset(dataset, config, split, run_dir, seed)
    except SourceError as e:
        raise SourceError(f"{where}: {e}") from e
    if len(ds) == 0:
        raise SourceError(f"{where}: {dataset} (split {split!r}) has 0 rows")
    return ds


def _split_rows(target: Target, split: Split, role: str, run_dir: Path, seed: int):
    ds = _open(f"target.{role} ({target.name})", target.dataset, target.config, split.split, run_dir, seed)
    if split.size is not None and split.size < len(ds):
        ds = ds.select(sorted(random.Random(f"{seed}:{role}").sample(range(len(ds)), split.size)))
    return _rows(target.name, role, ds, target.format, None, f"target {role} ({target.dataset})")


def _source_rows(source: Source, run_dir: Path, seed: int):
    ds = _open(f"source {source.name}", source.dataset, source.config, source.split, run_dir, seed)
    if source.max_rows is not None and source.max_rows < len(ds):
        log.info("source %s: reading the first %d of %d rows (max_rows)", source.name, source.max_rows, len(ds))
        ds = ds.select(range(source.max_rows))
    return _rows(source.name, "source", ds, source.format, source.group_by, f"source {source.name} ({source.dataset})")


def read_examples(recipe: Recipe) -> pl.DataFrame:
    """Every row of every source and of the target splits, mapped or rejected."""
    rows: list[dict] = []
    for source in recipe.sources:
        rows += _source_rows(source, recipe.run_dir, recipe.seed)
    rows += _split_rows(recipe.target, recipe.target.validation, "validation", recipe.run_dir, recipe.seed)
    if recipe.target.test is not None:
        rows += _split_rows(recipe.target, recipe.target.test, "test", recipe.run_dir, recipe.seed)
    return pl.DataFrame(rows, schema=EXAMPLE_SCHEMA)

def tokenize_examples(examples: pl.DataFrame, tokenizer, max_length: int, overlong: str = "truncate") -> pl.DataFrame:
    """Add token ids and prompt length; rows with no response token left are rejected, and so are rows
    longer than max_length when `overlong` is "reject" (else they are cut and marked truncated:
    at the end, or in the middle of the prompt with "cut_prompt")."""
    ids, n_prompt, truncated, status, reason = [], [], [], [], []
    for row in progress(iterable=examples.iter_rows(named=True), total=examples.height, desc="tokenize", unit="row"):
        try:
            enc = None if row["status"] != "ok" else encode(tokenizer, row["messages"], max_length, overlong)
        except TemplateError as e:  # e.g. a template that insists on alternating user/assistant turns
            enc = f"the model's chat template refuses it: {e}"
        if isinstance(enc, tuple) and enc[2] and overlong == "reject":
            enc = f"longer than sketch.max_length={max_length} tokens (sketch.overlong: reject)"
        if isinstance(enc, str):
            status.append("rejected")
            reason.append(enc)
        else:
            status.append(row["status"])
            reason.append(row["reason"])
        ok = isinstance(enc, tuple)
        ids.append(enc[0] if ok else None)
        n_prompt.append(enc[1] if ok else None)
        truncated.append(enc[2] if ok else None)
    return examples.with_columns(
        pl.Series("input_ids", ids, dtype=pl.List(pl.Int32)), pl.Series("n_prompt_tokens", n_prompt, dtype=pl.Int32),
        pl.Series("truncated", truncated, dtype=pl.Boolean), pl.Series("status", status), pl.Series("reason", reason),
    ).with_columns(n_tokens=pl.col("input_ids").list.len().cast(pl.Int32))



def ingest_summary(examples: pl.DataFrame) -> dict:
    """Counts per source and role: rows read, accepted, rejected by reason, truncated."""
    out = {}
    for (source, role), part in examples.group_by(["source", "role"], maintain_order=True):
        rejected = part.filter(pl.col("status") == "rejected")
        out[f"{source}:{role}" if role != "source" else source] = {
            "role": role, "rows": part.height, "accepted": part.height - rejected.height,
            "rejected": rejected.height, "truncated": int(part["truncated"].fill_null(False).sum()),
            "rejected_by_reason": reasons_by_class(rejected),
        }
    return out


def stage(recipe: Recipe, out: Path) -> dict:
    """Read, map and tokenize everything; for a tiny model, train its tokenizer and build it here."""
    folder = Ingested(out)
    examples = read_examples(recipe)
    if recipe.model.tiny is not None:
        usable = examples.filter((pl.col("status") == "ok") & (pl.col("role") != "test"))
        texts = (m["content"] for turns in usable["messages"] for m in turns)
        tokenizer = train_tiny_tokenizer(texts, recipe.model.tiny.vocab_size)
        tokenizer.save_pretrained(folder.base)
        build_tiny_model(recipe, tokenizer).save_pretrained(folder.base)
    else:
        tokenizer = load_tokenizer(recipe)
    examples = tokenize_examples(examples, tokenizer, recipe.sketch.max_length, recipe.sketch.overlong)
    source_rows = examples.filter(pl.col("role") == "source")
    for s in recipe.sources:
        _require_usable(f"source {s.name} ({s.dataset})", source_rows.filter(pl.col("source") == s.name))
    _require_usable(f"target {recipe.target.name}: validation split", examples.filter(pl.col("role") == "validation"))
    folder.write_examples(examples)
    return {"rows": ingest_summary(examples)}


def _require_usable(what: str, part: pl.DataFrame) -> None:
    """A source (or validation split) whose rows were all rejected is a mapping mistake: say so now."""
    if part.filter(pl.col("status") == "ok").height:
        return
    reasons = part["reason"].value_counts(sort=True).head(3).rows()
    raise SourceError(f"{what}: no usable rows; all {part.height} were rejected: "
                      + "; ".join(f"{reason} ({n})" for reason, n in reasons))

