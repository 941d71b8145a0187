"""Stage 6, export: the selected mixture as a Hugging Face dataset, with a manifest saying why.

`output.path` is a `save_to_disk` folder (open it with `datasets.load_from_disk`) that also holds
`manifest.json` (resolved recipe, stage summaries, per-group scores and decisions, per-source
counts), `rows.parquet` (every input row: selected, not selected, or rejected with its reason)
and the mixture as jsonl and/or parquet. The folder is written beside its final place and moved
in, so a reader never sees half a mixture. An earlier dataselect output there is replaced when it
holds the same mixture (the same fingerprint); one that differs is kept, moved to
`<output.path>.previous` (replacing the one kept before it), so two settings can be compared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import polars as pl

from .artifacts import MANIFEST, ROWS, USAGE, Confirmation, Estimates, FineTune, Ingested, Selection, Sketches
from .duplicates import summary as duplicates_summary
from .errors import UserError
from .examples import reasons_by_class, usable
from .recipe import Recipe
from .tokens import load_tokenizer
from .usage import usage_markdown


log = logging.getLogger(__name__)


class ExportError(UserError, RuntimeError):
    """The output folder cannot be written, named by its path."""


def final_groups(groups: pl.DataFrame, mixture: dict[str, int], confirmed: dict) -> pl.DataFrame:
    """The select stage's per-group decisions, settled by the mixture the confirm stage chose: each
    group's repeats (0: left out) and share of the mixture's rows, and why. The keep rule's own
    decision stays beside it (`rule_selected`)."""
    repeats = pl.col("group").replace_strict(mixture, default=0, return_dtype=pl.Int64)
    table = groups.rename({"selected": "rule_selected"}).with_columns(repeats=repeats)
    table = table.with_columns(selected=pl.col("repeats") > 0,
                               share=pl.col("examples") * pl.col("repeats") / (pl.col("examples") * pl.col("repeats")).sum())
    if not confirmed.get("confirmed"):
        return table
    chosen = confirmed["chosen"]
    verdict = (pl.when(pl.col("repeats") > 1).then(pl.format(f"in the confirmed mixture '{chosen}', its rows ×{{}}",
                                                            pl.col("repeats")))
               .when(pl.col("selected")).then(pl.lit(f"in the confirmed mixture '{chosen}'"))
               .otherwise(pl.lit(f"not in the confirmed mixture '{chosen}'")))
    return table.with_columns(reason=pl.format("{}; keep rule: {}", verdict, pl.col("reason")))


def account_rows(examples: pl.DataFrame, assignments: pl.DataFrame, groups: pl.DataFrame) -> pl.DataFrame:
    """One row per input row of every source: its group and its fate, with the reason and how many
    times it is in the mixture. A usable row's group is the one the estimate stage gave it (a
    cluster, say); a rejected row keeps the group ingest read for it (none where unreadable)."""
    decisions = groups.select("group", "selected", "repeats", group_reason="reason", score="score")
    table = (examples.filter(pl.col("role") == "source").rename({"group": "ingested_group"})
             .join(assignments, on="id", how="left")
             .with_columns(group=pl.when(pl.col("status") == "rejected").then(pl.col("ingested_group"))
                           .otherwise(pl.col("group")))
             .drop("ingested_group").join(decisions, on="group", how="left"))
    status = (pl.when(pl.col("status") == "rejected").then(pl.lit("rejected"))
              .when(pl.col("selected")).then(pl.lit("selected")).otherwise(pl.lit("not_selected")))
    reason = pl.when(pl.col("status") == "rejected").then(pl.col("reason")).otherwise(pl.col("group_reason"))
    repeats = pl.when((pl.col("status") != "rejected") & pl.col("selected")).then(pl.col("repeats")).otherwise(0)
    return table.with_columns(status.alias("status"), reason.alias("reason"), repeats.cast(pl.Int64).alias("repeats"))


REJECTION_SCHEMA = pl.List(pl.Struct({"reason": pl.String, "rows": pl.Int64}))


def with_rejections(groups: pl.DataFrame, accounted: pl.DataFrame) -> pl.DataFrame:
    """Every group with its rejected rows, counted by reason class (`rejected`,
    `rejected_by_reason`: a list of {reason, rows}, most first, one schema for every group); and a
    group whose rows were all rejected, which no later stage saw, as a row of its own: not
    selected, with a reason saying so, rather than missing from the table."""
    rejected = accounted.filter((pl.col("status") == "rejected") & pl.col("group").is_not_null())
    counts = {}
    for (group,), part in rejected.group_by(["group"], maintain_order=True):
        counts[group] = (part["source"][0], part.height, [{"reason": r, "rows": n}
                                                          for r, n in reasons_by_class(part).items()])
    table = groups.with_columns(
        rejected=pl.col("group").replace_strict({g: c[1] for g, c in counts.items()}, default=0,
                                                return_dtype=pl.Int64),
        rejected_by_reason=pl.col("group").replace_strict({g: c[2] for g, c in counts.items()}, default=[],
                                                          return_dtype=REJECTION_SCHEMA))
    known = set(groups["group"])
    vanished = [g for g in counts if g not in known]
    if not vanished:
        return table
    rows = []
    for group in vanished:
        source, n, reasons = counts[group]
        summary = "; ".join(f"{r['reason']} ({r['rows']})" for r in reasons[:3])
        rows.append({"group": group, "source": source, "examples": 0, "tokens": 0, "selected": False,
                     "rule_selected": False, "repeats": 0, "share": 0.0, "rejected": n, "rejected_by_reason": reasons,
                     "reason": f"all {n} rows rejected at ingest, so the group was never scored: {summary}"})
    empty = pl.DataFrame(rows, schema_overrides={"rejected_by_reason": REJECTION_SCHEMA})
    return pl.concat([table, empty.select([c for c in empty.columns if c in table.columns])],
                     how="diagonal_relaxed")


def mixture_rows(accounted: pl.DataFrame) -> pl.DataFrame:
    """The selected rows, each as many times as its group is repeated: the rows' first copies in
    order, then the second copies, and so on, so any training stack reproduces the weights."""
    selected = accounted.filter(pl.col("status") == "selected")
    most = int(selected["repeats"].max() or 1)
    return pl.concat([selected.filter(pl.col("repeats") >= k) for k in range(1, most + 1)])


PROVENANCE = ["source", "group", "id", "score"]


def formatted(rows: pl.DataFrame, fmt: str, chat_template) -> pl.DataFrame:
    """The text columns in the output format: what TRL, Axolotl, LLaMA-Factory and open-instruct read."""
    if fmt == "messages":
        return rows.select("messages")
    if fmt == "text":
        return pl.DataFrame({"text": [chat_template(m) for m in rows["messages"].to_list()]}, schema={"text": pl.String})
    prompts = []
    for row_id, messages in zip(rows["id"], rows["messages"].to_list()):
        turns = [m for m in messages[:-1] if m["role"] != "system"]
        if len(turns) != 1:
            raise ExportError(f"output.format prompt_completion holds one prompt turn, but row {row_id} has "
                              f"{len(turns)}; use format messages or text")
        system = [m["content"] for m in messages[:-1] if m["role"] == "system"]
        prompts.append({"system": system[0] if system else None, "prompt": turns[0]["content"],
                        "completion": messages[-1]["content"]})
    table = pl.DataFrame(prompts, schema={"system": pl.String, "prompt": pl.String, "completion": pl.String})
    return table if table["system"].is_not_null().any() else table.drop("system")


def split_table(rows: pl.DataFrame, fmt: str, provenance: bool, chat_template) -> pl.DataFrame:
    text = formatted(rows, fmt, chat_template)
    if not provenance:
        return text
    return pl.concat([text, rows.select(pl.col(PROVENANCE[:3]), pl.col("score").cast(pl.Float64))], how="horizontal")


def output_splits(recipe: Recipe, accounted: pl.DataFrame, examples: pl.DataFrame,
                  tokenizer) -> dict[str, pl.DataFrame]:
    """`train` is the mixture; `validation`, when asked, the target's validation split."""
    template = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)  # noqa: E731
    spec = recipe.output
    splits = {"train": mixture_rows(accounted)}
    if spec.validation:
        splits["validation"] = usable(examples, "validation").with_columns(pl.lit(None, pl.Float64).alias("score"))
    return {name: split_table(rows, spec.format, spec.provenance, template) for name, rows in splits.items()}


def per_source_counts(accounted: pl.DataFrame) -> dict:
    out = {}
    for (source,), part in accounted.group_by(["source"], maintain_order=True):
        counts = dict(zip(*part["status"].value_counts(sort=True).to_dict(as_series=False).values()))
        rejected = part.filter(pl.col("status") == "rejected")
        out[source] = {"rows": part.height, **{k: counts.get(k, 0) for k in ("selected", "not_selected", "rejected")},
                       "rejected_by_reason": reasons_by_class(rejected)}
        assert out[source]["rows"] == out[source]["selected"] + out[source]["not_selected"] + out[source]["rejected"]
    return out


ROWS_PER_SHARD = 100_000


def write_files(dataset_dict, files: list[str], folder: Path) -> list[str]:
    """Hub-style data files: data/<split>-0000i-of-0000n.parquet and data/<split>.jsonl."""
    written = []
    (folder / "data").mkdir()
    for split, dataset in dataset_dict.items():
        if "parquet" in files:
            n = max(1, -(-dataset.num_rows // ROWS_PER_SHARD))
            for i in range(n):
                name = f"data/{split}-{i:05d}-of-{n:05d}.parquet"
                dataset.shard(n, i, contiguous=True).to_parquet(str(folder / name))
                written.append(name)
        if "jsonl" in files:
            dataset.to_json(str(folder / f"data/{split}.jsonl"), lines=True, force_ascii=False)
            written.append(f"data/{split}.jsonl")
    return written


def stage(recipe: Recipe, out: Path, ingested: Ingested, meta: FineTune, sketches: Sketches, estimates: Estimates,
          selection: Selection, confirmation: Confirmation) -> dict:
    """The mixture and its manifest, which accounts for every stage (the summaries of all it reads)."""
    import datasets  # datasets takes seconds to import: only when a mixture is written

    examples = ingested.examples()
    assignments = estimates.assignments()
    groups = final_groups(selection.read(), confirmation.mixture(), confirmation.summary())
    accounted = account_rows(examples, assignments, groups)
    groups = with_rejections(groups, accounted)
    splits = output_splits(recipe, accounted, examples, load_tokenizer(recipe, ingested))
    selected = accounted.filter(pl.col("status") == "selected")["id"]
    copies = duplicates_summary(ingested.duplicates(), selected)  # reported only: selection stays
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_polars(t) for name, t in splits.items()})
    train = dataset["train"]

    final = Path(recipe.output.path)
    earlier = _check_replaceable(final, recipe.output.overwrite, train._fingerprint)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        stages = {output.stage(): output.summary()
                  for output in (ingested, meta, sketches, estimates, selection, confirmation)}
        files = _write_output(recipe, dataset, accounted, groups, confirmation.candidates(), tmp, final, copies, stages)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export (a full disk, say) leaves nothing behind
        raise
    kept = _move_into_place(tmp, final, keep_previous=earlier is not None)
    summary = {"path": str(final), "rows": train.num_rows, "fingerprint": train._fingerprint, "files": files}
    if kept:
        summary["previous"] = {"path": str(kept), "fingerprint": earlier}
        log.info("export: the earlier mixture at %s (fingerprint %s) differs from this one: kept in %s; "
                 "`dataselect report` works on either folder, to compare them", final, earlier, kept)
    return summary


def is_current(recipe: Recipe, record: dict) -> bool:
    """The mixture lives outside the run dir: is it still the one this stage wrote? (The
    pipeline reruns a finished export whose output was replaced or removed.)"""
    manifest = Path(recipe.output.path) / MANIFEST
    written = record["summary"]["fingerprint"]
    return manifest.exists() and json.loads(manifest.read_text())["mixture"]["fingerprint"] == written


def _write_output(recipe: Recipe, dataset, accounted: pl.DataFrame, groups: pl.DataFrame, candidates: pl.DataFrame,
                  tmp: Path, final: Path, copies: dict, stages: dict) -> list[str]:
    train = dataset["train"]
    dataset.save_to_disk(str(tmp))
    files = write_files(dataset, recipe.output.files, tmp)
    accounted.select("id", "source", "row", "group", "status", "repeats", "reason").write_parquet(tmp / ROWS)
    manifest = {
        "tool": "dataselect", "version": version("dataselect"), "recipe": recipe.model_dump(mode="json"),
        "versions": {p: version(p) for p in ("torch", "transformers", "datasets", "peft", "traker")},
        "stages": stages, "sources": per_source_counts(accounted),
        "groups": groups.to_dicts(), "candidates": candidates.to_dicts(),
        "mixture": {"rows": train.num_rows, "columns": train.column_names, "fingerprint": train._fingerprint,
                    "splits": {k: v.num_rows for k, v in dataset.items()}, "files": files},
        "duplicates": copies,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    usage = usage_markdown(final, recipe.output, train.column_names, files, recipe.select)
    (tmp / USAGE).write_text(usage)
    return files


def previous_output(final: Path) -> Path:
    """Where an earlier dataselect mixture at `final` that differs from the new one is kept."""
    return final.with_name(f"{final.name}.previous")


def _earlier_output(folder: Path) -> dict | None:
    """The manifest of the dataselect output in `folder`; None when there is none."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text()) if folder.is_dir() else None
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tool") == "dataselect" else None


def _check_replaceable(final: Path, overwrite: bool, fingerprint: str) -> str | None:
    """Replace only an earlier dataselect output; anything else in the way is the user's. Returns
    the earlier mixture's fingerprint when it differs from `fingerprint` (it is then kept beside the
    new one), None when there is nothing to keep."""
    if not final.exists():
        return None
    earlier = _earlier_output(final)
    if earlier is None:
        if overwrite:
            return None
        raise ExportError(f"output.path {final} exists and is not a dataselect output; "
                          "remove it, choose another output.path, or pass --overwrite")
    written = (earlier.get("mixture") or {}).get("fingerprint")
    if written == fingerprint:
        return None
    previous = previous_output(final)
    if previous.exists() and _earlier_output(previous) is None and not overwrite:
        raise ExportError(f"{previous} exists and is not a dataselect output, so the earlier mixture at {final} "
                          "cannot be kept there; remove it, choose another output.path, or pass --overwrite")
    return written or "unknown"


def _move_into_place(tmp: Path, final: Path, keep_previous: bool = False) -> Path | None:
    """Move the finished folder in; with `keep_previous`, the one it replaces goes to
    `previous_output` (returned), else it is removed."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    previous = previous_output(final) if keep_previous and final.exists() else None
    if previous is not None:
        if previous.exists():
            previous.rename(old)
        final.rename(previous)
    elif final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return previous
