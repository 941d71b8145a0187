"""Sizes a selection needs, checked at ingest before any fine-tune, and a selection made on too
little evidence saying so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dataselect import load_recipe, run
from dataselect.errors import RecipeError

from .conftest import write_jsonl, write_small_recipe

QA = {"prompt": "q", "response": "a"}


def qa_rows(n: int, tag: str, **extra) -> list[dict]:
    return [{"q": f"{tag} question {i}", "a": f"{tag} answer {i}", **extra} for i in range(n)]


def recipe_with(tmp: Path, validation_rows: int, sources: list[dict] | None = None):
    """A tiny recipe whose target has `validation_rows` rows; by default one 40-row source."""
    tmp.mkdir(parents=True, exist_ok=True)
    if sources is None:
        sources = [{"name": "s", "dataset": str(write_jsonl(tmp / "s.jsonl", qa_rows(40, "s"))), "format": QA}]
    target = write_jsonl(tmp / "t.jsonl", qa_rows(validation_rows, "t"))
    return load_recipe(write_small_recipe(tmp, "sizes", sources, target, QA, max_length=32))


def test_a_three_row_validation_split_is_refused_at_ingest_before_any_fine_tune(tmp_path):
    recipe = recipe_with(tmp_path, 3)
    with pytest.raises(RecipeError) as e:
        run(recipe)  # every stage asked for: ingest must stop it
    assert str(e.value).startswith("target t: validation split 'train' has 3 usable rows; selection needs at least 10")
    assert not recipe.run.stage_dir("meta_init").exists() and recipe.run.record("ingest") is None


def test_a_small_validation_split_warns_in_the_ingest_summary_and_the_log(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dataselect.ingest")
    summary = run(recipe_with(tmp_path, 15), until="ingest")["ingest"]
    (warning,) = summary["warnings"]
    assert warning.startswith("target t: validation split 'train' has only 15 usable rows: ")
    assert "intervals will be wide" in warning and "few groups, perhaps none, will be confidently" in warning
    assert warning in caplog.messages
    assert run(recipe_with(tmp_path / "enough", 40), until="ingest")["ingest"]["warnings"] == []


def test_small_groups_and_clusters_with_few_rows_each_are_warned_about(tmp_path):
    grouped = write_jsonl(tmp_path / "g.jsonl", qa_rows(30, "big", task="big") + qa_rows(2, "tiny", task="tiny")
                          + qa_rows(1, "one", task="one"))
    clustered = write_jsonl(tmp_path / "c.jsonl", qa_rows(12, "c"))
    sources = [{"name": "g", "dataset": str(grouped), "format": QA, "group_by": "task"},
               {"name": "c", "dataset": str(clustered), "format": QA, "clusters": 4}]
    warnings = run(recipe_with(tmp_path, 40, sources), until="ingest")["ingest"]["warnings"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("source g: 2 of its 3 groups have fewer than 10 usable rows (g/one (1), g/tiny (2)): ")
    assert warnings[1].startswith("source c: 12 usable rows for clusters: 4, about 3.0 a cluster: ")


def test_the_build_summary_prints_the_closest_calls_the_evidence_and_the_warnings(capsys):
    from dataselect.cli import _report

    rules = {"threshold_on": "high_end", "min_score": 0.0}
    select = {"method": "group_effect", "rules": rules, "groups": 11, "groups_selected": 11,
              "closest_calls": {"passed": {"group": "s/a", "tested": "Holm-adjusted high end", "value": 0.0123,
                                           "at": "0.025/11"}, "failed": None},
              "evidence": {"weak": True, "note": "weak evidence: no group is confidently above or below min_score 0.0"}}
    summaries = {"ingest": {"warnings": ["target t: validation split 'train' has only 15 usable rows: ..."]},
                 "select": select, "confirm": {}, "export": {"rows": 5, "path": "out", "fingerprint": "f"}}
    _report("export", summaries, quiet=False, wrote_output=True)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:4] == [
        "warning: target t: validation split 'train' has only 15 usable rows: ...",
        "keep rule: 11 of 11 groups (group_effect, threshold_on high_end, min_score 0.0)",
        "  closest calls, min_score 0.0: cleared by s/a (Holm-adjusted high end 0.0123, level 0.025/11)",
        "evidence: weak evidence: no group is confidently above or below min_score 0.0"]


def test_every_decision_in_the_demo_manifest_names_the_bound_it_tested(demo_build):
    """The manifest's groups carry the select stage's Holm columns through the confirm stage's
    export (after "keep rule: "), and the select summary says how much evidence there was."""
    _, summaries, manifest = demo_build
    select = summaries["select"]
    assert select["rules"]["threshold_on"] == "low_end" and not select["evidence"]["weak"]
    assert select["evidence"]["confidently_above"] >= 1 and select["closest_calls"]["passed"] is not None
    scored = [g for g in manifest["groups"] if g.get("examples")]
    for group in scored:
        rule = group["reason"].split("keep rule: ", 1)[-1]
        assert rule.startswith("kept: " if group["rule_selected"] else "dropped: "), group
        assert f"Holm-adjusted low end {group['adjusted_bound']:.3g} (step " in rule, group
        # min_score 0 and no budget: kept exactly when the bound tested clears 0 (or, after Holm's first
        # failure, would have)
        assert group["adjusted_bound"] > 0 if group["rule_selected"] else \
            group["adjusted_bound"] <= 0 or "step-down stopped before it" in rule
