"""verify's bookkeeping on a tiny run, and its statistics against scipy."""

import numpy as np
import polars as pl
import pytest
from scipy import stats

from dataselect.artifacts import Run
from dataselect.estimate import load_pool
from dataselect.trainer import finetune_and_score, finetune_folder
from dataselect.examples import token_rows, usable
from dataselect.verify import kendall, leave_one_out_calibrated, spearman, verify

from .conftest import SMALL, demo_recipe


def test_rank_statistics_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:5] = b[5]  # ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)


def test_leave_one_out_calibration_never_uses_the_subset_itself():
    est = np.array([0.0, 1.0, 2.0, 3.0])
    truth = np.exp(2 * est + 1)
    truth[3] = 1e6  # an outlier cannot fit itself
    fitted = leave_one_out_calibrated(est, truth)
    assert fitted[3] == pytest.approx(np.exp(7.0)) and fitted[0] != pytest.approx(np.e)


@pytest.mark.slow
def test_verify_bookkeeping_on_a_tiny_run(tmp_path):
    recipe = demo_recipe(tmp_path, "meta_init.epochs=1", "estimate.subsets=40", "select.keep_fraction=0.5", *SMALL)
    summary = verify(recipe, k_random=2, repeats=1)
    out = recipe.run.verification
    results = out.results()
    assert results["subset"].to_list() == ["random 0", "random 1", f"selected by {recipe.select.method}", "not selected"]
    groups, sampled, _ = recipe.run.estimates.read()
    assert results["groups"].to_list()[:2] == sampled[:2].sum(1).tolist()
    assert results["groups"][2] + results["groups"][3] == sampled.shape[1]
    assert results["estimate"].is_finite().all()
    assert results["true_exact_match"].is_between(0, 1).all()  # the demo target defines an answer
    assert {"gradient_similarity_score", "representation_similarity_score", "dsir_score"} <= set(results.columns)
    assert set(summary) >= {"estimate", "estimate_calibrated_loo", "constant_mean_loo", "baselines_spearman",
                            "rows_alone_spearman", "exact_match_spearman", "truth_noise"}
    # The subsets differ in rows, so in steps: the estimate counts them, and "rows alone" ranks by them.
    rows = results["examples"].to_numpy()
    assert np.ptp(rows) > 0
    assert summary["rows_alone_spearman"] == pytest.approx(spearman(-rows, results["true_loss"].to_numpy()))
    pool = load_pool(recipe, recipe.run.ingested, recipe.run.sketches)
    assert np.allclose(results["estimate"].to_numpy(), pool.evaluate(out.memberships(), budget="epochs"))
    assert not np.allclose(results["estimate"].to_numpy(), pool.evaluate(out.memberships(), budget="steps"))
    # The first subset's rows, as verify trains on them: its truth is its own fine-tune's loss, and
    # the noise compares it with a fine-tune of the same rows with the next seed (another model).
    kept = [g for g, m in zip(groups, out.memberships()[0]) if m]
    assigned = recipe.run.estimates.assignments()
    examples = recipe.run.ingested.examples()
    sources = pl.concat([usable(examples, "source", s.name) for s in recipe.sources]).join(assigned, on="id")
    rows = token_rows(sources.filter(pl.col("group_right").is_in(kept)))
    first = finetune_and_score(recipe, rows, recipe.run.finetunes)["validation"]["loss"]
    assert first == pytest.approx(results["true_loss"][0], rel=1e-6)
    again = recipe.model_copy(update={"seed": recipe.seed + 1})
    second = finetune_and_score(again, rows, recipe.run.finetunes)["validation"]["loss"]
    assert summary["truth_noise"]["repeats"] == 1 and second != first
    assert summary["truth_noise"]["median_relative_difference"] == pytest.approx(abs(second - first) / first)
    assert set(summary["estimate"]) == {"spearman", "kendall", "r2", "median_relative_error",
                                        "mean_squared_relative_error"}
    assert out.summary()["subsets"] == 4
    assert out.scatter.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| predictor | Spearman |" in out.report.read_text()
    # one real fine-tune per subset and one repeat with the next seed, kept for reuse
    assert len(list(recipe.run.finetunes.iterdir())) == 5


def test_finetunes_are_keyed_by_what_they_depend_on(tmp_path):
    recipe = demo_recipe(tmp_path)
    rows = [([1, 5, 7, 2], 2), ([1, 6, 2], 1)]
    folder = finetune_folder(recipe, rows, tmp_path)
    other_target = recipe.model_copy(update={"target": recipe.target.model_copy(update={"name": "other"})})
    assert finetune_folder(other_target, rows, tmp_path) == folder  # another target, same training: shared
    changed_row = [([1, 5, 8, 2], 2), ([1, 6, 2], 1)]  # a source row changed (or its tokenizer, or max_length)
    assert finetune_folder(recipe, changed_row, tmp_path) != folder
    assert finetune_folder(recipe, rows[::-1], tmp_path) != folder  # the same rows in another order
    assert finetune_folder(recipe, [([1, 5, 7, 2], 3), rows[1]], tmp_path) != folder  # another prompt mask
    for update in ({"seed": 1}, {"meta_init": recipe.meta_init.model_copy(update={"lr": 1e-4})}):
        assert finetune_folder(recipe.model_copy(update=update), rows, tmp_path) != folder
    base = Run(tmp_path / "run").ingested.base
    base.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"other weights")  # the tiny base built at ingest
    assert finetune_folder(recipe, rows, tmp_path) != folder
