"""Stage 1, ingestion: read every source and the target into one table of canonical examples.

A canonical example is (id, source, role, row, group, messages, prompt, response) plus its token
ids (`examples.EXAMPLE_SCHEMA`). Rows that cannot be mapped stay in the table with status
"rejected" and a reason, so every input row is accounted for from here to the manifest.
Opening a dataset, and saying why a file does not load, is `sources`'s job; drawing a source's
`max_rows` sample (seeded, stratified by `group_by`, streamed for a remote source) is this one's.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Hashable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from jinja2 import TemplateError

from . import duplicates
from .artifacts import Ingested
from .examples import EXAMPLE_SCHEMA, reasons_by_class
from .trainer import build_tiny_model
from .progress import progress
from .recipe import Messages, Recipe, RecipeError, Source, Split, Target
from .sources import SourceError, is_remote, open_dataset, open_stream
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
    return messages, given_id(row, fmt)


def given_id(row: dict[str, Any], fmt) -> str | None:
    """The row's own id, from the column the format names (`format.id`), or None. Read for a
    rejected row too, so that the user finds it in rows.parquet under the id they know."""
    id_field = getattr(fmt, "id", None)
    given = None if id_field is None else field(row, id_field)
    return None if given is None else str(given)


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


LABEL_COLUMNS = 3  # label columns kept per clustered source
LABEL_VALUES = 50  # a label column holds at most this many distinct values


def label_columns(ds, fmt, group_by: str | None) -> list[str]:
    """The columns of a clustered source that may say what a row is (a task, the dataset it came
    from), to describe its clusters by: top-level columns the format does not read, of text,
    numbers or booleans, with at most LABEL_VALUES distinct values and fewer than half as many as
    rows (an id or a free-text column is not one); the first LABEL_COLUMNS of them."""
    import datasets  # only to read the column types of a dataset already open

    if fmt == "messages":
        used = {"messages"}
    elif isinstance(fmt, Messages):
        used = {fmt.messages, fmt.id}
    else:
        used = {fmt.prompt, fmt.response, fmt.system, fmt.id}
    used = {c.split(".")[0] for c in used | {group_by} if c}
    found = []
    for column, kind in (ds.features or {}).items():
        if column in used or not isinstance(kind, datasets.Value) or kind.dtype in ("binary", "large_binary"):
            continue
        distinct = set()
        for value in ds[column]:
            if value is not None:
                distinct.add(str(value))
                if len(distinct) > LABEL_VALUES:
                    break
        if distinct and len(distinct) <= LABEL_VALUES and 2 * len(distinct) <= len(ds):
            found.append(column)
            if len(found) == LABEL_COLUMNS:
                break
    return found


def _rows(name: str, role: str, ds, fmt, group_by: str | None, where: str,
          numbers: Sequence[int] | None = None, clustered: bool = False) -> Iterator[dict]:
    """The examples of a dataset's rows; `numbers`: each row's number in the split it was sampled
    from (default: its place in `ds`), which its id takes when the format names no id column.
    A rejected row keeps its own id and, where it can be read, its group (none in a `clustered`
    source: clusters are found among the usable rows), so that a group whose every row is
    rejected still shows up, with the reasons, and the user finds each row by the id they know.
    A clustered source's rows also carry their values of its `label_columns`, which describe its
    clusters."""
    _check_columns(ds, fmt, group_by, where)
    labelled = label_columns(ds, fmt, group_by) if clustered else []
    seen: dict[str, int] = {}  # id -> the row that first used it
    prefix = name if role == "source" else f"{name}/{role}"  # target splits may reuse row numbers
    for i, row in zip(numbers if numbers is not None else range(len(ds)), ds):
        own = given_id(row, fmt)
        group, unreadable = (None if clustered else name), None
        if group_by is not None:
            value = field(row, group_by)
            if value is None or not str(value).strip():
                group, unreadable = None, f"field {group_by!r} (group_by) is {'null' if value is None else 'blank'}"
            else:
                group = f"{name}/{value}"
        out = {"id": f"{prefix}/{i if own is None else own}", "source": name, "role": role, "row": i,
               "group": group, "messages": None, "prompt": None, "response": None, "status": "ok", "reason": None,
               "labels": [{"column": c, "value": str(row[c])} for c in labelled if row[c] is not None] or None}
        mapped = map_row(row, fmt)
        if isinstance(mapped, str):
            yield {**out, "status": "rejected", "reason": mapped}
            continue
        messages, _ = mapped
        if out["id"] in seen:
            yield {**out, "status": "rejected",
                   "reason": f"duplicate id {out['id']!r}, first seen at row {seen[out['id']]}"}
            continue
        if unreadable is not None:
            yield {**out, "status": "rejected", "reason": unreadable}
            continue
        group = name if group is None else group  # a clustered source's rows: named by cluster later
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


STREAM_BUFFER = 1000  # rows: the least shuffle buffer of a streamed sample (datasets' default)


def sample_seed(seed: int, name: str) -> int:
    """The seed of a source's `max_rows` sample, from the recipe's seed and the source's name: a rerun
    draws the same rows, and two sources of one recipe draw independently. (sha256, not `hash`,
    which changes between processes.)"""
    return int.from_bytes(hashlib.sha256(f"{seed}:max_rows:{name}".encode()).digest()[:8], "big") >> 1


def allocate(counts: Sequence[int], n: int) -> list[int]:
    """How many of `n` rows each group gets: its share n·count/total rounded down, the rows left over
    to the largest remainders (ties: the larger group, then the earlier); then, while the budget
    allows, every group with a row gets at least one, taken from the groups furthest above their
    share. No group gets more rows than it has; all of them when n covers every row."""
    total = sum(counts)
    if n >= total:
        return list(counts)
    out = [n * c // total for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda g: (-(n * counts[g] % total), -counts[g], g))
    for g in by_remainder[: n - sum(out)]:
        out[g] += 1  # its remainder is positive, so it stays below its count
    if sum(c > 0 for c in counts) <= n:
        for g in sorted((g for g, c in enumerate(counts) if c and not out[g]), key=lambda g: (-counts[g], g)):
            donor = max((d for d in range(len(counts)) if out[d] > 1),
                        key=lambda d: (out[d] * total - n * counts[d], -d))  # furthest above its share
            out[donor] -= 1
            out[g] = 1
    return out


def sample_indices(keys: Sequence[Hashable], n: int, rng: np.random.Generator) -> list[int]:
    """`n` of the positions of `keys`, drawn without replacement within each key's group by
    `allocate`, in increasing order (so the rows stay in file order)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)  # first-seen order: the draw depends only on the data and rng
    chosen: list[int] = []
    for members, k in zip(groups.values(), allocate([len(m) for m in groups.values()], n)):
        chosen += rng.choice(np.asarray(members), size=k, replace=False).tolist()
    return sorted(chosen)


def _group_key(row: dict[str, Any], group_by: str | None) -> Hashable:
    """A row's stratum for sampling: its `group_by` value as text (None when null or blank: such
    rows are sampled as a stratum of their own, and rejected later)."""
    if group_by is None:
        return None
    value = field(row, group_by)
    return None if value is None or not str(value).strip() else str(value)


def _local_sample(source: Source, ds, seed: int) -> tuple[Any, list[int] | None, dict]:
    """A `max_rows` sample of a dataset in memory (Arrow): seeded indices from numpy's Generator,
    stratified by `group_by`, selected in file order; each row keeps its number in the split."""
    available = len(ds)
    record = {"streamed": False, "stratified_by": source.group_by, "available": available, "read": available}
    if source.max_rows is None or source.max_rows >= available:
        return ds, None, {**record, "how": "all rows", "kept": available, "seed": None}
    where = f"source {source.name} ({source.dataset})"
    _check_columns(ds, source.format, source.group_by, where)  # before reading the group column
    if source.group_by is not None:
        top = source.group_by.split(".")[0]
        keys = [_group_key({top: value}, source.group_by) for value in ds[top]]
    else:
        keys = [None] * available
    drawn = sample_seed(seed, source.name)
    indices = sample_indices(keys, source.max_rows, np.random.default_rng(drawn))
    log.info("source %s: a seeded sample of %d of %d rows (max_rows%s)", source.name, len(indices), available,
             f", stratified by {source.group_by}" if source.group_by else "")
    return ds.select(indices), indices, {**record, "how": "seeded sample", "kept": len(indices), "seed": drawn}


def _stream_sample(source: Source, seed: int) -> tuple[Any, dict]:
    """A `max_rows` sample of a remote source (Hub or URL), streamed: the files are read only as far
    as the sample needs. The stream is shuffled with the source's seed (the order of its shards, up
    to 10 of them interleaved, and a buffer of B = max(1000, max_rows) rows). Without `group_by` the
    sample is its first max_rows rows (at most B + max_rows rows read); with it, its first
    W = max(B, 2·max_rows) rows form a window whose groups set each group's quota (`allocate`), and
    the sample is drawn from the window (at most B + W rows read). Either way at most
    3·max(1000, max_rows) rows. Groups absent from the window are not represented: a bounded read
    cannot know them. Materialised as a `datasets.Dataset`; a row's number is its place in the
    seeded stream."""
    import datasets  # datasets takes seconds to import: only when a source is read

    where = f"source {source.name}"
    try:
        stream = open_stream(source.dataset, source.config, source.split)
    except SourceError as e:
        raise SourceError(f"{where}: {e}") from e
    splits = stream.info.splits or {}
    available = splits[source.split].num_examples if source.split in splits else None
    features = stream.features
    if stream.num_shards < 10 and hasattr(stream, "reshard"):  # one file or a few: shuffle their parts
        stream = stream.reshard()  # (parquet row groups; a footer read per file)
    read, lock = [0], threading.Lock()  # datasets reads shards in threads

    def count(row: dict) -> dict:
        with lock:
            read[0] += 1
        return {}

    drawn = sample_seed(seed, source.name)
    n, buffer = source.max_rows, max(STREAM_BUFFER, source.max_rows)
    shuffled = stream.map(count).shuffle(seed=drawn, buffer_size=buffer)
    try:
        if source.group_by is None:
            rows = list(islice(shuffled, n))
            exhausted = len(rows) < n
        else:
            size = max(buffer, 2 * n)
            window = list(islice(shuffled, size))
            exhausted = len(window) < size
            keys = [_group_key(row, source.group_by) for row in window]
            rows = [window[i] for i in sample_indices(keys, n, np.random.default_rng(drawn))]
    except Exception as e:  # datasets raises a zoo of types while reading; keep the name and the cause
        raise SourceError(f"{where}: {source.dataset} (split {source.split!r}): cannot stream: "
                          f"{type(e).__name__}: {e}") from e
    if exhausted:
        available = read[0]  # the stream ended: every row was read
    if not rows:
        raise SourceError(f"{where}: {source.dataset} (split {source.split!r}) has 0 rows")
    log.info("source %s: a streamed seeded sample of %d rows, %d read of %s (max_rows%s)", source.name, len(rows),
             read[0], "?" if available is None else available,
             f", stratified by {source.group_by}" if source.group_by else "")
    ds = datasets.Dataset.from_list(rows, features=features)
    return ds, {"how": "streamed seeded sample", "streamed": True, "stratified_by": source.group_by,
                "available": available, "read": read[0], "kept": len(rows), "seed": drawn, "buffer": buffer}


def _source_rows(source: Source, run_dir: Path, seed: int) -> tuple[Iterator[dict], dict]:
    """A source's examples, and how they were sampled (for the ingest summary)."""
    where = f"source {source.name} ({source.dataset})"
    if source.max_rows is not None and is_remote(source.dataset):
        ds, sampling = _stream_sample(source, seed)
        numbers = None
    else:
        ds = _open(f"source {source.name}", source.dataset, source.config, source.split, run_dir, seed)
        ds, numbers, sampling = _local_sample(source, ds, seed)
    return _rows(source.name, "source", ds, source.format, source.group_by, where, numbers,
                 clustered=bool(source.clusters)), {"max_rows": source.max_rows, **sampling}


def read_examples(recipe: Recipe) -> tuple[pl.DataFrame, dict[str, dict]]:
    """Every row of every source and of the target splits, mapped or rejected; and per source how
    it was sampled."""
    rows: list[dict] = []
    sampling: dict[str, dict] = {}
    for source in recipe.sources:
        source_rows, sampling[source.name] = _source_rows(source, recipe.run_dir, recipe.seed)
        rows += source_rows
    rows += _split_rows(recipe.target, recipe.target.validation, "validation", recipe.run_dir, recipe.seed)
    if recipe.target.test is not None:
        rows += _split_rows(recipe.target, recipe.target.test, "test", recipe.run_dir, recipe.seed)
    return pl.DataFrame(rows, schema=EXAMPLE_SCHEMA), sampling

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
    examples, sampling = read_examples(recipe)
    if recipe.model.tiny is not None:
        usable = examples.filter((pl.col("status") == "ok") & (pl.col("role") != "test"))
        texts = (m["content"] for turns in usable["messages"] for m in turns)
        tokenizer = train_tiny_tokenizer(texts, recipe.model.tiny.vocab_size)
        tokenizer.save_pretrained(folder.base)
        build_tiny_model(recipe, tokenizer).save_pretrained(folder.base)
    else:
        tokenizer = load_tokenizer(recipe, folder)
    examples = tokenize_examples(examples, tokenizer, recipe.sketch.max_length, recipe.sketch.overlong)
    source_rows = examples.filter(pl.col("role") == "source")
    for s in recipe.sources:
        _require_usable(f"source {s.name} ({s.dataset})", source_rows.filter(pl.col("source") == s.name))
    _require_usable(f"target {recipe.target.name}: validation split", examples.filter(pl.col("role") == "validation"))
    warnings = check_sizes(recipe, examples)
    for warning in warnings:
        log.warning("%s", warning)
    folder.write_examples(examples)
    folder.write_duplicates(duplicates.find(examples))  # once per pool, not at every export
    return {"rows": ingest_summary(examples), "sampling": sampling, "warnings": warnings}


# The sizes a selection needs, checked here rather than after meta-init's and sketching's minutes.
# Every group's 95% interval counts the target's validation rows as a sample and estimates their
# spread from them, as it does the group's own rows: a normal interval over n rows stands in for a
# t interval with n − 1 degrees of freedom, whose spread is itself estimated to within about
# ±1/√(2(n − 1)) of its size.
MIN_VALIDATION_ROWS = 10  # below, 1.96 standard errors would need to be 2.3 or more, on a spread off by half: refused
FEW_VALIDATION_ROWS = 30  # below, intervals are wide and somewhat less than 95% sure: a warning
FEW_GROUP_ROWS = 10  # a group (or a cluster, on average) below this: its own spread rests on a handful of rows


def check_sizes(recipe: Recipe, examples: pl.DataFrame) -> list[str]:
    """The warnings a selection on these sizes deserves; a RecipeError, before any fine-tune, for a
    validation split too small to give any group an interval. Groups are counted by their usable
    rows; a clustered source's clusters are found only when it is sketched, so its rows are
    counted against `clusters`."""
    target, split = recipe.target, recipe.target.validation.split
    ok = examples.filter(pl.col("status") == "ok")
    n = ok.filter(pl.col("role") == "validation").height
    where = f"target {target.name}: validation split {split!r}"
    if n < MIN_VALIDATION_ROWS:
        raise RecipeError(
            f"{where} has {n} usable rows; selection needs at least {MIN_VALIDATION_ROWS}: every group's 95% "
            "interval counts the validation rows as a sample, and fewer cannot estimate their spread (the "
            "intervals would claim a confidence they do not have). Give target.validation a larger split, e.g. "
            "'train[:200]' (a few hundred rows let the scores decide)")
    warnings = []
    if n < FEW_VALIDATION_ROWS:
        warnings.append(
            f"{where} has only {n} usable rows: every group's interval counts them as a sample, so the intervals "
            "will be wide (the target's share of each shrinks as 1/√rows: 4× the rows halve it) and somewhat less "
            "than 95% sure, and few groups, perhaps none, will be confidently helpful or harmful (`training: "
            f"epochs` may keep none; `steps` may keep every group by default). {FEW_VALIDATION_ROWS} rows or "
            "more, better a few hundred, let the scores decide")
    sources = ok.filter(pl.col("role") == "source")
    for source in recipe.sources:
        rows = sources.filter(pl.col("source") == source.name)
        if source.clusters:
            if rows.height < FEW_GROUP_ROWS * source.clusters:
                most = f"; k-means makes at most {rows.height} clusters" if rows.height < source.clusters else ""
                warnings.append(
                    f"source {source.name}: {rows.height} usable rows for clusters: {source.clusters}, about "
                    f"{rows.height / source.clusters:.1f} a cluster{most}: a cluster's interval rests on the "
                    f"spread of a handful of rows; fewer clusters (at least {FEW_GROUP_ROWS} rows each) give "
                    "intervals that can be trusted")
            continue
        sizes = rows.group_by("group").len().filter(pl.col("len") < FEW_GROUP_ROWS).sort(["len", "group"])
        if sizes.height:
            smallest = ", ".join(f"{g} ({k})" for g, k in sizes.head(5).rows())
            total = rows["group"].n_unique()
            warnings.append(
                f"source {source.name}: {sizes.height} of its {total} groups have fewer than {FEW_GROUP_ROWS} "
                f"usable rows ({smallest}{', ...' if sizes.height > 5 else ''}): such a group's interval rests on "
                "the spread of a handful of rows (one row has none: its interval counts only the target's side), "
                "so it can look confident by chance; merge small groups or expect their decisions to be close calls")
    return warnings


def _require_usable(what: str, part: pl.DataFrame) -> None:
    """A source (or validation split) whose rows were all rejected is a mapping mistake: say so now."""
    if part.filter(pl.col("status") == "ok").height:
        return
    reasons = part["reason"].value_counts(sort=True).head(3).rows()
    raise SourceError(f"{what}: no usable rows; all {part.height} were rejected: "
                      + "; ".join(f"{reason} ({n})" for reason, n in reasons))

