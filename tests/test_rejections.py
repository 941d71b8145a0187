"""Rejected rows stay visible: under the user's own id and their group in rows.parquet, a group
whose every row was rejected in the manifest's groups table (with its reasons, not selected), and
the report's list of rejection reasons with counts and example rows.

The fast tests run ingest alone or the export's table functions on small frames; the rest share
one tiny build (a source whose group `trec` has only empty completions, as T0's trec had).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from dataselect import build, load_recipe
from dataselect.export import account_rows, with_rejections
from dataselect.pipeline import run
from dataselect.report import report

from .conftest import write_jsonl, write_small_recipe

QA_ID = {"prompt": "q", "response": "a", "id": "uid"}
EMPTY = "field 'a' is blank (empty response)"
NULL = "field 'a' is null, not text"


def source_rows() -> list[dict]:
    """24 good rows in groups add and double, one null answer in add (row 5), and group trec's
    three rows, all with empty answers (rows 25-27)."""
    rows = [{"uid": f"u{i:03d}", "q": f"what is {i} plus {i}", "a": f"it is {2 * i}", "task": "add" if i % 2 else "double"}
            for i in range(24)]
    rows.insert(5, {"uid": "u900", "q": "and this?", "a": None, "task": "add"})
    rows += [{"uid": f"trec-{i}", "q": f"what kind of question is {i}?", "a": "", "task": "trec"} for i in range(3)]
    return rows


def make_recipe(tmp: Path) -> Path:
    source = {"name": "s", "dataset": str(write_jsonl(tmp / "s.jsonl", source_rows())), "format": QA_ID,
              "group_by": "task"}
    target = write_jsonl(tmp / "t.jsonl", [{"uid": f"t{i}", "q": f"what is {i} times 2", "a": f"it is {2 * i}"}
                                           for i in range(30)])  # enough rows for ingest's size checks
    return write_small_recipe(tmp, "rejections", [source], target, QA_ID, max_length=32)


def test_a_rejected_row_keeps_the_users_id_and_its_group(tmp_path):
    recipe = load_recipe(make_recipe(tmp_path))
    run(recipe, until="ingest")
    rejected = recipe.run.ingested.examples().filter(pl.col("status") == "rejected")
    assert rejected.select("id", "row", "group", "reason").rows() == [
        ("s/u900", 5, "s/add", NULL),
        *[(f"s/trec-{i}", 25 + i, "s/trec", EMPTY) for i in range(3)]]


def test_a_row_whose_group_cannot_be_read_keeps_its_id_and_no_group(tmp_path):
    rows = source_rows()[:12] + [{"uid": "u777", "q": "no task here", "a": "yes"}]
    recipe_path = make_recipe(tmp_path)
    write_jsonl(tmp_path / "s.jsonl", rows)
    recipe = load_recipe(recipe_path)
    run(recipe, until="ingest")
    rejected = recipe.run.ingested.examples().filter(pl.col("status") == "rejected")
    assert rejected.select("id", "group", "reason").rows() == [
        ("s/u900", "s/add", NULL), ("s/u777", None, "field 'task' (group_by) is null")]


def _decided(groups: dict[str, int]) -> pl.DataFrame:
    """A groups table as final_groups leaves it, for groups of source s with these example counts."""
    n = len(groups)
    return pl.DataFrame({"group": list(groups), "source": ["s"] * n, "score": [0.1] * n, "ci95": [0.01] * n,
                         "examples": list(groups.values()), "tokens": [10 * v for v in groups.values()],
                         "rule_selected": [True] * n, "repeats": [1] * n, "selected": [True] * n,
                         "share": [v / sum(groups.values()) for v in groups.values()], "reason": ["kept"] * n,
                         "rank": list(range(1, n + 1))})


def test_a_group_whose_rows_are_all_rejected_joins_the_table_with_its_reasons():
    examples = pl.DataFrame({
        "id": ["s/a1", "s/a2", "s/x", "s/t1", "s/t2", "s/t3"], "source": ["s"] * 6, "role": ["source"] * 6,
        "row": list(range(6)), "group": ["s/add", "s/add", "s/add", "s/trec", "s/trec", "s/trec"],
        "status": ["ok", "ok", "rejected", "rejected", "rejected", "rejected"],
        "reason": [None, None, NULL, EMPTY, EMPTY, "prompt alone is 40 tokens"]})
    assignments = pl.DataFrame({"id": ["s/a1", "s/a2"], "group": ["s/add", "s/add"]})
    decided = _decided({"s/add": 2})
    accounted = account_rows(examples, assignments, decided)
    assert accounted.filter(pl.col("status") == "rejected")["group"].to_list() == ["s/add", "s/trec", "s/trec", "s/trec"]
    table = {g["group"]: g for g in with_rejections(decided, accounted).to_dicts()}
    assert table["s/add"]["rejected"] == 1 and table["s/add"]["selected"]
    assert table["s/add"]["rejected_by_reason"] == [{"reason": NULL, "rows": 1}]
    trec = table["s/trec"]
    assert not trec["selected"] and trec["examples"] == 0 and trec["repeats"] == 0 and trec["rank"] is None
    assert trec["rejected"] == 3
    assert trec["rejected_by_reason"] == [{"reason": EMPTY, "rows": 2}, {"reason": "prompt alone is N tokens", "rows": 1}]
    assert trec["reason"].startswith("all 3 rows rejected at ingest")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny build: (output folder, manifest)."""
    tmp = tmp_path_factory.mktemp("rejections")
    recipe = load_recipe(make_recipe(tmp), ["select.method=all", "select.confirm=0"])
    build(recipe)
    return recipe.output.path, json.loads((recipe.output.path / "manifest.json").read_text())


@pytest.mark.slow
def test_the_manifest_lists_a_group_whose_every_row_was_rejected(built):
    _, manifest = built
    groups = {g["group"]: g for g in manifest["groups"]}
    assert set(groups) == {"s/add", "s/double", "s/trec"}
    trec = groups["s/trec"]
    assert trec["selected"] is False and trec["source"] == "s" and trec["examples"] == 0
    assert trec["rejected_by_reason"] == [{"reason": EMPTY, "rows": 3}]
    assert trec["reason"] == f"all 3 rows rejected at ingest, so the group was never scored: {EMPTY} (3)"
    assert groups["s/add"]["rejected_by_reason"] == [{"reason": NULL, "rows": 1}]
    assert groups["s/double"]["rejected"] == 0 and groups["s/double"]["rejected_by_reason"] == []


@pytest.mark.slow
def test_rows_parquet_keeps_a_rejected_rows_own_id_and_group(built):
    out, _ = built
    rows = pl.read_parquet(out / "rows.parquet")
    assert rows.filter(pl.col("status") == "rejected").select("id", "group", "reason").sort("id").rows() == [
        ("s/trec-0", "s/trec", EMPTY), ("s/trec-1", "s/trec", EMPTY), ("s/trec-2", "s/trec", EMPTY),
        ("s/u900", "s/add", NULL)]
    assert rows["id"].n_unique() == rows.height


@pytest.mark.slow
def test_the_report_lists_rejection_reasons_with_counts_and_examples(built):
    out, _ = built
    report(out)
    summary = (out / "report" / "summary.md").read_text()
    section = summary.split("## Rejected rows\n", 1)[1].split("\n## ", 1)[0]
    assert "4 of 28 source rows were rejected" in section
    assert "Every row of 1 group was rejected, so it is in no mixture: s/trec (3 rows)." in section
    assert f"| {EMPTY} | 3 | s 3 |" in section and f"| {NULL} | 1 | s 1 |" in section
    for i in range(3):
        assert f"| s/trec-{i} | s | s/trec | {EMPTY} |" in section
    assert f"| s/u900 | s | s/add | {NULL} |" in section
    page = (out / "report" / "index.html").read_text()
    assert "<h2>Rejected rows</h2>" in page and "s/trec-0" in page
