"""verify's bookkeeping on a tiny run, and its statistics against scipy."""

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

from dataselect.artifacts import Run
from dataselect.estimate import load_pool
from dataselect.trainer import finetune_and_score, finetune_folder
from dataselect.examples import token_rows, usable
from dataselect.verify import QUICK, cost, kendall, leave_one_out_calibrated, spearman, spearman_p_value, verdict, verify

from .conftest import DEMO, SMALL, demo_recipe


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


def test_the_p_value_is_exact_for_few_subsets_and_says_what_few_can_show():
    truth = np.arange(4.0)
    assert spearman_p_value(truth, truth) == (pytest.approx(1 / 24), pytest.approx(1.0))  # only a perfect ranking
    estimate = np.array([0.0, 2, 1, 3, 5, 4])
    p, _ = spearman_p_value(estimate, np.arange(6.0))
    assert p == pytest.approx(stats.permutation_test((np.arange(6.0),), lambda x: stats.spearmanr(
        x, estimate).statistic, permutation_type="pairings", alternative="greater", n_resamples=np.inf).pvalue)
    assert spearman_p_value(np.arange(8.0), np.arange(8.0))[1] == pytest.approx(0.643, abs=1e-3)  # the textbook
    # critical value for 8 pairs, one-sided 5%
    big = np.arange(12.0)
    assert spearman_p_value(big, big)[0] < 1e-3 and spearman_p_value(big, big)[1] is None


def _summary(n: int, rho_order: np.ndarray, baselines: dict, rows_alone=None, noise=0.01, repeats=3) -> dict:
    estimate = rho_order.astype(float)
    truth = np.linspace(1.0, 2.0, n)
    return {"subsets": n, "estimate": {"spearman": spearman(estimate, truth)}, "baselines_spearman": baselines,
            "rows_alone_spearman": rows_alone, "truth_noise": {"median_relative_difference": noise,
                                                               "repeats": repeats}}, estimate, truth


def test_the_verdict_says_in_words_whether_the_estimates_rank_like_real_fine_tunes():
    summary, estimate, truth = _summary(10, np.arange(10), {"dsir": 0.3, "gradient_similarity": 0.5}, 0.2)
    said = verdict(summary, estimate, truth)
    assert said["level"] == "agree" and said["p_value"] < 0.05
    assert said["text"].startswith("The estimates rank these 10 subsets like real fine-tunes: Spearman 1.00 (p = ")
    assert "above every similarity baseline and the subsets' sizes alone (best: gradient_similarity 0.50)" in said["text"]
    assert "The truth's own noise: a fine-tune of the same rows with another seed lands 1.0% away (median of 3)" in said["text"]
    assert "quick look" not in said["text"]

    beaten, estimate, truth = _summary(10, np.arange(10), {"dsir": 1.0})  # a baseline ranks them as well
    said = verdict(beaten, estimate, truth)
    assert said["level"] == "partly" and "dsir ranks them as well (1.00)" in said["text"]
    few, estimate, truth = _summary(3, np.arange(3), {}, rows_alone=1.0)
    said = verdict(few, estimate, truth)
    assert "the subsets' sizes alone rank them as well (1.00)" in said["text"]
    assert "With 3 subsets no ranking can reach p < 0.05: verify more of them." in said["text"]

    shuffled, estimate, truth = _summary(10, np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]), {})
    assert verdict(shuffled, estimate, truth)["text"].startswith(
        "The estimates do not rank these 10 subsets like real fine-tunes: Spearman -1.00")

    noisy, estimate, truth = _summary(4, np.array([0, 2, 1, 3]), {}, noise=0.5, repeats=1)
    said = verdict(noisy, estimate, truth, until=0.5)
    assert said["level"] == "partly" and "With 4 subsets, p < 0.05 needs a Spearman of at least 1.00." in said["text"]
    assert "; comparable, so no ranking of these subsets can be firm." in said["text"]
    assert said["text"].endswith("A quick look: each fine-tune stopped at 50% of its steps, 4 subsets, 1 repeat: "
                                 "noisier than a full verify; run one before relying on it.")


def test_the_cost_is_counted_before_the_fine_tunes_start(tmp_path):
    from dataselect.artifacts import FineTune, write_record

    recipe = demo_recipe(tmp_path, "meta_init.batch_size=10", "meta_init.epochs=1")
    meta = recipe.run.stage_dir("meta_init")
    meta.mkdir(parents=True)
    write_record(meta, {"stage": "meta_init", "seconds": 300.0, "summary": {"steps": 400}})
    parts = [[([1, 2, 3], 1)] * n for n in (100, 200, 300, 400)]  # 10, 20, 30 and 40 steps
    planned = cost(recipe, parts, repeats=1, until=0.5, finetunes=tmp_path / "finetunes")
    assert planned["fine_tunes"] == 5 and planned["steps"] == 5 + 10 + 15 + 20 + 5
    assert planned["multiple_of_meta_init"] == pytest.approx(55 / 400)
    assert planned["estimated_seconds"] == pytest.approx(300 * 55 / 400)
    assert planned["text"] == ("verify: 5 fine-tunes (4 subsets, 1 again with the next seed), each stopped at 50% of "
                               "its steps: 55 steps to train, 0.14× meta-init's fine-tune of the pool (400 steps in "
                               "5 minutes), so about 41 s of training, plus scoring each on the validation split.")
    kept = FineTune(finetune_folder(recipe, parts[3], tmp_path / "finetunes"))  # a fine-tune already kept
    kept.folder.mkdir(parents=True)
    kept.snapshot(0.5, 40).write_bytes(b"")
    again = cost(recipe, parts, repeats=1, until=0.5, finetunes=tmp_path / "finetunes")
    assert again["steps"] == 35 and again["kept"] == 1 and f"(1 already kept in {tmp_path / 'finetunes'}, reused)" in again["text"]
    assert cost(recipe, parts, repeats=0, until=1.0, finetunes=tmp_path / "finetunes")["steps"] == 100


def test_the_verify_command_prints_a_verdict_and_the_files_and_quick_asks_for_less(tmp_path, monkeypatch):
    """The command's side: the verdict and paths it prints, and what --quick asks verify for (the
    real fine-tunes of a quick look are in the slow test below)."""
    from click.testing import CliRunner

    import dataselect.verify
    from dataselect.cli import main

    asked = []

    def fake_verify(recipe, k_random, repeats, out, force, until, announce):
        asked.append((k_random, repeats, until, out))
        announce("verify: 5 fine-tunes (the cost)")
        return {"verdict": {"text": "The estimates rank these 4 subsets like real fine-tunes."}}

    monkeypatch.setattr(dataselect.verify, "verify", fake_verify)
    recipe = demo_recipe(tmp_path)
    args = ["verify", "-r", str(DEMO), "--set", f"workdir={tmp_path / 'run'}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    folder = recipe.run.verification.folder
    assert asked[-1] == (8, 3, 1.0, folder)
    assert result.stderr.splitlines()[-1] == "verify: 5 fine-tunes (the cost)"
    assert result.stdout.splitlines() == [
        "verdict: The estimates rank these 4 subsets like real fine-tunes.",
        f"report:  {folder / 'report.md'}", f"plot:    {folder / 'scatter.png'}",
        f"results: {folder / 'results.parquet'} (per subset: estimate, true loss, baselines; summary.json beside it)"]
    quick = CliRunner().invoke(main, [*args, "--quick"])
    assert quick.exit_code == 0 and asked[-1] == (QUICK["k_random"], QUICK["repeats"], QUICK["until"],
                                                  recipe.run.stage_dir("verify-quick"))
    assert f"report:  {recipe.run.stage_dir('verify-quick') / 'report.md'}" in quick.stdout
    assert CliRunner().invoke(main, [*args, "--quick", "--subsets", "5"]).exit_code == 0 and asked[-1][:2] == (5, 1)
    assert "the cost" not in CliRunner().invoke(main, [*args, "-q"]).stderr  # quiet: only the result


@pytest.mark.slow
def test_verify_bookkeeping_on_a_tiny_run(tmp_path):
    settings = ("meta_init.epochs=1", "estimate.subsets=40", "select.keep_fraction=0.5", *SMALL)
    recipe = demo_recipe(tmp_path, *settings)
    _quick_look_as_a_user_runs_it(recipe, settings)
    summary = verify(recipe, k_random=2, repeats=1)  # the same subsets in full: the quick fine-tunes go on
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


def _quick_look_as_a_user_runs_it(recipe, settings: tuple[str, ...]) -> None:
    """`dataselect verify --quick`: its cost said before the fine-tunes start, 4 subsets and 1 repeat,
    each fine-tune stopped half-way, a verdict that says it is a quick look, and the files named."""
    from click.testing import CliRunner

    from dataselect.artifacts import FineTune
    from dataselect.cli import main

    overrides = (f"workdir={recipe.run_dir}", f"output.path={recipe.output.path}", *settings)
    result = CliRunner().invoke(main, ["verify", "-r", str(DEMO), "--quick", *(f"--set={o}" for o in overrides)])
    assert result.exit_code == 0, result.output
    said = "verify: 5 fine-tunes (4 subsets, 1 again with the next seed), each stopped at 50% of its steps: "
    assert said in result.stderr and "× meta-init's fine-tune of the pool (" in result.stderr
    assert result.output.index(said) < result.output.index("verdict: ")  # said before, not after
    folder = recipe.run.stage_dir("verify-quick")
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert "A quick look: each fine-tune stopped at 50% of its steps, 4 subsets, 1 repeat" in lines["verdict"]
    assert lines["report"].strip() == str(folder / "report.md") and lines["plot"].strip() == str(folder / "scatter.png")
    assert (folder / "report.md").read_text().splitlines()[2] == lines["verdict"]
    assert (folder / "scatter.png").exists() and pl.read_parquet(folder / "results.parquet").height == 4
    quick = json.loads((folder / "summary.json").read_text())
    assert quick["until"] == 0.5 and quick["cost"]["fine_tunes"] == 5 and quick["truth_noise"]["repeats"] == 1
    assert quick["verdict"]["level"] in {"agree", "partly", "disagree", "unknown"}
    kept = [FineTune(f) for f in recipe.run.finetunes.iterdir()]
    assert len(kept) == 5 and not any(f.theta.exists() for f in kept)  # shorter: none ran to the end
    assert all(len(list(f.folder.glob("snapshot-*.safetensors"))) == 1 and f.checkpoint.exists() for f in kept)
    assert not recipe.run.verification.folder.exists()  # a full verify's folder is not written over


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
