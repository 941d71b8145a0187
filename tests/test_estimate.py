import numpy as np
import polars as pl
import pytest
import torch
from scipy.optimize import minimize

from dataselect.estimate import estimate_subsets, sample_subsets, solve_subsets, target_loss
from dataselect.recipe import Select
from dataselect.select import apply_keep_rules, random_ensemble_scores


def _problem(seed=0, n=300, d=12):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    f0 = rng.normal(0.5, 1.0, size=n).astype(np.float32)
    return x, f0


def _reference(x, f0, rows, lam):
    """The same objective per subset with scipy's L-BFGS, in float64."""
    x, f0 = x[rows].astype(np.float64), f0[rows].astype(np.float64)

    def fun(w):
        m = f0 + x @ w
        loss = np.logaddexp(0, -m).mean() + lam * w @ w
        grad = -(x * (1 / (1 + np.exp(m)))[:, None]).mean(0) + 2 * lam * w
        return loss, grad

    return minimize(fun, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B", tol=1e-12).x


@pytest.mark.parametrize("lam", [1.0, 0.05])
def test_batched_solver_matches_per_subset_reference(lam):
    x, f0 = _problem()
    rng = np.random.default_rng(1)
    masks = rng.random((6, len(x))) < 0.5
    weights = torch.from_numpy(masks / masks.sum(1, keepdims=True)).float()
    w, steps, unconverged = solve_subsets(torch.from_numpy(x), torch.from_numpy(f0), weights, lam, 200, 1e-5)
    assert unconverged == 0 and steps < 30
    for s in range(len(masks)):
        ref = _reference(x, f0, masks[s], lam)
        assert np.allclose(w[s].numpy(), ref, atol=1e-4 * max(1, np.abs(ref).max())), s


def test_target_loss_moves_along_its_gradient():
    gradient = torch.tensor([1.0, -2.0, 0.0, 0.5])
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 5.0, 0.0]])
    assert torch.allclose(target_loss(gradient, 0.7, w), torch.tensor([0.7, 0.6]))


def test_subsets_are_seeded_and_sized():
    a, b = sample_subsets(10, 50, 0.3, seed=7), sample_subsets(10, 50, 0.3, seed=7)
    assert np.array_equal(a, b) and (a.sum(1) == 3).all()
    assert not np.array_equal(a, sample_subsets(10, 50, 0.3, seed=8))


def test_estimates_reward_groups_aligned_with_the_target():
    """Group 0 pushes along the target's gradient, group 1 against it, group 2 sideways."""
    rng = np.random.default_rng(0)
    d, u = 16, np.eye(16, dtype=np.float32)
    x = np.concatenate([u[0] + 0.1 * rng.normal(size=(50, d)), -u[0] + 0.1 * rng.normal(size=(50, d)),
                        u[1] + 0.1 * rng.normal(size=(50, d))]).astype(np.float32)
    group_of = np.repeat(np.arange(3), 50)
    subsets = sample_subsets(3, 200, 0.5, seed=0)
    est = estimate_subsets(x, np.zeros(150, np.float32), group_of, -u[0], 0.7, subsets,  # raising F lowers the loss
                           l2=0.5, max_iter=500, tol=1e-6)
    scores = random_ensemble_scores(subsets, est.loss, ["good", "bad", "side"])
    order = scores.sort("score", descending=True)["group"].to_list()
    assert order == ["good", "side", "bad"]


def test_keep_rules_give_reasons():
    groups = pl.DataFrame({"group": list("abcd"), "score": [0.3, -0.1, 0.2, None], "examples": [10, 10, 30, 5],
                           "tokens": [100, 900, 200, 50]})
    top = apply_keep_rules(groups, Select(keep_fraction=0.5))
    assert top.filter("selected")["group"].to_list() == ["a", "c"]
    assert "outside the top 50%" in top.filter(pl.col("group") == "b")["reason"][0]
    assert "no score" in top.filter(pl.col("group") == "d")["reason"][0]
    budget = apply_keep_rules(groups, Select(keep_fraction=1.0, max_examples=20))
    assert budget.filter("selected")["group"].to_list() == ["a", "b"]
    threshold = apply_keep_rules(groups, Select(keep_fraction=1.0, min_score=0.0))
    assert threshold.filter("selected")["group"].to_list() == ["a", "c"]
    unsure = apply_keep_rules(groups.with_columns(ci95=pl.Series([0.1, 0.1, 0.25, None])),
                              Select(keep_fraction=1.0, min_score=0.0))
    assert unsure.filter("selected")["group"].to_list() == ["a"]  # c: 0.2 ± 0.25 may be below 0
    assert "0.2 ± 0.25 not above min_score" in unsure.filter(pl.col("group") == "c")["reason"][0]
    loose = apply_keep_rules(groups.with_columns(ci95=pl.Series([0.1, 0.1, 0.25, None])),
                             Select(keep_fraction=1.0, min_score=0.0, confident=False))
    assert loose.filter("selected")["group"].to_list() == ["a", "c"]
    tokens = apply_keep_rules(groups, Select(keep_fraction=1.0, max_tokens=350))
    assert tokens.filter("selected")["group"].to_list() == ["a", "c"]
    assert "max_tokens=350" in tokens.filter(pl.col("group") == "b")["reason"][0]


def test_reference_mode_agrees_with_the_research_codes_construction():
    """The research code: random labels ~ Bernoulli(0.7), flip the feature sign for label 0, fit
    sklearn's L2 logistic regression (C = 1e-4, liblinear, intercept) and keep coef_. Our
    reference mode gives the same direction in closed form."""
    from sklearn.linear_model import LogisticRegression

    from dataselect.estimate import reference_steps

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4000, 100)) + rng.normal(size=100)).astype(np.float32)
    labels = rng.random(4000) < 0.7
    flipped = np.where(labels[:, None], x, -x)
    fit = LogisticRegression(C=1e-4, solver="liblinear").fit(flipped, labels.astype(int))
    research = fit.coef_[0]
    ours = reference_steps(torch.from_numpy(x), torch.full((1, 4000), 1 / 4000), 2.0)[0].numpy()
    cosine = research @ ours / (np.linalg.norm(research) * np.linalg.norm(ours))
    assert cosine > 0.99 and np.isclose(np.linalg.norm(ours), 2.0)


def _additive(effects):
    return lambda members: 1.0 + members.astype(float) @ np.asarray(effects)


def test_forward_selection_recovers_the_best_set_of_an_additive_score():
    from dataselect.select import forward_selection

    effects = [-0.3, 0.2, -0.1, 0.05, -0.2, 0.0]  # negative lowers the loss
    chosen, scores = forward_selection(_additive(effects), len(effects), base_loss=1.0)
    assert chosen == [0, 4, 2]
    assert np.allclose(scores[[0, 4, 2]], [0.3, 0.2, 0.1]) and (scores[[1, 3, 5]] <= 0).all()


def test_surrogate_recovers_additive_effects_up_to_their_mean():
    from dataselect.select import surrogate_scores

    effects = np.array([-0.3, 0.2, -0.1, 0.05, -0.2, 0.0])
    subsets = sample_subsets(6, 300, 0.5, seed=0)
    scores = surrogate_scores(subsets, _additive(effects)(subsets), list("abcdef"))
    assert np.allclose(scores["score"].to_numpy(), -(effects - effects.mean()), atol=1e-9)


def test_step_norm_measures_a_fine_tunes_distance_from_theta_star(demo_build, tmp_path):
    from safetensors.torch import load_file, save_file

    from dataselect.estimate import step_norms

    recipe, _, _ = demo_build
    theta = load_file(str(recipe.run_dir / "meta_init" / "theta.safetensors"))
    assert step_norms(recipe, [recipe.run_dir / "meta_init" / "theta.safetensors"]) == [0.0]
    moved = dict(theta)
    moved["lm_head.weight"] = theta["lm_head.weight"] + 0.01
    moved["model.embed_tokens.weight"] = theta["model.embed_tokens.weight"] + 5.0  # not sketched
    save_file(moved, str(tmp_path / "finetuned.safetensors"))
    expected = 0.01 * theta["lm_head.weight"].numel() ** 0.5
    assert abs(step_norms(recipe, [tmp_path / "finetuned.safetensors"])[0] - expected) < 1e-4
