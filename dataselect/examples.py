"""The canonical example table ingest writes (`examples.parquet`) and the readers every later
stage shares: which rows are usable, their token ids, and rejection reasons counted by class.

One row per input row of every source and target split: id, source, role, row, group, messages,
prompt, response, status ("ok" or "rejected"), reason and, for a clustered source, the row's values
of its label columns (what its clusters are described by), plus the token columns ingest adds.
"""

from __future__ import annotations

import re

import polars as pl

EXAMPLE_SCHEMA = {
    "id": pl.String, "source": pl.String, "role": pl.String, "row": pl.Int64, "group": pl.String,
    "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
    "prompt": pl.String, "response": pl.String, "status": pl.String, "reason": pl.String,
    "labels": pl.List(pl.Struct({"column": pl.String, "value": pl.String})),
}


def usable(examples: pl.DataFrame, role: str, source: str | None = None) -> pl.DataFrame:
    """Accepted rows of one role (and source), in input order."""
    keep = (pl.col("status") == "ok") & (pl.col("role") == role)
    if source is not None:
        keep &= pl.col("source") == source
    return examples.filter(keep)


def token_rows(examples: pl.DataFrame) -> list[tuple[list[int], int]]:
    """(input ids, prompt length) pairs, the form the model stages consume."""
    return list(zip(examples["input_ids"].to_list(), examples["n_prompt_tokens"].to_list()))


def response_tokens(examples: pl.DataFrame) -> dict[str, int]:
    """Each example's response tokens by id: what the training loss averages over."""
    return dict(zip(examples["id"], (examples["n_tokens"] - examples["n_prompt_tokens"]).to_list()))


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
