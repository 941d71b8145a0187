"""Stage 1, ingestion: read every source and the target into one table of canonical examples.

A canonical example is (id, source, role, row, group, messages, prompt, response) plus its token
ids. Rows that cannot be mapped stay in the table with status "rejected" and a reason, so every
input row is accounted for from here to the manifest.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from . import demo
from .model import encode, progress
from .recipe import Messages, Recipe, Source, Split, Target

log = logging.getLogger(__name__)

ROLES = ("source", "validation", "test")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class SourceError(ValueError):
    """A dataset that cannot be opened, or a field the format names that it lacks."""


def open_dataset(dataset: str, config: str | None, split: str, run_dir: Path, seed: int):
    """One split of a Hub dataset, a local file or folder, a saved dataset, or a demo dataset."""
    import datasets

    if dataset.startswith("demo:"):
        dataset = str(demo.materialize(dataset.removeprefix("demo:"), run_dir / "demo_data", seed))
    path = Path(dataset).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise SourceError(f"{dataset}: unsupported file type {path.suffix!r}; "
                                  f"use one of {', '.join(_FILE_BUILDERS)}")
            if split != "train" and not split.startswith("train["):
                raise SourceError(f"{dataset}: a single file has only the 'train' split (or a slice such as "
                                  f"'train[:1000]'), not {split!r}")
            return datasets.load_dataset(builder, data_files=str(path), split=split)
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                saved = datasets.load_from_disk(str(path))
                if isinstance(saved, datasets.DatasetDict):
                    if split not in saved:
                        raise SourceError(f"{dataset}: no split {split!r}; it has {sorted(saved)}")
                    return saved[split]
                return saved
            return datasets.load_dataset(str(path), config, split=split)
        if dataset.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS:
            raise SourceError(f"{dataset}: no such file or folder")
        return datasets.load_dataset(dataset, config, split=split)
    except SourceError:
        raise
    except Exception as e:  # datasets raises a zoo of types; keep the name and the cause
        raise SourceError(f"{dataset} (split {split!r}): cannot load: {e}") from e


def field(row: dict[str, Any], name: str) -> Any:
    """A column, or a nested value by dotted path (`6b_finetuning.solution`)."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


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
            messages.append({"role": t["role"], "content": t["content"]})
        if messages[-1]["role"] != "assistant":
            return f"field {column!r}: last turn is {messages[-1]['role']!r}, not an assistant response"
        if not any(m["role"] != "assistant" for m in messages[:-1]):
            return f"field {column!r}: no prompt turn before the response"
    else:
        messages = []
        if fmt.system and field(row, fmt.system):
            messages.append({"role": "system", "content": str(field(row, fmt.system))})
        for key, role in ((fmt.prompt, "user"), (fmt.response, "assistant")):
            value = field(row, key)
            if not isinstance(value, str):
                return f"field {key!r} is {'null' if value is None else type(value).__name__}, not text"
            messages.append({"role": role, "content": value})
    if not messages[-1]["content"].strip():
        return "empty response"
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
    seen: set[str] = set()
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
            yield {**out, "status": "rejected", "reason": f"duplicate id {out['id']!r}"}
            continue
        seen.add(out["id"])
        group = name if group_by is None else f"{name}/{field(row, group_by)}"
        user = [m["content"] for m in messages[:-1] if m["role"] == "user"]
        yield {**out, "group": group, "messages": messages, "prompt": user[-1] if user else "",
               "response": messages[-1]["content"]}


def _split_rows(target: Target, split: Split, role: str, run_dir: Path, seed: int):
    ds = open_dataset(target.dataset, target.config, split.split, run_dir, seed)
    if split.size is not None and split.size < len(ds):
        ds = ds.select(sorted(random.Random(f"{seed}:{role}").sample(range(len(ds)), split.size)))
    return _rows(target.name, role, ds, target.format, None, f"target {role} ({target.dataset})")


def _source_rows(source: Source, run_dir: Path, seed: int):
    ds = open_dataset(source.dataset, source.config, source.split, run_dir, seed)
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


EXAMPLE_SCHEMA = {
    "id": pl.String, "source": pl.String, "role": pl.String, "row": pl.Int64, "group": pl.String,
    "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
    "prompt": pl.String, "response": pl.String, "status": pl.String, "reason": pl.String,
}


def tokenize_examples(examples: pl.DataFrame, tokenizer, max_length: int) -> pl.DataFrame:
    """Add token ids and prompt length; rows with no response token left are rejected."""
    ids, n_prompt, truncated, status, reason = [], [], [], [], []
    for row in progress(iterable=examples.iter_rows(named=True), total=examples.height, desc="tokenize", unit="row"):
        enc = None if row["status"] != "ok" else encode(tokenizer, row["messages"], max_length)
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
        reasons = rejected.group_by("reason").len().sort("len", descending=True)
        out[f"{source}:{role}" if role != "source" else source] = {
            "role": role, "rows": part.height, "accepted": part.height - rejected.height,
            "rejected": rejected.height, "truncated": int(part["truncated"].fill_null(False).sum()),
            "rejected_by_reason": dict(zip(reasons["reason"].to_list(), reasons["len"].to_list())),
        }
    return out


def stage(recipe: Recipe, out: Path) -> dict:
    """Read, map and tokenize everything; for a tiny model, train its tokenizer and build it here."""
    from .model import build_tiny_model, load_tokenizer, train_tiny_tokenizer

    examples = read_examples(recipe)
    if recipe.model.tiny is not None:
        usable = examples.filter((pl.col("status") == "ok") & (pl.col("role") != "test"))
        texts = (m["content"] for turns in usable["messages"] for m in turns)
        tokenizer = train_tiny_tokenizer(texts, recipe.model.tiny.vocab_size)
        tokenizer.save_pretrained(out / "base")
        build_tiny_model(recipe, tokenizer).save_pretrained(out / "base")
    else:
        tokenizer = load_tokenizer(recipe)
    examples = tokenize_examples(examples, tokenizer, recipe.sketch.max_length)
    if examples.filter((pl.col("role") == "validation") & (pl.col("status") == "ok")).height == 0:
        raise SourceError(f"target {recipe.target.name}: no usable validation rows")
    examples.write_parquet(out / "examples.parquet")
    return {"rows": ingest_summary(examples)}


def read_ingested(recipe: Recipe) -> pl.DataFrame:
    return pl.read_parquet(recipe.run_dir / "ingest" / "examples.parquet")


def usable(examples: pl.DataFrame, role: str, source: str | None = None) -> pl.DataFrame:
    """Accepted rows of one role (and source), in input order."""
    keep = (pl.col("status") == "ok") & (pl.col("role") == role)
    if source is not None:
        keep &= pl.col("source") == source
    return examples.filter(keep)


def token_rows(examples: pl.DataFrame) -> list[tuple[list[int], int]]:
    """(input ids, prompt length) pairs, the form the model stages consume."""
    return list(zip(examples["input_ids"].to_list(), examples["n_prompt_tokens"].to_list()))
