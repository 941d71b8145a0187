"""verify's bookkeeping on a tiny run, and its statistics against scipy."""

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

from dataselect.verify import kendall, leave_one_out_calibrated, spearman, verify

from .conftest import demo_recipe


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


def test_verify_bookkeeping_on_a_tiny_run(tmp_path):
    recipe = demo_recipe(tmp_path, "meta_init.epochs=1", "estimate.subsets=40")
    summary = verify(recipe, k_random=2, repeats=1)
    out = recipe.run_dir / "verify"
    results = pl.read_parquet(out / "results.parquet")
    assert results["subset"].to_list() == ["random 0", "random 1", "selected by random_ensemble", "not selected"]
    sampled = np.load(recipe.run_dir / "estimate" / "subsets.npy")
    assert results["groups"].to_list()[:2] == sampled[:2].sum(1).tolist()
    assert results["groups"][2] + results["groups"][3] == sampled.shape[1]
    assert (results["true_loss"] > 0).all() and results["estimate"].is_finite().all()
    assert results["true_exact_match"].is_between(0, 1).all()  # the demo target defines an answer
    assert {"gradient_similarity_score", "first_order_error", "zeroth_order_error"} <= set(results.columns)
    assert set(summary) >= {"estimate", "estimate_calibrated_loo", "constant_mean_loo", "baselines_spearman",
                            "first_order", "calibration", "exact_match_spearman", "truth_noise", "step_norms"}
    assert summary["truth_noise"]["repeats"] == 1 and summary["truth_noise"]["median_relative_difference"] >= 0
    assert (results["true_step_norm"] > 0).all() and (results["estimated_step_norm"] > 0).all()
    assert len(summary["calibration"]["tried"]) == 9
    assert set(summary["estimate"]) == {"spearman", "kendall", "r2", "median_relative_error"}
    assert json.loads((out / "summary.json").read_text())["subsets"] == 4
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| predictor | Spearman |" in (out / "report.md").read_text()
    # one real fine-tune per subset and one repeat with the next seed, kept for reuse
    assert sorted(p.name.endswith("-seed1") for p in (out / "finetunes").iterdir()) == [False] * 4 + [True]
