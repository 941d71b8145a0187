"""Bad input a user really hits, and what dataselect does with it.

Each case ends one of two ways:
  * a clear error, raised as one of the CLI's user errors (so `dataselect` prints one `Error: ...`
    and exits 1 without a traceback), that names the file, the line or row, and the field;
  * a counted rejection: the row stays in the ingested examples with status "rejected" and a
    reason naming the field, and the ingest summary (and the manifest) count it — no silent drops.

Everything runs on small JSON Lines files and a tiny model; only the disk-full cases build a
mixture (once, for the module).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from transformers import AutoTokenizer
from click.testing import CliRunner

from dataselect.artifacts import Run
from dataselect.cli import main
from dataselect.examples import reason_class, reasons_by_class
from dataselect.export import ExportError
from dataselect.trainer import load_base_model
from dataselect.pipeline import run
from dataselect.recipe import RecipeError, load_recipe
from dataselect.sources import SourceError
from dataselect.store import SketchStore, StoreMismatch
from dataselect.tokens import ModelError

from .conftest import DEMO, write_jsonl, write_small_recipe

QA = {"prompt": "q", "response": "a"}


# --- helpers ----------------------------------------------------------------------------------

def good_rows(n: int = 12, tag: str = "") -> list[dict]:
    return [{"q": f"what is {i} plus {i}{tag}", "a": f"it is {2 * i}", "task": "add" if i % 2 else "double"}
            for i in range(n)]


def make_recipe(tmp: Path, rows: list | None = None, *, sources: list[dict] | None = None,
                target_rows: list | None = None, **source_keys) -> Path:
    """A small recipe (tiny model) over local JSON Lines: source `s` (q/a fields) and target `t`.

    `rows` are source s's rows; `source_keys` change its entry (e.g. dataset=..., group_by=...);
    `sources` replaces the whole list.
    """
    if sources is None:
        entry = {"name": "s", "format": QA, **source_keys}
        if "dataset" not in entry:
            entry["dataset"] = str(write_jsonl(tmp / "s.jsonl", good_rows() if rows is None else rows))
        sources = [entry]
    target = write_jsonl(tmp / "t.jsonl", good_rows(12, " again") if target_rows is None else target_rows)
    return write_small_recipe(tmp, "bad", sources, target, QA, max_length=32)


def ingest(recipe_path: Path, *overrides: str) -> tuple[dict, pl.DataFrame]:
    """Run ingestion only: (per-source ingest summary, every ingested example)."""
    recipe = load_recipe(recipe_path, overrides)
    summary = run(recipe, until="ingest")["ingest"]["rows"]
    return summary, recipe.run.ingested.examples()


def cli_error(*args) -> str:
    """Run `dataselect ARGS`; it must fail as a handled user error. Returns the output from `Error: ` on
    (log lines may come before it when logging is not captured).

    CliRunner keeps an unhandled exception in `result.exception` instead of printing its traceback,
    so "handled" is checked as `SystemExit` (what click raises after printing `Error: ...`).
    """
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}: would print a traceback"
    assert "Traceback" not in result.output
    error = re.search(r"(?m)^Error: ", result.output)
    assert error, result.output
    return result.output[error.start():]


def assert_accounted(summary: dict, examples: pl.DataFrame, source: str, n_input: int, n_rejected: int) -> None:
    """Every input row of `source` is in the examples exactly once, and the summary's counts add up."""
    part = examples.filter((pl.col("source") == source) & (pl.col("role") == "source"))
    assert part["row"].to_list() == list(range(n_input))
    assert set(part["status"]) <= {"ok", "rejected"}
    rejected = part.filter(pl.col("status") == "rejected")
    assert rejected.height == n_rejected and rejected["reason"].null_count() == 0
    counts = summary[source]
    assert counts["rows"] == n_input
    assert counts["accepted"] + counts["rejected"] == n_input and counts["rejected"] == n_rejected
    assert sum(counts["rejected_by_reason"].values()) == n_rejected


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    """Keep progress bars out of the CLI's output (and restore them after)."""
    from datasets.utils import logging as ds_logging

    monkeypatch.setenv("TQDM_DISABLE", "1")
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    yield
    if was_enabled:
        ds_logging.enable_progress_bar()


# --- rows that cannot be used: rejected, with a reason naming the field, and counted ----------

# (case, row, reason): each bad row sits between good ones in one source file.
QA_CASES = [
    ("null-response", {"q": "q?", "a": None}, "field 'a' is null, not text"),
    ("response-key-absent-in-one-row", {"q": "q?"}, "field 'a' is null, not text"),
    ("number-response", {"q": "q?", "a": 42}, "field 'a' is int, not text"),
    ("float-response", {"q": "q?", "a": 1.5}, "field 'a' is float, not text"),
    ("bool-response", {"q": "q?", "a": True}, "field 'a' is bool, not text"),
    ("list-response", {"q": "q?", "a": ["x", "y"]}, "field 'a' is list, not text"),
    ("object-response", {"q": "q?", "a": {"text": "x"}}, "field 'a' is dict, not text"),
    ("number-prompt", {"q": 7, "a": "seven"}, "field 'q' is int, not text"),
    ("empty-response", {"q": "q?", "a": ""}, "field 'a' is blank (empty response)"),
    ("whitespace-response", {"q": "q?", "a": " \n\t "}, "field 'a' is blank (empty response)"),
    ("whitespace-only-prompt", {"q": "  \n\t", "a": "x"}, "field 'q' is blank (empty prompt)"),
]
U, A = "user", "assistant"
CHAT_CASES = [
    ("wrong-role", [{"role": "human", "content": "hi"}, {"role": A, "content": "x"}],
     "field 'messages' turn 0: role 'human' is not one of system, user, assistant, tool"),
    ("ends-with-a-user-turn", [{"role": U, "content": "hi"}, {"role": A, "content": "x"}, {"role": U, "content": "?"}],
     "field 'messages': last turn is 'user', not an assistant response"),
    ("no-prompt-turn", [{"role": A, "content": "x"}], "field 'messages': no prompt turn before the response"),
    ("sharegpt-keys", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
     "field 'messages' turn 0 lacks a string role and content"),
    ("blank-prompt-turn", [{"role": U, "content": "   "}, {"role": A, "content": "x"}],
     "field 'messages': every prompt turn is blank (empty prompt)"),
    ("blank-response-turn", [{"role": U, "content": "hi"}, {"role": A, "content": ""}],
     "field 'messages': last turn is blank (empty response)"),
    ("messages-is-a-string", "hi there", "field 'messages' is not a non-empty list of turns"),
    ("messages-null", None, "field 'messages' is not a non-empty list of turns"),
]
GROUP_CASES = [
    ("group-field-absent", {"q": "q?", "a": "x"}, "field 'task' (group_by) is null"),
    ("group-field-null", {"q": "q?", "a": "x", "task": None}, "field 'task' (group_by) is null"),
    ("group-field-blank", {"q": "q?", "a": "x", "task": " "}, "field 'task' (group_by) is blank"),
]


def _interleave(good: list, bad: list) -> tuple[list, list[int]]:
    """good[0], bad[0], good[1], bad[1], ..., rest of good; and the row of each bad one."""
    rows, at = [], []
    for i, row in enumerate(bad):
        rows.append(good[i])
        at.append(len(rows))
        rows.append(row)
    return rows + good[len(bad):], at


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One ingest of four sources full of planted bad rows: {source: (rows written, {case: (row, reason)})}."""
    tmp = tmp_path_factory.mktemp("mixed")
    chat_good = [{"messages": [{"role": U, "content": r["q"]}, {"role": A, "content": r["a"]}]} for r in good_rows()]
    plan = {
        "qa": (good_rows(), [r for _, r, _ in QA_CASES], QA_CASES, {"format": QA}),
        "chat": (chat_good, [{"messages": m} for _, m, _ in CHAT_CASES], CHAT_CASES, {"format": "messages"}),
        "grouped": (good_rows(), [r for _, r, _ in GROUP_CASES], GROUP_CASES, {"format": QA, "group_by": "task"}),
    }
    sources, expected = [], {}
    for name, (good, bad, cases, keys) in plan.items():
        rows, at = _interleave(good, bad)
        sources.append({"name": name, "dataset": str(write_jsonl(tmp / f"{name}.jsonl", rows)), **keys})
        expected[name] = (len(rows), {case: (row, reason) for (case, _, reason), row in zip(cases, at)})
    # ids: the format names an id field; later rows repeating an id are rejected, the first kept.
    ids = [{"q": f"q{i}", "a": f"a{i}", "uid": uid} for i, uid in enumerate([1, 2, 1, 3, 2, 2])]
    sources.append({"name": "ids", "dataset": str(write_jsonl(tmp / "ids.jsonl", ids)),
                    "format": {**QA, "id": "uid"}})
    expected["ids"] = (6, {"duplicate-id": (2, "duplicate id 'ids/1', first seen at row 0"),
                           "duplicate-id-again": (4, "duplicate id 'ids/2', first seen at row 1"),
                           "duplicate-id-thrice": (5, "duplicate id 'ids/2', first seen at row 1")})
    summary, examples = ingest(make_recipe(tmp, sources=sources))
    return summary, examples, expected


CASES = ([("qa", c) for c, _, _ in QA_CASES] + [("chat", c) for c, _, _ in CHAT_CASES]
         + [("grouped", c) for c, _, _ in GROUP_CASES]
         + [("ids", c) for c in ("duplicate-id", "duplicate-id-again", "duplicate-id-thrice")])


@pytest.mark.parametrize("source, case", CASES, ids=[c for _, c in CASES])
def test_bad_row_is_rejected_with_a_reason_naming_the_field(mixed, source, case):
    _, examples, expected = mixed
    row, reason = expected[source][1][case]
    got = examples.filter((pl.col("source") == source) & (pl.col("row") == row)).to_dicts()
    assert len(got) == 1
    assert (got[0]["status"], got[0]["reason"]) == ("rejected", reason)
    assert got[0]["input_ids"] is None  # nothing downstream can use it


@pytest.mark.parametrize("source", ["qa", "chat", "grouped", "ids"])
def test_every_row_is_accounted_and_the_summary_counts_each_reason(mixed, source):
    summary, examples, expected = mixed
    n_input, cases = expected[source]
    assert_accounted(summary, examples, source, n_input, n_rejected=len(cases))
    by_reason: dict[str, int] = {}
    for _, reason in cases.values():
        by_reason[reason_class(reason)] = by_reason.get(reason_class(reason), 0) + 1
    assert summary[source]["rejected_by_reason"] == by_reason  # the good rows around them all passed
    rejected = examples.filter((pl.col("source") == source) & (pl.col("status") == "rejected"))
    assert sorted(rejected["reason"]) == sorted(reason for _, reason in cases.values())  # the detail stays


def test_reasons_are_counted_by_class_not_by_token_count():
    reasons = ["prompt alone is 300 tokens, not shorter than sketch.max_length=256",
               "prompt alone is 412 tokens, not shorter than sketch.max_length=256",
               "duplicate id 'ids/2', first seen at row 1", "duplicate id 'ids/7', first seen at row 5",
               "field 'q2' turn 3 lacks a string role and content"]
    counts = reasons_by_class(pl.DataFrame({"reason": reasons}))
    assert counts == {"prompt alone is N tokens, not shorter than sketch.max_length=256": 2, "duplicate id": 2,
                      "field 'q2' turn N lacks a string role and content": 1}


def test_the_first_of_duplicate_ids_is_kept(mixed):
    _, examples, _ = mixed
    kept = examples.filter((pl.col("source") == "ids") & (pl.col("status") == "ok"))
    assert kept["id"].to_list() == ["ids/1", "ids/2", "ids/3"] and kept["row"].to_list() == [0, 1, 3]


def test_a_source_whose_every_row_is_rejected_is_an_error_with_the_reasons(tmp_path):
    rows = [{"q": f"q{i}", "a": None} for i in range(3)]  # e.g. format.response names an all-null column
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, rows))
    assert str(e.value) == (f"source s ({tmp_path / 's.jsonl'}): no usable rows; all 3 were rejected: "
                            "field 'a' is null, not text (3)")


def test_a_validation_split_whose_every_row_is_rejected_is_an_error(tmp_path):
    target = [{"q": f"q{i}", "a": " "} for i in range(4)]
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, target_rows=target))
    assert str(e.value) == ("target t: validation split: no usable rows; all 4 were rejected: "
                            "field 'a' is blank (empty response) (4)")


STRICT_TEMPLATE = (  # like Llama-2's and Mistral's: user and assistant turns must alternate
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def test_a_conversation_the_chat_template_refuses_is_a_counted_rejection():
    import datasets

    from dataselect.examples import EXAMPLE_SCHEMA
    from dataselect.ingest import _rows, ingest_summary, tokenize_examples
    from dataselect.tokens import train_tiny_tokenizer

    turns = [[(U, "hi"), (A, "hello")], [(U, "hi"), (U, "anyone?"), (A, "yes")], [(U, "2+2?"), (A, "4")]]
    ds = datasets.Dataset.from_list([{"messages": [{"role": r, "content": c} for r, c in t]} for t in turns])
    examples = pl.DataFrame(list(_rows("chat", "source", ds, "messages", None, "chat")), schema=EXAMPLE_SCHEMA)
    tokenizer = train_tiny_tokenizer(["hi hello anyone yes 2+2? 4 user assistant"], 64)
    tokenizer.chat_template = STRICT_TEMPLATE
    out = tokenize_examples(examples, tokenizer, 64)
    assert out["status"].to_list() == ["ok", "rejected", "ok"]
    reason = "the model's chat template refuses it: Conversation roles must alternate user/assistant/user/assistant/..."
    assert out["reason"][1] == reason
    assert ingest_summary(out)["chat"] == {"role": "source", "rows": 3, "accepted": 2, "rejected": 1, "truncated": 0,
                                           "rejected_by_reason": {reason: 1}}


# --- rows longer than the context: sketch.overlong says truncate (default) or reject ---------

def _overlong_rows() -> list[dict]:
    rows = good_rows(8)
    rows.insert(2, {"q": "count the words", "a": " ".join(["word"] * 80)})  # response runs past max_length
    rows.insert(5, {"q": " ".join(["long"] * 80), "a": "short"})  # the prompt alone fills max_length
    return rows


def test_overlong_rows_are_truncated_by_default_and_counted(tmp_path):
    summary, examples = ingest(make_recipe(tmp_path, _overlong_rows()))
    s = examples.filter(pl.col("source") == "s")
    long = s.row(2, named=True)
    assert long["status"] == "ok" and long["truncated"] and long["n_tokens"] == 32
    assert re.fullmatch(r"prompt alone is \d+ tokens, not shorter than sketch.max_length=32", s["reason"][5])
    assert summary["s"]["truncated"] == 1
    assert_accounted(summary, examples, "s", 10, n_rejected=1)


def test_overlong_reject_rejects_them_with_a_reason_naming_max_length(tmp_path):
    summary, examples = ingest(make_recipe(tmp_path, _overlong_rows()), "sketch.overlong=reject")
    s = examples.filter(pl.col("source") == "s")
    assert (s["status"][2], s["reason"][2]) == (
        "rejected", "longer than sketch.max_length=32 tokens (sketch.overlong: reject)")
    assert s["status"][5] == "rejected" and s["reason"][5].startswith("prompt alone is")
    assert summary["s"]["truncated"] == 0 and not s["truncated"].fill_null(False).any()
    assert_accounted(summary, examples, "s", 10, n_rejected=2)


def test_overlong_cut_prompt_keeps_the_response_whole_and_the_prompt_ends(tmp_path):
    rows = _overlong_rows()
    rows.insert(7, {"q": "head " + " ".join(["passage"] * 80) + " tail", "a": "kept answer"})
    summary, examples = ingest(make_recipe(tmp_path, rows), "sketch.overlong=cut_prompt")
    s = examples.filter(pl.col("source") == "s")
    assert s["status"].to_list() == ["ok"] * 11  # the prompt that filled max_length is cut, not rejected
    cut = s.row(7, named=True)
    assert cut["truncated"] and cut["n_tokens"] <= 32
    tokenizer = AutoTokenizer.from_pretrained(Run(tmp_path / "run").ingested.base)
    kept = tokenizer.decode(cut["input_ids"]).replace(" ", "")
    assert kept.endswith("keptanswer</s>") and "tail" in kept and "head" in kept  # response whole, both prompt ends
    assert kept.count("passage") < 80
    long_response = s.row(2, named=True)  # the response alone overflows: a quarter of the prompt stays
    assert long_response["truncated"] and long_response["n_tokens"] == 32 and long_response["n_prompt_tokens"] >= 8
    assert summary["s"]["truncated"] == 3
    assert_accounted(summary, examples, "s", 11, n_rejected=0)


def test_changing_overlong_reruns_ingest(tmp_path):
    path = make_recipe(tmp_path, _overlong_rows())
    ingest(path)
    _, examples = ingest(path, "sketch.overlong=reject")
    assert examples.filter(pl.col("source") == "s")["status"][2] == "rejected"


def test_overlong_accepts_only_its_three_policies():
    with pytest.raises(RecipeError, match=r"sketch.overlong: Input should be 'truncate', 'reject' or 'cut_prompt'"):
        load_recipe(DEMO, ["sketch.overlong=drop"])


# --- files that cannot be read: an error naming the file and the line ------------------------

@pytest.mark.parametrize("name, content, message", [
    pytest.param("s.jsonl", '{"q": "a", "a": "b"}\n{"q": "c", "a": "d"}\n{"q": "e", "a": \n',
                 "s.jsonl: line 3: not valid JSON (Expecting value at column 17); "
                 "each line of a JSON Lines file must be one complete JSON object", id="truncated-line"),
    pytest.param("s.jsonl", '{"q": "a", "a": "b"}\n{"q": "c" "a": "d"}\n{"q": "e", "a": "f"}\n',
                 "s.jsonl: line 2: not valid JSON (Expecting ',' delimiter at column 11); "
                 "each line of a JSON Lines file must be one complete JSON object", id="missing-comma"),
    pytest.param("s.jsonl", '{"q": "a", "a": "b"}\n["c", "d"]\n',
                 "s.jsonl: line 2: a JSON list, not an object with one field per column", id="array-line"),
    pytest.param("s.json", '[\n  {"q": "a", "a": "b"},\n  {"q": "c", "a": "d"}\n',
                 "s.json: not valid JSON at line 4, column 1: Expecting ',' delimiter", id="json-document-unclosed"),
])
def test_malformed_json_names_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    out = cli_error("ingest", "-r", make_recipe(tmp_path, dataset=str(tmp_path / name)))
    assert out == f"Error: source s: {tmp_path / message}\n"


def _lines_with_faults(n: int, faults: dict[int, str]) -> str:
    """A JSON Lines file of `n` good rows, the 1-based lines in `faults` replaced by their text."""
    return "".join(faults.get(i, json.dumps(row)) + "\n" for i, row in enumerate(good_rows(n), 1))


def test_two_malformed_lines_are_both_reported_in_one_run_and_ours_comes_first(tmp_path):
    """A user who fixes line 11 must not find line 58 on the next run; and pyarrow's log line
    ("Invalid encoding in string. in row 10", a row counted from 0) must not print before ours.
    Run as the user runs it (a subprocess), since datasets logs to the terminal, not through click."""
    import subprocess
    import sys

    content = _lines_with_faults(60, {11: '{"q": "ctl \x01 char", "a": "x"}', 58: '{"q": "x" "a": "y"}'})
    (tmp_path / "s.jsonl").write_text(content)
    recipe = make_recipe(tmp_path, dataset=str(tmp_path / "s.jsonl"))
    done = subprocess.run([sys.executable, "-m", "dataselect", "ingest", "-r", str(recipe)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "TQDM_DISABLE": "1"}, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = (done.stderr + done.stdout).splitlines()
    first = next(line for line in lines if re.search(r"rror|[Ff]ailed|in row \d", line))
    assert first == (f"Error: source s: {tmp_path / 's.jsonl'}: 2 bad lines; "
                     "each line of a JSON Lines file must be one complete JSON object:"), "\n".join(lines)
    listed = lines[lines.index(first) + 1:]
    assert listed[:2] == ["  line 11: not valid JSON (Invalid control character at column 12)",
                          "  line 58: not valid JSON (Expecting ',' delimiter at column 11)"]


def test_a_file_with_many_bad_lines_lists_the_first_twenty_and_counts_the_rest(tmp_path):
    bad = {i: '{"q": "unclosed' for i in range(3, 75, 3)}  # 24 bad lines among 80
    (tmp_path / "s.jsonl").write_text(_lines_with_faults(80, bad))
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, dataset=str(tmp_path / "s.jsonl")))
    head, *listed = str(e.value).split("\n")
    assert head.startswith(f"source s: {tmp_path / 's.jsonl'}: 24 bad lines; ")
    assert [re.match(r"  line (\d+):", line)[1] for line in listed[:20]] == [str(i) for i in range(3, 61, 3)]
    assert listed[20:] == ["  and 4 more bad lines (the first 20 are listed)"]


def test_bad_lines_of_every_kind_are_reported_together(tmp_path):
    """Not UTF-8, not JSON, not an object, half a surrogate pair (JSON to Python, not to pyarrow):
    one run names them all."""
    content = _lines_with_faults(12, {2: '["a", "list"]', 5: '{"q": "\\ud800 alone", "a": "x"}',
                                      9: '{"q": "x", "a": }'}).encode()
    content = content.replace(b"what is 6 plus 6", b"caf\xe9 6")  # line 7
    (tmp_path / "s.jsonl").write_bytes(content)
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, dataset=str(tmp_path / "s.jsonl")))
    head, *listed = str(e.value).split("\n")
    assert head.startswith(f"source s: {tmp_path / 's.jsonl'}: 4 bad lines; ")
    assert "save the file as UTF-8" in head
    assert [line.split(":")[0].strip() for line in listed] == ["line 2", "line 5", "line 7", "line 9"]
    assert "surrogate" in listed[1] and "not UTF-8" in listed[2] and "not valid JSON" in listed[3]


@pytest.mark.parametrize("name, content, message", [
    pytest.param("s.jsonl", b'{"q": "a", "a": "b"}\n{"q": "caf\xe9", "a": "d"}\n',
                 "s.jsonl: line 2: not UTF-8 text (byte 0xe9 at byte 11 of the line); save the file as UTF-8",
                 id="latin1-jsonl"),
    pytest.param("s.jsonl", b'\xff\xfe{\x00"\x00q\x00"\x00}\x00\n',
                 "s.jsonl: line 1: not UTF-8 text (byte 0xff at byte 1 of the line)", id="utf16-jsonl"),
    pytest.param("s.csv", b"q,a\nwhat,yes\ncaf\xe9,no\n",
                 "s.csv: line 3: not UTF-8 text (byte 0xe9 at byte 4 of the line)", id="latin1-csv"),
])
def test_non_utf8_bytes_name_the_file_line_and_byte(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    out = cli_error("ingest", "-r", make_recipe(tmp_path, dataset=str(tmp_path / name)))
    assert out.startswith(f"Error: source s: {tmp_path / message}")


def test_utf8_bom_and_crlf_line_ends_are_fine(tmp_path):
    text = "".join(json.dumps(r) + "\r\n" for r in good_rows())
    (tmp_path / "s.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    summary, examples = ingest(make_recipe(tmp_path, dataset=str(tmp_path / "s.jsonl")))
    assert_accounted(summary, examples, "s", 12, n_rejected=0)


@pytest.mark.parametrize("name, content, message", [
    pytest.param("s.jsonl", "", "s.jsonl: the file is empty (0 rows)", id="zero-bytes"),
    pytest.param("s.jsonl", "\n\n  \n", "s.jsonl: the file is empty (0 rows)", id="blank-lines"),
    pytest.param("s.csv", "q,a\n", "s.csv: the file has 0 rows", id="csv-header-only"),
])
def test_an_empty_source_file_is_an_error_naming_the_source(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, dataset=str(tmp_path / name)))
    assert str(e.value) == f"source s: {tmp_path / message}"


def test_an_empty_parquet_source_is_an_error_naming_the_source(tmp_path):
    pl.DataFrame({"q": [], "a": []}, schema={"q": pl.String, "a": pl.String}).write_parquet(tmp_path / "s.parquet")
    with pytest.raises(SourceError, match=r"^source s: .*s\.parquet: the file has 0 rows$"):
        ingest(make_recipe(tmp_path, dataset=str(tmp_path / "s.parquet")))


def test_a_corrupt_parquet_file_names_the_file_and_the_cause(tmp_path):
    (tmp_path / "s.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 2)
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, dataset=str(tmp_path / "s.parquet")))
    assert str(e.value).startswith(f"source s: {tmp_path / 's.parquet'} (split 'train'): cannot load: ")
    assert "arquet" in str(e.value).split("cannot load: ")[1]  # pyarrow's own words about the footer


def test_a_column_missing_from_the_whole_file_names_file_and_field(tmp_path):
    path = make_recipe(tmp_path, format={"prompt": "q", "response": "answer"})
    with pytest.raises(SourceError) as e:
        ingest(path)
    assert str(e.value) == f"source s ({tmp_path / 's.jsonl'}): no column 'answer'; it has ['q', 'a', 'task']"


def test_a_group_by_column_missing_from_the_whole_file_is_an_error(tmp_path):
    with pytest.raises(SourceError, match=r"s\.jsonl\): no column 'topic'; it has \['q', 'a', 'task'\]"):
        ingest(make_recipe(tmp_path, group_by="topic"))


# --- paths, folders, file types, splits --------------------------------------------------------

def test_a_source_file_that_does_not_exist_is_named(tmp_path):
    out = cli_error("ingest", "-r", make_recipe(tmp_path, dataset=str(tmp_path / "data" / "nope.jsonl")))
    assert out == f"Error: source s: {tmp_path / 'data' / 'nope.jsonl'}: no such file or folder\n"


NO_DATA = "source s: {d} (split 'train'): cannot load: The directory at {d} doesn't contain any data files"


@pytest.mark.parametrize("content, message", [
    ([], NO_DATA),
    (["README.md"], NO_DATA),
    (["notes.txt"], "source s ({d}): no column 'q', 'a'; it has ['text']"),  # datasets reads .txt as text rows
], ids=["empty-folder", "readme-only", "text-files-only"])
def test_a_folder_without_data_is_named(tmp_path, content, message):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in content:
        (folder / name).write_text("# just words\n")
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, dataset=str(folder)))
    assert str(e.value) == message.format(d=folder)  # (the last words are datasets')


@pytest.mark.parametrize("name, kind", [("s.txt", ".txt"), ("s.xlsx", ".xlsx"), ("s.txt.gz", ".txt.gz"),
                                        ("s.gz", ".gz")])
def test_an_unsupported_file_type_is_named_with_the_supported_ones(tmp_path, name, kind):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, dataset=str(tmp_path / name)))
    assert str(e.value) == (f"source s: {tmp_path / name}: unsupported file type {kind!r}; "
                            "use one of .json, .jsonl, .parquet, .csv, or a .json, .jsonl or .csv file "
                            "compressed as .gz, .zst, .bz2 or .xz")


@pytest.mark.parametrize("split", ["train[50:60]", "train[12:]", "train[:abc]", "train[:200%]"])
def test_a_split_slice_out_of_range_or_malformed_names_the_slice_and_row_count(tmp_path, split):
    with pytest.raises(SourceError) as e:
        ingest(make_recipe(tmp_path, split=split))
    message = str(e.value)
    assert message.startswith(f"source s: {tmp_path / 's.jsonl'}: split {split!r} is out of range or malformed (")
    assert message.endswith("); the file has 12 rows; write a slice as 'train[:1000]', 'train[100:200]' "
                            "or 'train[:10%]'")


def test_a_good_slice_still_reads_only_its_rows(tmp_path):
    summary, examples = ingest(make_recipe(tmp_path, split="train[2:5]"))
    assert summary["s"]["rows"] == 3 and examples.filter(pl.col("source") == "s")["prompt"].to_list() == [
        "what is 2 plus 2", "what is 3 plus 3", "what is 4 plus 4"]


def _only_train(tmp: Path, kind: str) -> str:
    import datasets

    if kind == "file":
        return str(write_jsonl(tmp / "t_only.jsonl", good_rows(6)))
    folder = tmp / kind
    if kind == "saved":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(good_rows(6))}).save_to_disk(str(folder))
    else:
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", good_rows(6))
    return str(folder)


@pytest.mark.parametrize("kind, message", [
    ("file", "{d}: a single file has only the 'train' split (or a slice such as 'train[:1000]'), not 'validation'"),
    ("saved", "{d}: no split 'validation'; it has ['train']"),
    ("folder", "{d} (split 'validation'): cannot load: Unknown split \"validation\". Should be one of ['train']."),
], ids=["single-file", "saved-dataset", "folder-of-files"])
def test_a_missing_target_split_names_the_dataset_and_split(tmp_path, kind, message):
    dataset = _only_train(tmp_path, kind)
    recipe = make_recipe(tmp_path)
    out = cli_error("ingest", "-r", recipe, "--set", f"target.dataset={dataset}",
                    "--set", "target.validation.split=validation")
    assert out == f"Error: target.validation (t): {message.format(d=dataset)}\n"


# --- the recipe ---------------------------------------------------------------------------------

def test_an_unknown_recipe_key_names_its_path_through_the_cli(tmp_path):
    path = make_recipe(tmp_path, gruop_by="task")
    out = cli_error("ingest", "-r", path)
    assert out == f"Error: {path}: invalid recipe\n  sources.0.gruop_by: unknown key\n"


@pytest.mark.parametrize("text, message", [
    pytest.param("name: x\nmodel: {tiny: {}\nsources: [\n",
                 ", line 3, column 1: not valid YAML: expected ',' or '}', but got '<scalar>' "
                 "(while parsing a flow mapping at line 2, column 8)", id="unclosed-brace"),
    pytest.param("name: x\n\tmodel: {tiny: {}}\n",
                 ", line 2, column 1: not valid YAML: found character '\\t' that cannot start any token "
                 "(while scanning for the next token)", id="tab-indent"),
    pytest.param("name: x\nsketch: {dim: 8}\nsketch: {max_length: 64}\n",
                 ", line 3, column 1: not valid YAML: key 'sketch' appears twice (first at line 2)",
                 id="section-given-twice"),
    pytest.param("- name: x\n- model: y\n", ", line 1: a recipe is a mapping of sections (name:, model:, "
                 "sources:, ...), got a list", id="a-list"),
    pytest.param("just words\n", ", line 1: a recipe is a mapping of sections (name:, model:, sources:, ...), "
                 "got a str", id="a-scalar"),
    pytest.param("# nothing yet\n", ": the recipe is empty", id="empty"),
])
def test_yaml_that_is_not_a_recipe_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}{message}"


def test_yaml_errors_reach_the_cli_as_one_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: {tiny: {}\n")
    out = cli_error("build", "-r", path)
    assert out.startswith(f"Error: {path}, line 3, column 1: not valid YAML: ")


def test_a_recipe_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: x\n# caf\xe9\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}, line 2: not UTF-8 text (byte 0xe9)")):
        load_recipe(path)


def test_a_recipe_file_that_does_not_exist_is_named(tmp_path):
    out = cli_error("ingest", "-r", tmp_path / "nope.yaml")
    assert out == f"Error: {tmp_path / 'nope.yaml'}: recipe file not found\n"


@pytest.mark.parametrize("override, message", [
    ("estimate.subsets.x=3", "{p}: override path estimate.subsets goes through a value, not a section"),
    ("sources.7.name=x", "{p}: override path sources.7: no list item '7'"),
    ("sources.first.name=x", "{p}: override path sources.first: no list item 'first'"),
    ("=5", "{p}: override '=5': the key path '' has an empty part"),
    ("sketch..dim=5", "{p}: override 'sketch..dim=5': the key path 'sketch..dim' has an empty part"),
    ("sketch.dim", "{p}: override 'sketch.dim' is not key.path=value"),
    ("sketch.dim=[8", ("{p}: override 'sketch.dim=[8': the value is not valid YAML: "
                       "expected ',' or ']', but got '<stream end>'")),
    ("sketch.dimm=8", "{p} (with --set sketch.dimm=8): invalid recipe\n  sketch.dimm: unknown key"),
    ("sketch.dim=big", ("{p} (with --set sketch.dim=big): invalid recipe\n"
                        "  sketch.dim: Input should be a valid integer, unable to parse string as an integer")),
], ids=["through-a-value", "list-index-out-of-range", "list-index-not-a-number", "empty-key", "empty-key-part",
        "no-equals-sign", "value-not-yaml", "unknown-key", "wrong-type"])
def test_a_bad_set_override_names_the_key_path(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(DEMO, [override])
    assert str(e.value) == message.format(p=DEMO)


def test_a_bad_set_override_through_the_cli(tmp_path):
    path = make_recipe(tmp_path)
    out = cli_error("ingest", "-r", path, "--set", "estimate.subsets.x=3")
    assert out == f"Error: {path}: override path estimate.subsets goes through a value, not a section\n"


def test_two_sources_with_the_same_name_are_named(tmp_path):
    rows = str(write_jsonl(tmp_path / "a.jsonl", good_rows()))
    entry = {"name": "s", "dataset": rows, "format": QA}
    path = make_recipe(tmp_path, sources=[entry, {**entry, "name": "other"}, entry])
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}: invalid recipe\n  sources: source names must be unique; 's' names sources 0, 2"


def test_a_target_named_like_a_source_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"target.name 's' is also a source name"):
        load_recipe(make_recipe(tmp_path), ["target.name=s"])


# --- models that do not load ------------------------------------------------------------------

def _bad_model(tmp: Path, kind: str) -> Path:
    if kind == "garbage.gguf":
        (tmp / kind).write_bytes(bytes(range(256)) * 16)
    elif kind == "truncated.gguf":  # the magic bytes, then nothing that parses
        (tmp / kind).write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    elif kind == "empty-folder":
        (tmp / kind).mkdir()
    elif kind == "garbage-config":
        (tmp / kind).mkdir()
        (tmp / kind / "config.json").write_text("{not json")
    return tmp / kind


@pytest.mark.parametrize("kind, cause", [
    ("garbage.gguf", "{m}: {m} does not start with the GGUF magic bytes, so it is not a GGUF file."),
    ("truncated.gguf", "{m}: unpack_from requires a buffer"),
    ("garbage-config", "{m}: It looks like the config file at '{m}/config.json' is not a valid JSON file."),
    pytest.param("empty-folder", "{m} has no config.json; not a model folder", id="empty-folder"),
], ids=["garbage.gguf", "truncated.gguf", "garbage-config", "empty-folder"])
def test_a_model_that_does_not_load_is_a_model_error_naming_it(tmp_path, kind, cause):
    model = _bad_model(tmp_path, kind)
    out = cli_error("ingest", "-r", make_recipe(tmp_path), "--set", "model.tiny=null", "--set", f"model.base={model}")
    assert out.startswith("Error: model.base: ") and cause.format(m=model) in out


def test_a_gguf_base_that_does_not_exist_is_named(tmp_path):
    out = cli_error("ingest", "-r", make_recipe(tmp_path), "--set", "model.tiny=null",
                    "--set", f"model.base={tmp_path / 'm.gguf'}")
    assert out == f"Error: model.base: GGUF file {tmp_path / 'm.gguf'} not found\n"


def test_loading_the_weights_of_a_broken_gguf_names_the_file(tmp_path):
    model = _bad_model(tmp_path, "truncated.gguf")
    recipe = load_recipe(make_recipe(tmp_path), ["model.tiny=null", f"model.base={model}"])
    with pytest.raises(ModelError, match=re.escape(str(model))):
        load_base_model(recipe, recipe.run.ingested)


# transformers' words when the `gguf` package is missing (modeling_gguf_pytorch_utils.py)
NO_GGUF = "Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch."


def test_a_gguf_base_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    import transformers

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")

    def no_gguf(*args, **kwargs):
        raise ImportError(NO_GGUF)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_gguf)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    expected = (f"model.base: reading the GGUF file {model} needs the `gguf` package, which is not installed: "
                "pip install 'dataselect[gguf]' (or pip install 'gguf>=0.10')")
    out = cli_error("ingest", "-r", make_recipe(tmp_path), "--set", "model.tiny=null", "--set", f"model.base={model}")
    assert out == f"Error: {expected}\n"
    recipe = load_recipe(make_recipe(tmp_path), ["model.tiny=null", f"model.base={model}"])
    with pytest.raises(ModelError) as e:
        load_base_model(recipe, recipe.run.ingested)
    assert str(e.value) == expected


# --- a sketch store from another model -------------------------------------------------------

SETTINGS = {"model_sha256": "aaaa", "adapter_sha256": "bbbb", "seed": 0, "dim": 8, "max_length": 64}


def test_a_sketch_store_from_another_model_is_refused_naming_each_difference(tmp_path):
    folder = tmp_path / "store"
    ids = ["s/0", "s/1", "s/2"]
    SketchStore.open(folder, SETTINGS, ids, dim=8, chunk_rows=2)
    other = {**SETTINGS, "model_sha256": "cccc", "max_length": 128}
    with pytest.raises(StoreMismatch) as e:
        SketchStore.open(folder, other, ids, dim=8, chunk_rows=2)
    assert str(e.value) == (f"{folder}: sketch store made with other settings; refusing to mix them:\n"
                            "  max_length: store has 64, asked for 128\n"
                            "  model_sha256: store has 'aaaa', asked for 'cccc'")
    with pytest.raises(StoreMismatch, match=r"\n  dim: store has 8, asked for 16$"):
        SketchStore.open(folder, SETTINGS, ids, dim=16, chunk_rows=2)
    with pytest.raises(StoreMismatch, match="holds sketches of other examples; remove it to re-sketch"):
        SketchStore.open(folder, SETTINGS, ["s/0", "s/1", "s/9"], dim=8, chunk_rows=2)
    assert SketchStore.open(folder, SETTINGS, ids, dim=8, chunk_rows=2).ids == ids  # the same settings reopen


# --- writing the mixture: a full disk, a folder in the way --------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished tiny build whose source has one rejected row: (recipe path, output folder, manifest)."""
    tmp = tmp_path_factory.mktemp("built")
    rows = good_rows(24)
    rows.insert(5, {"q": "and this?", "a": None})
    path = make_recipe(tmp, rows, group_by="task")
    from datasets.utils import logging as ds_logging

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")
        was_enabled = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
        result = CliRunner().invoke(main, ["build", "-r", str(path)])
        if was_enabled:
            ds_logging.enable_progress_bar()
    assert result.exit_code == 0, result.output
    out = tmp / "out"
    return path, out, json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_rejected_rows_reach_the_manifest_and_rows_parquet(built):
    _, out, manifest = built
    counts = manifest["sources"]["s"]
    assert counts["rows"] == 25 and counts["rejected"] == 1
    assert counts["selected"] + counts["not_selected"] == 24
    assert counts["rejected_by_reason"] == {"field 'a' is null, not text": 1}
    rows = pl.read_parquet(out / "rows.parquet").filter(pl.col("source") == "s")
    assert rows["row"].sort().to_list() == list(range(25))
    assert rows.filter(pl.col("status") == "rejected").select("row", "reason").rows() == [
        (5, "field 'a' is null, not text")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fill_disk_at_manifest(monkeypatch) -> None:
    """Path.write_text of the new mixture's manifest.json fails as a full disk does."""
    real = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "manifest.json" and ".tmp-" in self.parent.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


@pytest.mark.slow
def test_a_full_disk_is_one_error_line_and_the_previous_mixture_stays(built, monkeypatch):
    path, out, _ = built
    before = _snapshot(out)
    _fill_disk_at_manifest(monkeypatch)
    output = cli_error("build", "-r", path, "--set", "output.provenance=false")  # reruns export only
    assert re.fullmatch(rf"Error: \[Errno 28\] No space left on device: "
                        rf"'{re.escape(str(out.parent))}/\.out\.tmp-\d+/manifest\.json'\n", output)
    assert _snapshot(out) == before


@pytest.mark.slow
def test_a_failed_export_removes_its_temporary_folder(built, monkeypatch):
    path, out, _ = built
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):  # from the test before
        shutil.rmtree(leftover)
    _fill_disk_at_manifest(monkeypatch)
    cli_error("build", "-r", path, "--set", "output.provenance=false")
    assert list(out.parent.glob(f".{out.name}.tmp-*")) == []


@pytest.mark.slow
def test_an_output_path_holding_other_files_is_left_alone(built, tmp_path):
    path, _, _ = built
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    out = cli_error("build", "-r", path, "--set", f"output.path={mine}")
    assert out == (f"Error: output.path {mine} exists and is not a dataselect output; "
                   "remove it, choose another output.path, or pass --overwrite\n")
    assert _snapshot(mine) == {"notes.txt": b"keep me"}


def _user_error_kinds() -> dict[str, type[Exception]]:
    """Every error dataselect raises for a user to fix: the subclasses of UserError, found from
    the modules that define them (all imported above or by them)."""
    import dataselect.outputs  # noqa: F401  (the CLI imports these lazily; their errors must be found)
    import dataselect.push  # noqa: F401
    from dataselect.errors import UserError

    found, pending = {}, [UserError]
    while pending:
        for kind in pending.pop().__subclasses__():
            found[kind.__name__] = kind
            pending.append(kind)
    return found


USER_ERROR_NAMES = {"RecipeError", "SourceError", "ModelError", "ExportError", "PushError", "OutputError",
                    "StoreMismatch"}


def test_every_user_error_is_one_the_cli_reports():
    """The cases above raise these; each must be a UserError, or the CLI would show a traceback."""
    from dataselect.outputs import OutputError
    from dataselect.push import PushError

    assert set(_user_error_kinds()) >= USER_ERROR_NAMES
    for kind in (RecipeError, SourceError, ModelError, ExportError, StoreMismatch, OutputError, PushError):
        assert kind is _user_error_kinds()[kind.__name__]


@pytest.mark.parametrize("name", sorted(USER_ERROR_NAMES) + ["OSError"])
def test_each_user_error_reaches_the_cli_as_one_clean_line(name, monkeypatch):
    """Raised while a command runs, a user error is printed as `Error: <its message>` with exit
    code 1 and no traceback; a full disk (OSError) too."""
    import dataselect.cli

    error = (OSError(errno.ENOSPC, "No space left on device", "out/x") if name == "OSError"
             else _user_error_kinds()[name]("sources.0.dataset: data.jsonl, line 3: not JSON"))

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(dataselect.cli, "run", fails)
    result = CliRunner().invoke(main, ["ingest", "-q", "--recipe", str(DEMO)])
    assert result.exit_code == 1 and result.output == f"Error: {error}\n", result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    """An error that is not the user's (a bug) is not caught: it keeps its traceback."""
    import dataselect.cli

    def fails(*args, **kwargs):
        raise KeyError("group")

    monkeypatch.setattr(dataselect.cli, "run", fails)
    result = CliRunner().invoke(main, ["ingest", "-q", "--recipe", str(DEMO)])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError) and "Error:" not in result.output
