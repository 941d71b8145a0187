"""Stage 6, export: the selected mixture as a Hugging Face dataset, with a manifest saying why.

`output.path` is a `save_to_disk` folder (open it with `datasets.load_from_disk`) that also holds
`manifest.json` (resolved recipe, stage summaries, per-group scores and decisions, per-source
counts), `rows.parquet` (every input row: selected, not selected, or rejected with its reason)
and the mixture as jsonl and/or parquet. The folder is written beside its final place and moved
in, so a reader never sees half a mixture.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import polars as pl

from .recipe import Recipe
from .select import read_selection
from .sources import read_ingested

MANIFEST = "manifest.json"


class ExportError(RuntimeError):
    """The output folder cannot be written, named by its path."""


def account_rows(examples: pl.DataFrame, assignments: pl.DataFrame, groups: pl.DataFrame) -> pl.DataFrame:
    """One row per input row of every source: its group and its fate, with the reason."""
    decisions = groups.select("group", "selected", group_reason="reason", score="score")
    table = (examples.filter(pl.col("role") == "source").drop("group")
             .join(assignments, on="id", how="left").join(decisions, on="group", how="left"))
    status = (pl.when(pl.col("status") == "rejected").then(pl.lit("rejected"))
              .when(pl.col("selected")).then(pl.lit("selected")).otherwise(pl.lit("not_selected")))
    reason = pl.when(pl.col("status") == "rejected").then(pl.col("reason")).otherwise(pl.col("group_reason"))
    return table.with_columns(status.alias("status"), reason.alias("reason"))


def mixture_table(accounted: pl.DataFrame, fmt: str, provenance: bool) -> pl.DataFrame:
    rows = accounted.filter(pl.col("status") == "selected")
    text = ["messages"] if fmt == "messages" else ["prompt", "response"]
    return rows.select(*text, *(["source", "group", "id", "score"] if provenance else []))


def per_source_counts(accounted: pl.DataFrame) -> dict:
    out = {}
    for (source,), part in accounted.group_by(["source"], maintain_order=True):
        counts = dict(zip(*part["status"].value_counts(sort=True).to_dict(as_series=False).values()))
        rejected = part.filter(pl.col("status") == "rejected")["reason"].value_counts(sort=True)
        out[source] = {"rows": part.height, **{k: counts.get(k, 0) for k in ("selected", "not_selected", "rejected")},
                       "rejected_by_reason": dict(zip(*rejected.to_dict(as_series=False).values()))}
        assert out[source]["rows"] == out[source]["selected"] + out[source]["not_selected"] + out[source]["rejected"]
    return out


def stage(recipe: Recipe, out: Path) -> dict:
    import datasets

    examples = read_ingested(recipe)
    assignments = pl.read_parquet(recipe.run_dir / "estimate" / "assignments.parquet")
    groups = read_selection(recipe)
    accounted = account_rows(examples, assignments, groups)
    mixture = mixture_table(accounted, recipe.output.format, recipe.output.provenance)
    dataset = datasets.Dataset.from_polars(mixture)

    final = Path(recipe.output.path)
    _check_replaceable(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_to_disk(str(tmp))
    if "jsonl" in recipe.output.files:
        dataset.to_json(str(tmp / "mixture.jsonl"), lines=True)
    if "parquet" in recipe.output.files:
        dataset.to_parquet(str(tmp / "mixture.parquet"))
    accounted.select("id", "source", "row", "group", "status", "reason").write_parquet(tmp / "rows.parquet")
    manifest = {
        "tool": "dataselect", "version": version("dataselect"), "recipe": recipe.model_dump(mode="json"),
        "stages": _stage_summaries(recipe), "sources": per_source_counts(accounted),
        "groups": groups.to_dicts(),
        "mixture": {"rows": dataset.num_rows, "columns": dataset.column_names, "fingerprint": dataset._fingerprint},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _move_into_place(tmp, final)
    return {"path": str(final), "rows": dataset.num_rows, "fingerprint": dataset._fingerprint}


def _stage_summaries(recipe: Recipe) -> dict:
    out = {}
    for name in ("ingest", "meta_init", "sketch", "estimate", "select"):
        record = json.loads((recipe.run_dir / name / "stage.json").read_text())
        out[name] = record["summary"]
    return out


def _check_replaceable(final: Path) -> None:
    """Replace only an earlier dataselect output; anything else in the way is the user's."""
    if not final.exists():
        return
    manifest = final / MANIFEST
    try:
        ours = final.is_dir() and json.loads(manifest.read_text()).get("tool") == "dataselect"
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ExportError(f"output.path {final} exists and is not a dataselect output; "
                          "remove it or choose another output.path")


def _move_into_place(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
