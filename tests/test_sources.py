import json

import datasets
import polars as pl
import pytest

from dataselect.recipe import Fields, Messages
from dataselect.ingest import _rows, map_row, read_examples
from dataselect.sources import SourceError, open_dataset

from .conftest import SHARED, demo_recipe

QA = Fields(prompt="question", response="answer")


def test_prompt_response_row_maps_to_messages():
    messages, given = map_row({"question": "Q?", "answer": "A."}, QA)
    assert messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert given is None


def test_system_and_id_fields():
    fmt = Fields(prompt="q", response="a", system="sys", id="uid")
    messages, given = map_row({"q": "Q", "a": "A", "sys": "Be brief.", "uid": 7}, fmt)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert given == "7"


@pytest.mark.parametrize("row, fmt, reason", [
    ({"question": None, "answer": "A"}, QA, "field 'question' is null"),
    ({"question": "Q", "answer": 3}, QA, "field 'answer' is int"),
    ({"question": "Q", "answer": "   "}, QA, "empty response"),
    ({"messages": []}, "messages", "not a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "not an assistant response"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "no prompt turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages", "turn 0 lacks"),
    ({"chat": None}, Messages(messages="chat"), "field 'chat' is not"),
])
def test_unmappable_rows_get_a_reason(row, fmt, reason):
    out = map_row(row, fmt)
    assert isinstance(out, str) and reason in out


def test_duplicate_ids_are_rejected_not_dropped():
    ds = datasets.Dataset.from_list([{"q": "a", "a": "b", "id": 1}, {"q": "c", "a": "d", "id": 1}])
    rows = list(_rows("s", "source", ds, Fields(prompt="q", response="a", id="id"), None, "s"))
    assert [r["status"] for r in rows] == ["ok", "rejected"]
    assert "duplicate id 's/1'" in rows[1]["reason"]


def test_missing_column_names_source_and_column():
    ds = datasets.Dataset.from_list([{"q": "a", "a": "b"}])
    with pytest.raises(SourceError, match=r"source s \(x.jsonl\): no column 'question', 'answer'; it has \['q', 'a'\]"):
        list(_rows("s", "source", ds, QA, None, "source s (x.jsonl)"))


@pytest.fixture
def qa_rows():
    return [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]


def test_local_formats_load_the_same_rows(tmp_path, qa_rows):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    pl.DataFrame(qa_rows).write_parquet(tmp_path / "d.parquet")
    pl.DataFrame(qa_rows).write_csv(tmp_path / "d.csv")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(qa_rows)}).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.parquet", "d.csv", "saved"):
        ds = open_dataset(str(tmp_path / name), None, "train", tmp_path, 0)
        assert ds["question"] == [r["question"] for r in qa_rows], name


def test_bad_paths_and_splits_fail_with_the_name(tmp_path, qa_rows):
    with pytest.raises(SourceError, match="nope.jsonl: no such file"):
        open_dataset(str(tmp_path / "nope.jsonl"), None, "train", tmp_path, 0)
    (tmp_path / "d.jsonl").write_text(json.dumps(qa_rows[0]) + "\n")
    with pytest.raises(SourceError, match="only the 'train' split"):
        open_dataset(str(tmp_path / "d.jsonl"), None, "test", tmp_path, 0)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(SourceError, match="unsupported file type"):
        open_dataset(str(tmp_path / "d.txt"), None, "train", tmp_path, 0)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(qa_rows)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SourceError, match="no split 'validation'"):
        open_dataset(str(tmp_path / "saved"), None, "validation", tmp_path, 0)


def test_demo_rows_are_all_accounted(tmp_path):
    examples, _ = read_examples(demo_recipe(tmp_path))
    trivia = examples.filter(pl.col("source") == "trivia")
    assert trivia.height == 303
    rejected = trivia.filter(pl.col("status") == "rejected")
    assert rejected.height == 3 and rejected["reason"].null_count() == 0
    assert examples.filter(pl.col("role") == "validation").height == 200
    assert examples["id"].n_unique() == examples.height


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").exists(), reason="../shared/data/gsm8k not present")
def test_real_gsm8k_rows_map(tmp_path):
    recipe = demo_recipe(tmp_path, f"sources.0.dataset={SHARED / 'gsm8k' / 'train.jsonl'}",
                         "sources.0.max_rows=50", "sources.0.group_by=null")
    examples, _ = read_examples(recipe)
    gsm = examples.filter(pl.col("source") == "lexicon")
    assert gsm.height == 50 and (gsm["status"] == "ok").all()
    assert gsm["response"][0].rstrip().split("#### ")[-1].strip().isdigit()


def test_nested_fields_and_slices_of_a_local_file(tmp_path):
    rows = [{"q": f"q{i}", "model": {"solution": f"s{i}", "is_correct": i % 2 == 0}} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = open_dataset(str(tmp_path / "d.jsonl"), None, "train[2:5]", tmp_path, 0)
    assert ds["q"] == ["q2", "q3", "q4"]
    out = list(_rows("m", "source", ds, Fields(prompt="q", response="model.solution"), "model.is_correct", "m"))
    assert [r["response"] for r in out] == ["s2", "s3", "s4"]
    assert [r["group"] for r in out] == ["m/True", "m/False", "m/True"]
    with pytest.raises(SourceError, match="no column 'nope.solution'"):
        list(_rows("m", "source", ds, Fields(prompt="q", response="nope.solution"), None, "m"))
