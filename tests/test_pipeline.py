"""The demo end to end: the mixture, the manifest, row accounting, stage reuse, and the CLI."""

import json
import shutil

import datasets
import polars as pl
import pytest
from click.testing import CliRunner

from dataselect import build
from dataselect.cli import main
from dataselect.export import ExportError
from dataselect.pipeline import STAGE_NAMES, run
from dataselect.recipe import RecipeError
from dataselect.selectors import SELECTORS

from .conftest import DEMO, demo_recipe

HELPFUL, CORRUPTED = {"lexicon", "lexicon_cot"}, {"wrong_answers", "wrong_rationales"}


def _source_scores(manifest) -> dict[str, float]:
    groups = pl.DataFrame(manifest["groups"])
    weighted = groups.group_by("source").agg((pl.col("score") * pl.col("examples")).sum() / pl.col("examples").sum())
    return dict(zip(weighted["source"], weighted["score"]))


def test_output_opens_with_load_from_disk_and_keeps_provenance(demo_build):
    recipe, summaries, manifest = demo_build
    ds = datasets.load_from_disk(str(recipe.output.path))["train"]
    assert ds.num_rows == summaries["export"]["rows"] == manifest["mixture"]["rows"] > 0
    assert {"messages", "source", "group", "id", "score"} <= set(ds.column_names)
    row = ds[0]
    assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
    selected = {g["group"] for g in manifest["groups"] if g["selected"]}
    assert set(ds["group"]) == selected
    parquet = datasets.load_dataset("parquet", data_files=str(recipe.output.path / "data/train-*.parquet"),
                                    split="train")
    assert parquet.num_rows == ds.num_rows and parquet.column_names == ds.column_names


def test_corrupted_sources_score_below_helpful_ones_and_helpful_are_kept(demo_build):
    _, _, manifest = demo_build
    scores = _source_scores(manifest)
    assert max(scores[s] for s in CORRUPTED) < min(scores[s] for s in HELPFUL), scores
    assert scores["trivia"] < min(scores[s] for s in HELPFUL)
    kept = {g["group"] for g in manifest["groups"] if g["selected"]}
    assert {"lexicon/short", "lexicon/long", "lexicon_cot"} <= kept
    assert not any(g["source"] in CORRUPTED for g in manifest["groups"] if g["selected"])


def test_best_cluster_of_the_unlabeled_source_is_mostly_helpful(demo_build):
    recipe, _, manifest = demo_build
    lines = (recipe.run.demo_data / "unlabeled.jsonl").read_text().splitlines()
    quality = pl.DataFrame({"id": [f"unlabeled/{i}" for i in range(len(lines))],
                            "quality": [json.loads(line)["quality"] for line in lines]})
    rows = pl.read_parquet(recipe.output.path / "rows.parquet").join(quality, on="id")
    clusters = sorted((g for g in manifest["groups"] if g["source"] == "unlabeled"), key=lambda g: -g["score"])
    best = rows.filter(pl.col("group") == clusters[0]["group"])["quality"].value_counts()
    counts = dict(zip(best["quality"], best["count"]))
    assert counts.get("helpful", 0) > counts.get("corrupted", 0)


def test_every_input_row_is_accounted_for(demo_build):
    recipe, summaries, manifest = demo_build
    rows = pl.read_parquet(recipe.output.path / "rows.parquet")
    assert set(rows["status"].unique()) <= {"selected", "not_selected", "rejected"}
    assert rows["reason"].null_count() == 0 and rows["id"].n_unique() == rows.height
    read = {name: c["rows"] for name, c in summaries["ingest"]["rows"].items() if c["role"] == "source"}
    assert rows.group_by("source").len().sort("source").rows() == sorted(read.items())
    for name, counts in manifest["sources"].items():
        assert counts["rows"] == counts["selected"] + counts["not_selected"] + counts["rejected"]
    assert manifest["sources"]["trivia"]["rejected"] == 3
    selected = rows.filter(pl.col("status") == "selected")
    assert selected["repeats"].min() >= 1 and rows.filter(pl.col("status") != "selected")["repeats"].max() == 0
    assert selected["repeats"].sum() == manifest["mixture"]["rows"]  # a repeated group's rows are written again


def test_manifest_records_recipe_scores_and_stages(demo_build):
    recipe, _, manifest = demo_build
    assert manifest["recipe"]["name"] == "demo" and manifest["recipe"]["sketch"]["dim"] == recipe.sketch.dim
    assert set(manifest["stages"]) == set(STAGE_NAMES) - {"export"}
    group = manifest["groups"][0]
    assert {"group", "source", "examples", "tokens", "score", "ci95", "selected", "reason"} <= set(group)
    assert manifest["stages"]["estimate"]["loss_min"] < manifest["stages"]["estimate"]["base_loss"]
    points = manifest["stages"]["sketch"]["points"]
    assert [p["fraction"] for p in points] == recipe.sketch_path and all(p["weight"] > 0 for p in points)
    assert manifest["stages"]["meta_init"]["loss_last_10pct"] < manifest["stages"]["meta_init"]["loss_first_10pct"]


def test_a_second_build_reuses_every_stage(demo_build, caplog):
    recipe, summaries, _ = demo_build
    caplog.set_level("INFO", logger="dataselect.pipeline")
    again = build(recipe)
    assert again["export"]["fingerprint"] == summaries["export"]["fingerprint"]
    assert sum("reusing finished stage" in m for m in caplog.messages) == len(STAGE_NAMES)


def test_changing_selection_reruns_only_selection_and_export(demo_copy, caplog):
    recipe, _, _ = demo_copy
    changed = recipe.model_copy(update={"select": recipe.select.model_copy(update={"keep_fraction": 0.25})})
    caplog.set_level("INFO", logger="dataselect.pipeline")
    summaries = run(changed)
    reused = [m.split(":")[0] for m in caplog.messages if "reusing finished stage" in m]
    assert reused == ["ingest", "meta_init", "sketch", "estimate"]
    assert summaries["select"]["groups_selected"] == 3


def test_export_refuses_to_replace_foreign_folders(tmp_path, demo_copy):
    recipe, _, _ = demo_copy
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    moved = recipe.model_copy(update={"output": recipe.output.model_copy(update={"path": foreign})})
    with pytest.raises(ExportError, match="not a dataselect output.*--overwrite"):
        run(moved)
    assert (foreign / "notes.txt").read_text() == "keep me"
    result = CliRunner().invoke(main, ["export", "-r", str(DEMO), "-q", "--overwrite", f"--set=workdir={recipe.run_dir}",
                                       f"--set=output.path={foreign}"])
    assert result.exit_code == 0, result.output
    assert not (foreign / "notes.txt").exists() and (foreign / "manifest.json").exists()


def test_cli_help_describes_every_stage():
    runner = CliRunner()
    out = runner.invoke(main, ["--help"]).output
    for command in ["build", "ingest", "meta-init", "sketch", "estimate", "select", "export"]:
        assert command in out
        sub = runner.invoke(main, [command, "--help"])
        assert sub.exit_code == 0 and "--recipe" in sub.output and "--set" in sub.output


def test_cli_reports_bad_recipes_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("seed: 0", "seed: 0\nsede: 1"))
    result = CliRunner().invoke(main, ["build", "--recipe", str(bad)])
    assert result.exit_code == 1
    assert "sede: unknown key" in result.output and "Traceback" not in result.output


def test_cli_reports_missing_source_files(tmp_path):
    recipe = demo_recipe(tmp_path)  # only to reuse its paths
    result = CliRunner().invoke(main, ["ingest", "-q", "--recipe", str(DEMO), "--set", f"workdir={recipe.workdir}",
                                       "--set", "sources.0.dataset=./missing/data.jsonl"])
    assert result.exit_code == 1 and "./missing/data.jsonl: no such file" in result.output


LEXICON = {"lexicon/short", "lexicon/long", "lexicon_cot"}  # the demo's groups that teach the target's task


def _select(recipe, **rules) -> pl.DataFrame:
    """Run the select stage of a copied demo run afresh with other keep-rules (the estimates are
    reused; a select stage finished with the same rules is removed, not reused)."""
    changed = recipe.model_copy(update={"select": recipe.select.model_copy(update=rules)})
    shutil.rmtree(changed.run.stage_dir("select"), ignore_errors=True)
    summary = run(changed, until="select")["select"]
    groups = changed.run.selection.read()
    assert summary["method"] == rules.get("method", recipe.select.method) == summary["rules"]["method"]
    assert 0 < summary["groups_selected"] == groups["selected"].sum() <= groups.height
    return groups


def _kept(groups: pl.DataFrame) -> tuple[set[str], set[str]]:
    """The kept groups, and the sources they come from."""
    kept = groups.filter("selected")
    return set(kept["group"]), set(kept["source"])


@pytest.mark.parametrize("method", [m for m in SELECTORS if m != "group_effect"])  # the default: demo_build's
def test_every_selector_returns_a_valid_selection(demo_copy, method):
    """Every selector scores every group and gives each a reason; and each does on the demo what
    it is for, in what holds whatever the CPU (the corrupted and off-target groups' scores are far
    from any keep threshold; which of two helpful groups forward selection takes first is not)."""
    recipe, _, manifest = demo_copy
    groups = _select(recipe, method=method)
    assert sorted(groups["group"]) == sorted(g["group"] for g in manifest["groups"])
    assert groups["reason"].null_count() == 0 and groups["selected"].dtype == pl.Boolean
    kept, sources = _kept(groups)
    default = {g["group"] for g in manifest["groups"] if g["selected"]}  # group_effect's, confidently helpful
    if method == "all":
        assert groups["selected"].all() and groups["score"].is_null().all()
    elif method in ("random_ensemble", "surrogate", "gradient_similarity"):
        # The estimates' rankings, and the target's gradients: the corrupted rows lower a
        # translation's loss on no target example, so only the lexicon and its like are kept.
        assert LEXICON <= kept and not sources & CORRUPTED and "trivia" not in sources, kept
    elif method == "forward":
        assert kept and kept <= default and not sources & CORRUPTED, kept
    elif method in ("representation_similarity", "dsir"):
        # Similar text, right or wrong: they keep the target's format (the lexicon) and drop the
        # off-target trivia, but cannot tell a wrong answer from a right one.
        assert kept & LEXICON and "trivia" not in sources, kept
    elif method == "random":
        # Blind to the data: at a budget of half the groups it keeps exactly half, the same half on
        # every rerun, and not the half the estimates rank best.
        half = _select(recipe, method="random", keep_fraction=0.5, min_score=None)
        again = _select(recipe, method="random", keep_fraction=0.5, min_score=None)
        best = set(sorted(manifest["groups"], key=lambda g: -g["score"])[i]["group"] for i in range(6))
        assert _kept(half)[0] == _kept(again)[0] and len(_kept(half)[0]) == groups.height // 2 == 6
        assert _kept(half)[0] != best
    else:
        raise AssertionError(f"no check of what {method} does: add one")


def test_a_selection_that_keeps_nothing_is_refused_with_the_best_groups_case(demo_copy):
    recipe, _, _ = demo_copy
    strict = recipe.model_copy(update={"select": recipe.select.model_copy(update={"min_score": 1e6})})
    with pytest.raises(RecipeError, match=r"kept none of the \d+ groups .*threshold_on low_end.*the best, "
                                          r".*not confidently above min_score 1000000.0.*select.training: steps"):
        run(strict, until="select")
