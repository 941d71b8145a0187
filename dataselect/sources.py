"""Stage 1, ingestion: read every source and the target into one table of canonical examples.

A canonical example is (id, source, role, row, group, messages, prompt, response) plus its token
ids. Rows that cannot be mapped stay in the table with status "rejected" and a reason, so every
input row is accounted for from here to the manifest.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import logging
import lzma
import os
import random
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl

from . import demo
from .artifacts import Ingested, Run
from .model import encode, progress
from .recipe import Messages, Recipe, Source, Split, Target

log = logging.getLogger(__name__)

ROLES = ("source", "validation", "test")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_TEXT_BUILDERS = ("json", "csv")
# datasets decompresses these text data files on the fly; a parquet file is compressed inside already
_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
_BUILDERS = {**_FILE_BUILDERS, **{kind + c: builder for kind, builder in _FILE_BUILDERS.items()
                                  if builder in _TEXT_BUILDERS for c in _COMPRESSIONS}}
_SUPPORTED = (f"use one of {', '.join(_FILE_BUILDERS)}, or a .json, .jsonl or .csv file compressed as "
              f"{', '.join(_COMPRESSIONS[:-1])} or {_COMPRESSIONS[-1]}")
_EMPTY = "the file is empty (0 rows)"


class SourceError(ValueError):
    """A dataset that cannot be opened, or a field the format names that it lacks."""


def open_dataset(dataset: str, config: str | None, split: str, run_dir: Path, seed: int):
    """One split of a Hub dataset, a local file (maybe compressed), a glob pattern of local files, a
    folder, a saved dataset, or a demo dataset."""
    import datasets

    if dataset.startswith("demo:"):
        dataset = str(demo.materialize(dataset.removeprefix("demo:"), Run(run_dir).demo_data, seed))
    path = Path(dataset).expanduser()
    try:
        if path.is_file():
            builder = _BUILDERS.get(_file_type(path))
            if builder is None:
                raise SourceError(f"{dataset}: unsupported file type {_file_type(path)!r}; {_SUPPORTED}")
            return _load_files(dataset, [path], builder, split, pattern=False)
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                saved = datasets.load_from_disk(str(path))
                if isinstance(saved, datasets.DatasetDict):
                    if split not in saved:
                        raise SourceError(f"{dataset}: no split {split!r}; it has {sorted(saved)}")
                    return saved[split]
                return saved
            return datasets.load_dataset(str(path), config, split=split)
        if any(c in dataset for c in "*?["):
            files, builder = _matching_files(dataset)
            return _load_files(dataset, files, builder, split, pattern=True)
        if dataset.startswith((".", "/", "~")) or path.suffix.lower() in (*_FILE_BUILDERS, *_COMPRESSIONS):
            raise SourceError(f"{dataset}: no such file or folder")
        return datasets.load_dataset(dataset, config, split=split)
    except SourceError:
        raise
    except Exception as e:  # datasets raises a zoo of types; keep the name and the cause
        raise SourceError(f"{dataset} (split {split!r}): cannot load: {_cause(e)}") from e


def _load_files(dataset: str, files: list[Path], builder: str, split: str, pattern: bool):
    """The 'train' split (or a slice of it) of local files of one builder: one file, or the files a
    glob pattern matched, in order. Problems name the file (after the pattern, for a pattern)."""
    import datasets

    def at(file: Path) -> str:
        return f"{dataset}: {file}" if pattern else dataset

    what = "the files a pattern matches have" if pattern else "a single file has"
    if split != "train" and not split.startswith("train["):
        raise SourceError(f"{dataset}: {what} only the 'train' split (or a slice such as "
                          f"'train[:1000]'), not {split!r}")
    if not pattern and files[0].stat().st_size == 0:
        raise SourceError(f"{dataset}: {_EMPTY}")
    # pyarrow reads invalid UTF-8 into JSON strings unchecked; it would fail later, nameless
    for file in files if builder in _TEXT_BUILDERS else ():
        try:
            problem = _not_utf8(file)
        except _decompress_errors() as e:  # a corrupt or truncated .gz, .zst, ...: the whole stream was read
            raise SourceError(f"{at(file)}: cannot read it as {_file_type(file)}: {type(e).__name__}: {e}") from e
        if problem:
            raise SourceError(f"{at(file)}: {problem}")
    data_files = [str(f) for f in files] if pattern else str(files[0])
    try:
        return datasets.load_dataset(builder, data_files=data_files, split=split)
    except Exception as e:
        problems = [(f, _diagnose_file(f, builder)) for f in files]  # the line at fault, found only now
        for file, problem in problems:
            if problem and problem != _EMPTY:
                raise SourceError(f"{at(file)}: {problem}") from e
        if problems and all(problem == _EMPTY for _, problem in problems):
            raise SourceError(f"{dataset}: {_EMPTY}" if not pattern else
                              f"{dataset}: all {len(files)} matching files are empty (0 rows)") from e
        noun = "the matching files have" if pattern else "the file has"
        if "[" in split:
            raise SourceError(f"{dataset}: split {split!r} is out of range or malformed ({_cause(e)}); "
                              f"{_row_count(builder, data_files, noun)}write a slice as 'train[:1000]', "
                              f"'train[100:200]' or 'train[:10%]'") from e
        if "corresponds to no data" in str(e):  # e.g. a CSV file with only its header line
            raise SourceError(f"{dataset}: {noun} 0 rows") from e
        raise


def _file_type(path: Path) -> str:
    """The suffix that says how to read a file: '.jsonl', or '.jsonl.gz' when compressed."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSIONS:
        return suffixes[-2] + suffixes[-1]
    return path.suffix.lower()


def _matching_files(pattern: str) -> tuple[list[Path], str]:
    """The files a glob pattern matches, sorted by name so that shards keep their order, and the one
    builder that reads them all."""
    files = sorted((Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)),
                   key=str)
    if not files:
        where = "" if Path(pattern).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
        raise SourceError(f"{pattern}: no file matches this pattern{where}")
    by_type: dict[str, list[Path]] = {}
    for file in files:
        by_type.setdefault(_file_type(file), []).append(file)
    builders = {_BUILDERS.get(kind) for kind in by_type}
    if len(builders) > 1 or None in builders and len(by_type) > 1:  # .jsonl with .jsonl.gz is one builder
        kinds = "; ".join(f"{kind}: {len(group)} ({group[0]}{', ...' if len(group) > 1 else ''})"
                          for kind, group in sorted(by_type.items()))
        raise SourceError(f"{pattern}: the matching files mix file types ({kinds}); "
                          "make the pattern match files of one type, such as '*.parquet'")
    kind, group = next(iter(by_type.items()))
    if None in builders:
        raise SourceError(f"{pattern}: unsupported file type {kind!r} ({group[0]}); {_SUPPORTED}")
    return files, builders.pop()


def _open_bytes(path: Path) -> BinaryIO:
    """The bytes of a file as datasets reads them: decompressed when its name ends in a compression suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # the bare reader cannot iterate lines
    return path.open("rb")


def _decompress_errors() -> tuple[type[BaseException], ...]:
    """What reading a corrupt or truncated compressed file raises, by format."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


def _cause(e: BaseException) -> str:
    """The message of an exception, with that of its root cause where datasets hides it behind
    "An error occurred while generating the dataset"."""
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = str(e) or type(e).__name__
    if type(e).__name__ == "DatasetGenerationError" and root is not e and str(root):
        text += f" ({type(root).__name__}: {root})"
    return text


def _row_count(builder: str, data_files: str | list[str], noun: str = "the file has") -> str:
    import datasets

    try:
        n = len(datasets.load_dataset(builder, data_files=data_files, split="train"))
    except Exception:  # noqa: BLE001 - only a hint inside another error's message
        return ""
    return f"{noun} {n} row{'' if n == 1 else 's'}; "


def _not_utf8(path: Path) -> str | None:
    """Where a text file first stops being UTF-8 ("line N: ..."), or None. A fast pass over the
    whole file first; the line-by-line pass runs only when it found something."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_bytes(path) as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
        return None
    except UnicodeDecodeError:
        pass
    with _open_bytes(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                        "save the file as UTF-8")
    return "not UTF-8 text; save the file as UTF-8"


def _diagnose_file(path: Path, builder: str) -> str | None:
    """Why a local JSON, JSON Lines or CSV file (already known to be UTF-8) does not load, naming the
    line: a line that is not JSON or not an object, or no rows at all. None: none of these."""
    if builder not in _TEXT_BUILDERS:
        return None
    with _open_bytes(path) as f:
        if not any(raw.strip() for raw in f):
            return _EMPTY
    if builder == "csv":
        return None
    if _file_type(path).split(".")[1] == "json":  # one JSON document, or JSON Lines under a .json name
        try:
            with _open_bytes(path) as f:
                document = json.loads(f.read().decode("utf-8-sig"))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                return f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        else:
            items = document if isinstance(document, list) else [document]
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    return f"item {i} is a JSON {type(item).__name__}, not an object with one field per column"
            return None
    with _open_bytes(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.decode("utf-8").rstrip("\r\n")
            line = line.removeprefix("\ufeff") if n == 1 else line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return (f"line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                        "each line of a JSON Lines file must be one complete JSON object")
            if not isinstance(row, dict):
                return f"line {n}: a JSON {type(row).__name__}, not an object with one field per column"
    return None


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


EXAMPLE_SCHEMA = {
    "id": pl.String, "source": pl.String, "role": pl.String, "row": pl.Int64, "group": pl.String,
    "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
    "prompt": pl.String, "response": pl.String, "status": pl.String, "reason": pl.String,
}


def tokenize_examples(examples: pl.DataFrame, tokenizer, max_length: int, overlong: str = "truncate") -> pl.DataFrame:
    """Add token ids and prompt length; rows with no response token left are rejected, and so are rows
    longer than max_length when `overlong` is "reject" (else they are cut and marked truncated:
    at the end, or in the middle of the prompt with "cut_prompt")."""
    from jinja2 import TemplateError

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


def reason_class(reason: str) -> str:
    """A rejection reason without its per-row detail ("prompt alone is N tokens", "duplicate id"),
    so a manifest counts a few classes, not one key per token count; rows.parquet keeps the detail."""
    if reason.startswith("duplicate id "):
        return "duplicate id"
    return re.sub(r"(?<![=\w.])\d+", "N", reason)


def reasons_by_class(rejected: pl.DataFrame) -> dict[str, int]:
    """How many rejected rows each reason class holds, most first."""
    classes = pl.DataFrame({"reason": [reason_class(r) for r in rejected["reason"]]}, schema={"reason": pl.String})
    counts = classes.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    return dict(zip(counts["reason"].to_list(), counts["len"].to_list()))


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
    from .model import build_tiny_model, load_tokenizer, train_tiny_tokenizer

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


def usable(examples: pl.DataFrame, role: str, source: str | None = None) -> pl.DataFrame:
    """Accepted rows of one role (and source), in input order."""
    keep = (pl.col("status") == "ok") & (pl.col("role") == role)
    if source is not None:
        keep &= pl.col("source") == source
    return examples.filter(keep)


def token_rows(examples: pl.DataFrame) -> list[tuple[list[int], int]]:
    """(input ids, prompt length) pairs, the form the model stages consume."""
    return list(zip(examples["input_ids"].to_list(), examples["n_prompt_tokens"].to_list()))
