"""Near-duplicates and contamination: planted copies are found with the right kind, nothing else is
paired, and a build's manifest and report carry the section without changing the mixture."""

from __future__ import annotations

import random
import re

import polars as pl
import pytest

from dataselect import duplicates
from dataselect.report import DUPLICATES, report

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "tu", "ren", "sol", "vek", "dar", "pim", "zo", "bex", "nul")
         for b in ("ta", "ri", "on", "el", "us", "am", "ix", "or", "up", "en", "ad", "oy")]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _changed(text: str, positions: tuple[int, ...]) -> str:
    """The text with the words at `positions` replaced: a near copy."""
    words = text.split()
    for i in positions:
        words[i] = "changed"
    return " ".join(words)


def _grams(prompt: str, response: str) -> set[tuple[str, ...]]:
    """The reference: word 3-gram sets in plain Python, to check the module's Jaccard against."""
    words = re.findall(r"\w+|[^\w\s]", f"{prompt}\n{response}".lower())
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _jaccard(a: dict, b: dict) -> float:
    x, y = _grams(a["prompt"], a["response"]), _grams(b["prompt"], b["response"])
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def planted() -> tuple[pl.DataFrame, set[tuple[str, str, str]]]:
    """Sources a, b, c and target t with planted copies among 120 unrelated rows: the table and
    the (id_a, id_b, kind) pairs that must be found, no more."""
    rng = random.Random(0)
    rows: list[dict] = []

    def add(id_: str, role: str, prompt: str, response: str, status: str = "ok") -> dict:
        source = id_.split("/")[0]
        rows.append({"id": id_, "source": source, "group": source, "role": role, "status": status,
                     "prompt": prompt, "response": response})
        return rows[-1]

    for i in range(120):  # unrelated rows, in every source and both target splits
        role = ("source", "source", "source", "validation", "test")[i % 5]
        source = "abc"[i % 3] if role == "source" else "t"
        add(f"{source}/{role}/u{i}" if role != "source" else f"{source}/u{i}", role,
            _text(rng, rng.randint(8, 15)), _text(rng, rng.randint(10, 30)))
    exact = add("a/exact", "source", _text(rng, 12), _text(rng, 30))
    add("a/exact-copy", "source", exact["prompt"].upper(), "  " + exact["response"].replace(" ", "   "))
    add("b/exact-copy", "source", exact["prompt"], exact["response"])
    near = add("a/near", "source", _text(rng, 12), _text(rng, 40))
    add("a/near-copy", "source", near["prompt"], _changed(near["response"], (39,)))
    across = add("b/across", "source", _text(rng, 12), _text(rng, 40))
    add("c/across-copy", "source", across["prompt"], _changed(across["response"], (0, 39)))
    far = add("b/far", "source", _text(rng, 10), _text(rng, 20))
    add("c/far-changed", "source", far["prompt"], _changed(far["response"], (4, 10, 16)))  # J < 0.8: not a pair
    val = add("t/validation/v", "validation", _text(rng, 12), _text(rng, 25))
    add("c/val-copy", "source", val["prompt"], val["response"])
    test = add("t/test/x", "test", _text(rng, 12), _text(rng, 40))
    add("b/test-copy", "source", test["prompt"], _changed(test["response"], (20,)))
    add("c/rejected-copy", "source", test["prompt"], test["response"], status="rejected")  # never in a mixture
    table = pl.DataFrame(rows)
    by_id = {r["id"]: r for r in rows}
    assert _jaccard(by_id["b/far"], by_id["c/far-changed"]) < duplicates.JACCARD  # the planted miss is one
    for a, b in (("a/near", "a/near-copy"), ("b/across", "c/across-copy"), ("b/test-copy", "t/test/x")):
        assert duplicates.JACCARD <= _jaccard(by_id[a], by_id[b]) < 1
    want = {("a/exact", "a/exact-copy", "within_source"), ("a/exact", "b/exact-copy", "across_sources"),
            ("a/near", "a/near-copy", "within_source"), ("b/across", "c/across-copy", "across_sources"),
            ("c/val-copy", "t/validation/v", "target_validation"), ("b/test-copy", "t/test/x", "target_test")}
    return table, want


def test_planted_copies_are_found_with_their_kind_and_nothing_else(planted):
    table, want = planted
    pairs = duplicates.find(table)
    assert set(pairs.select("id_a", "id_b", "kind").iter_rows()) == want
    rows = {r["id"]: r for r in table.to_dicts()}
    for pair in pairs.iter_rows(named=True):
        assert pair["jaccard"] == pytest.approx(_jaccard(rows[pair["id_a"]], rows[pair["id_b"]]))
        assert (pair["source_a"], pair["source_b"]) == (rows[pair["id_a"]]["source"], rows[pair["id_b"]]["source"])
    assert pairs.equals(duplicates.find(table))  # deterministic, order included


def test_the_ivf_index_for_large_pools_finds_the_same_pairs(planted, monkeypatch):
    table, want = planted
    monkeypatch.setattr(duplicates, "FLAT_MAX", 0)
    assert set(duplicates.find(table).select("id_a", "id_b", "kind").iter_rows()) == want


def test_every_copy_of_a_text_is_paired_once_not_with_every_other_copy():
    copies = [{"id": f"{s}/{i}", "source": s, "role": "source", "status": "ok", "prompt": "same prompt here",
               "response": "and the same response"} for s in ("a", "b") for i in range(50)]
    pairs = duplicates.find(pl.DataFrame(copies))
    assert pairs["kind"].value_counts(sort=True).rows() == [("within_source", 98), ("across_sources", 1)]
    assert set(pairs["id_a"]) | set(pairs["id_b"]) == {c["id"] for c in copies}


def test_summary_counts_kinds_and_names_the_selected_contaminated_rows(planted):
    table, _ = planted
    section = duplicates.summary(duplicates.find(table), ["c/val-copy", "a/near", "c/u2"])
    assert section["pairs"] == {"within_source": 2, "across_sources": 2, "target_validation": 1, "target_test": 1}
    assert section["source_rows_involved"] == 9
    assert section["contaminated"]["target_validation"] == {"source_rows": 1, "selected_rows": 1,
                                                            "selected_ids": ["c/val-copy"]}
    assert section["contaminated"]["target_test"] == {"source_rows": 1, "selected_rows": 0, "selected_ids": []}
    assert len(section["examples"]) == 6 and "no row's selection was changed" in section["about"]


def test_a_builds_manifest_and_report_carry_the_section(demo_copy):
    recipe, _, manifest = demo_copy
    found = manifest["duplicates"]
    assert set(found["pairs"]) == set(duplicates.KINDS) and 0 < len(found["examples"]) <= 20
    rows = pl.read_parquet(recipe.output.path / "rows.parquet")
    selected = set(rows.filter(pl.col("status") == "selected")["id"])
    for kind in ("target_validation", "target_test"):
        hit = found["contaminated"][kind]
        assert set(hit["selected_ids"]) <= selected and hit["selected_rows"] <= hit["source_rows"]
    # the demo's 8 capitals give trivia/capitals exact copies, and its pool shares phrases with the target
    assert found["pairs"]["within_source"] > 0 and found["source_rows_involved"] > 0
    report(recipe.output.path)
    for page in ("index.html", "summary.md"):
        assert DUPLICATES in (recipe.output.path / "report" / page).read_text()
