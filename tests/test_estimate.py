import math
import re

import numpy as np
import polars as pl
import pytest
import torch

from dataselect.estimate import Pool, alignments, pool_of, sample_subsets
from dataselect.recipe import Select
from dataselect.select import apply_keep_rules, confidently_past, random_ensemble_scores


def _pool(x, tokens, group_of, target_x=((1.0,),), target_tokens=(1.0,), base=2.0, batch=8) -> Pool:
    """A pool of sketches x (examples × d) whose target is, unless said otherwise, one example of
    one token with sketch (1, 0, ...): then each example's alignment is its first coordinate."""
    x, group_of = np.atleast_2d(np.asarray(x, float)), np.asarray(group_of)
    x = x.T if x.shape[0] == 1 and len(group_of) > 1 else x
    target_x = np.asarray(target_x, float)
    target_x = np.hstack([target_x, np.zeros((len(target_x), x.shape[1] - target_x.shape[1]))])
    return pool_of([str(i) for i in range(len(x))], [f"g{g}" for g in group_of], x, np.asarray(tokens, float),
                   target_x, np.asarray(target_tokens, float), np.full(len(target_x), base) * np.asarray(target_tokens),
                   batch)


def test_a_subsets_estimate_is_the_base_loss_minus_its_scaled_per_token_alignment():
    pool = _pool(x=[[3.0, 1.0], [1.0, 0.0], [-2.0, 2.0], [4.0, -1.0]], tokens=[2, 2, 4, 8], group_of=[0, 0, 1, 2])
    members = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=bool)
    # the plain gradient step: a group counts by its tokens, as a token-averaged training loss counts them
    assert np.allclose(pool.sums.per_token(members), [4 / 4, 2 / 8, 4 / 8, 6 / 16])
    scales = pool.sums.step_scales(members)
    assert np.allclose(pool.evaluate(members, budget="steps"), 2.0 - scales * pool.sums.per_token(members))
    rows = np.array([2, 3, 1, 4]) / 4  # with the recipe's epochs over S, its share of the pool's rows
    assert np.allclose(pool.evaluate(members, budget="epochs"), 2.0 - rows * scales * pool.sums.per_token(members))
    assert scales[-1] == pytest.approx(1.0)  # the whole pool's step is meta-init's own


def test_the_step_scale_divides_by_the_root_mean_square_of_a_batchs_gradient():
    """AdamW divides by the root of the gradient's mean square over batches: for S, the batch mean
    Σ_{j∈B} g_j / Σ_{j∈B} T_j's squared length averaged over the batches of shuffled epochs. Drawn
    for real. (The delta method is first order in the spread of a batch's tokens: with lengths
    from 1 to 20 it errs 6% low.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, size=(600, 5)) * rng.integers(1, 6, size=(600, 1))
    tokens = rng.integers(5, 15, 600).astype(float)
    group_of = rng.integers(0, 3, 600)
    pool = _pool(x, tokens, group_of, batch=16)
    member = np.array([True, False, True])
    rows = np.flatnonzero(member[group_of])
    batches = np.concatenate([rng.permutation(rows) for _ in range(800)])  # shuffled epochs, cut into batches
    batches = batches[: len(batches) // 16 * 16].reshape(-1, 16)
    drawn = (x[batches].sum(1) / tokens[batches].sum(1, keepdims=True)) ** 2
    assert pool.sums.mean_square(member)[0] == pytest.approx(drawn.sum(1).mean(), rel=0.03)
    signal = ((x[rows].sum(0) / tokens[rows].sum()) ** 2).sum()
    assert pool.sums.mean_square(member)[0] > 1.2 * signal  # the batch noise is a real part of it


def test_a_small_groups_batches_are_drawn_without_replacement_as_a_shuffled_epoch_draws_them():
    """A fine-tune shuffles the group's rows each epoch and cuts them into batches (meta-init's
    loop): with 48 rows and batches of 16, a batch holds a third of the group, and its mean varies
    (48 − 16) / 47 as much as a batch drawn with replacement. A group no larger than a batch sees
    all of itself every step: no batch noise."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.2, 1.0, size=(48, 4))
    tokens = rng.integers(8, 12, 48).astype(float)
    pool = _pool(x, tokens, np.zeros(48, dtype=int), batch=16)
    epochs = np.stack([rng.permutation(48) for _ in range(6000)]).reshape(-1, 16)  # consecutive batches
    drawn = ((x[epochs].sum(1) / tokens[epochs].sum(1, keepdims=True)) ** 2).sum(1).mean()
    signal = ((x.sum(0) / tokens.sum()) ** 2).sum()
    assert pool.sums.mean_square(np.array([True]))[0] == pytest.approx(drawn, rel=0.02)
    with_replacement = signal + (drawn - signal) * 47 / 32
    assert abs(with_replacement - drawn) > 0.1 * drawn  # the difference the test can see
    whole = _pool(x[:16], tokens[:16], np.zeros(16, dtype=int), batch=16)
    only_signal = ((x[:16].sum(0) / tokens[:16].sum()) ** 2).sum()
    assert whole.sums.mean_square(np.array([True]))[0] == pytest.approx(only_signal)


def test_a_groups_effect_does_not_grow_with_its_gradients_size():
    """Two groups whose gradients point the same way, one's four times as long (a few short,
    near-certain tokens): AdamW steps as far along either, so their effects are equal, while the
    plain gradient step favours the long one fourfold."""
    rng = np.random.default_rng(0)
    x = np.hstack([rng.normal(1.0, 0.5, (400, 1)), rng.normal(0.0, 0.5, (400, 3))])
    x = np.vstack([x, 4 * x])
    pool = _pool(x, np.ones(800), np.repeat([0, 1], 400))
    effects = pool.group_effects()
    assert effects["per_token"][1] == pytest.approx(4 * effects["per_token"][0])
    assert effects["effect"][1] == pytest.approx(effects["effect"][0])
    assert effects["ci95"][1] == pytest.approx(effects["ci95"][0])


def test_a_groups_effect_is_its_own_estimate_with_an_interval_that_shrinks_with_its_size():
    rng = np.random.default_rng(0)
    sizes = [20, 2000, 2000]
    alignment = np.concatenate([rng.normal(0.5, 1.0, 20), rng.normal(0.5, 1.0, 2000), rng.normal(-0.2, 1.0, 2000)])
    tokens = rng.integers(1, 9, sum(sizes)).astype(float)
    pool = _pool((alignment * tokens)[:, None], tokens, np.repeat(np.arange(3), sizes))
    scores = pool.group_effects()
    singles = pool.evaluate(np.eye(3, dtype=bool), budget="steps")
    assert np.allclose(scores["effect"].to_numpy(), pool.base_loss - singles)  # L⁰ − f̂({g}) per step
    ci = scores["ci95"].to_numpy()
    assert ci[0] > 5 * ci[1] and scores["effect"][1] - ci[1] > 0 and scores["effect"][2] + ci[2] < 0


def test_a_subsets_estimate_counts_the_steps_its_fine_tune_takes():
    """Groups 0 and 1 hold copies of one example, 100 and 300 of them: per step they are worth
    the same, but the recipe's epochs over group 1 take three times the steps of group 0's."""
    x = np.full((400, 1), 2.0)
    pool = _pool(x, np.ones(400), np.repeat([0, 1], [100, 300]))
    singles = np.eye(2, dtype=bool)
    per_step = pool.base_loss - pool.evaluate(singles, budget="steps")
    per_epochs = pool.base_loss - pool.evaluate(singles, budget="epochs")
    assert per_step[0] == pytest.approx(per_step[1]) and per_step[0] > 0
    assert per_epochs == pytest.approx([per_step[0] / 4, 3 * per_step[1] / 4])
    whole = np.ones((1, 2), dtype=bool)
    assert pool.evaluate(whole, budget="epochs") == pytest.approx(pool.evaluate(whole, budget="steps"))


def test_a_groups_interval_counts_the_targets_sampling_noise():
    """Two groups with the same examples' alignments: group 0's gradients lie along a direction on
    which every target example agrees, group 1's along one on which half the target's examples
    gain and half lose. Only the second's effect is uncertain, however many examples it has."""
    rng = np.random.default_rng(0)
    size = rng.normal(-0.5, 0.1, 500)
    x = np.vstack([np.c_[size, np.zeros(500)], np.c_[np.zeros(500), size]])
    group_of = np.repeat([0, 1], 500)
    split = np.r_[np.full(20, 11.0), np.full(20, -9.0)]  # mean 1: the target rows disagree about group 1
    effects = _pool(x, np.ones(1000), group_of, target_x=np.c_[np.ones(40), split], target_tokens=np.ones(40)).group_effects()
    assert np.allclose(effects["per_token"], size.mean())
    consistent, split_target = effects.rows(named=True)
    assert consistent["ci95_target"] == pytest.approx(0.0, abs=1e-12)
    assert split_target["ci95_target"] > 5 * split_target["ci95_examples"]
    assert split_target["ci95"] == pytest.approx(math.hypot(split_target["ci95_examples"], split_target["ci95_target"]))
    assert consistent["ci95"] == pytest.approx(consistent["ci95_examples"])
    harmful = confidently_past(effects.select("group", score="effect", ci95="ci95"), 0.0, "high_end")
    assert harmful == {"g0"}  # g1's harm rests on half the target: not confident


def test_one_streamed_pass_gives_each_rows_alignment_and_each_groups_summed_sketch(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    group_of, target = rng.integers(0, 7, 1000), rng.normal(size=16)
    tokens = rng.integers(1, 30, 1000).astype(float)
    inner, squares, sums, weighted = alignments(np.load(tmp_path / "x.npy", mmap_mode="r"), target, group_of, tokens, 9,
                                                block=128)
    x = x.astype(np.float64)
    assert np.allclose(inner, x @ target) and np.allclose(squares, (x * x).sum(1))
    assert np.allclose(sums, np.stack([x[group_of == g].sum(0) for g in range(9)])) and not sums[7:].any()
    assert np.allclose(weighted, np.stack([(x * tokens[:, None])[group_of == g].sum(0) for g in range(9)]))


def test_subsets_are_seeded_and_sized():
    a, b = sample_subsets(10, 50, 0.3, seed=7), sample_subsets(10, 50, 0.3, seed=7)
    assert np.array_equal(a, b) and (a.sum(1) == 3).all()
    assert not np.array_equal(a, sample_subsets(10, 50, 0.3, seed=8))


def test_estimates_reward_groups_aligned_with_the_target():
    """Group 0's gradients point along the target's, group 1's against it, group 2's sideways."""
    rng = np.random.default_rng(0)
    alignment = np.concatenate([rng.normal(1.0, 0.3, 50), rng.normal(-1.0, 0.3, 50), rng.normal(0.0, 0.3, 50)])
    pool = _pool(alignment[:, None], np.full(150, 5.0), np.repeat(np.arange(3), 50))
    subsets = sample_subsets(3, 200, 0.5, seed=0)
    scores = random_ensemble_scores(subsets, pool.evaluate(subsets, budget="steps"), ["g0", "g1", "g2"])
    assert scores.sort("score", descending=True)["group"].to_list() == ["g0", "g2", "g1"]


def test_sketched_alignments_are_the_gradients_inner_products(demo_build):
    """At each point of the path, a group's summed alignment from the stored sketches matches the
    exact inner product of the target's mean-loss gradient with the group's summed-loss gradient
    (autograd, all sketched weights): the random projection keeps what the estimate needs."""
    from dataselect.examples import token_rows, usable
    from dataselect.sketch import path_sketcher, point_blocks, response_loss, stacked_sources, target_sketches
    from dataselect.tokens import load_tokenizer, pad_batch

    recipe, _, _ = demo_build
    examples = recipe.run.ingested.examples()
    ids, names, x, _ = stacked_sources(recipe, examples, recipe.run.sketches)
    _, target_x, _ = target_sketches(recipe.run.sketches)
    sketcher = path_sketcher(recipe, recipe.run.ingested, recipe.run.meta_init)
    pad = load_tokenizer(recipe, recipe.run.ingested).pad_token_id
    weights = [p.weight for p in sketcher.points]
    by_id = dict(zip(examples["id"], token_rows(examples)))
    groups = sorted(set(names))[:6]
    target_rows = token_rows(usable(examples, "validation"))
    tokens = sum(len(i) - n for i, n in target_rows)
    modules = list(sketcher.modules.values())

    def gradient(rows, scale=1.0):
        total = [torch.zeros_like(m.weight) for m in modules]
        for i in range(0, len(rows), 32):
            b = pad_batch(rows[i : i + 32], pad)
            logits = sketcher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = response_loss(logits, b["input_ids"], b["target_mask"]).sum() * scale
            for t, g in zip(total, torch.autograd.grad(loss, [m.weight for m in modules])):
                t += g
        return torch.cat([t.flatten() for t in total]).double()

    for k, point in enumerate(sketcher.points):
        sketcher.move_to(point)
        target = gradient(target_rows, 1 / tokens)
        sketched_target = point_blocks(target_x, len(weights))[k].astype(np.float64).sum(0) / tokens
        blocks = point_blocks(np.asarray(x), len(weights))[k].astype(np.float64)
        exact, sketched, spread = [], [], []
        for g in groups:
            rows = [i for i, n in enumerate(names) if n == g]
            summed = gradient([by_id[ids[i]] for i in rows])
            exact.append(float(summed @ target))
            sketched.append(float(blocks[rows].sum(0) @ sketched_target) / weights[k])
            spread.append(float(summed.norm() * target.norm()) / math.sqrt(recipe.sketch.dim))
        assert np.corrcoef(exact, sketched)[0, 1] > 0.95, (k, exact, sketched)
        # a random projection to d dimensions keeps an inner product to within about ‖a‖‖b‖/√d:
        # a group nearly orthogonal to the target has a small product but not a small error
        errors = np.abs(np.subtract(sketched, exact)) / np.array(spread)
        assert errors.max() < 4, (k, exact, sketched, errors)


def test_path_weights_share_out_meta_inits_learning_rate():
    from dataselect.meta_init import path_weights
    from dataselect.trainer import lr_factor
    from dataselect.recipe import MetaInit

    spec = MetaInit(lr=1e-3, warmup_ratio=0.1)
    total = spec.lr * sum(lr_factor(spec, 100, s) for s in range(100))
    for path in ([0.0, 0.1, 0.5], [0.0, 0.5, 1.0], [0.5, 0.75, 1.0], [0.0]):
        weights = path_weights(spec, 100, path)
        assert len(weights) == len(path) and sum(weights) == pytest.approx(total)
    early, middle, end = path_weights(spec, 100, [0.0, 0.5, 1.0])
    assert middle > early > end > 0  # θ* is reached as the learning rate decays to 0


def test_keep_rules_give_reasons():
    groups = pl.DataFrame({"group": list("abcd"), "score": [0.3, -0.1, 0.2, None], "examples": [10, 10, 30, 5],
                           "tokens": [100, 900, 200, 50]})
    top = apply_keep_rules(groups, Select(keep_fraction=0.5, min_score=None))
    assert top.filter("selected")["group"].to_list() == ["a", "c"]
    assert "outside the top 50%" in top.filter(pl.col("group") == "b")["reason"][0]
    assert "no score" in top.filter(pl.col("group") == "d")["reason"][0]
    budget = apply_keep_rules(groups, Select(keep_fraction=1.0, min_score=None, max_examples=20))
    assert budget.filter("selected")["group"].to_list() == ["a", "b"]
    threshold = apply_keep_rules(groups, Select(keep_fraction=1.0, min_score=0.0))
    assert threshold.filter("selected")["group"].to_list() == ["a", "c"]
    intervals = groups.with_columns(ci95=pl.Series([0.1, 0.1, 0.25, None]))
    unsure = apply_keep_rules(intervals, Select(keep_fraction=1.0, min_score=0.0, threshold_on="low_end"))
    assert unsure.filter("selected")["group"].to_list() == ["a"]  # c: 0.2 ± 0.25 may be below 0
    assert unsure.filter(pl.col("group") == "c")["reason"][0].startswith(
        "dropped: rank 2/4 by group_effect, score 0.2, 95% interval ±0.25; not confidently above min_score 0.0: "
        "its Holm-adjusted low end ")
    loose = apply_keep_rules(intervals, Select(keep_fraction=1.0, min_score=0.0, threshold_on="estimate"))
    assert loose.filter("selected")["group"].to_list() == ["a", "c"]
    doubt = apply_keep_rules(intervals, Select(keep_fraction=1.0, min_score=0.0, threshold_on="high_end"))
    assert doubt.filter("selected")["group"].to_list() == ["a", "c", "b"]  # b: −0.1 ± 0.1 may be 0
    assert not apply_keep_rules(intervals.with_columns(ci95=pl.Series([0.1, 0.05, 0.25, None])),
                                Select(min_score=0.0, training="steps"))["selected"][2]  # −0.1 ± 0.05: surely below
    tokens = apply_keep_rules(groups, Select(keep_fraction=1.0, min_score=None, max_tokens=350))
    assert tokens.filter("selected")["group"].to_list() == ["a", "c"]
    assert "max_tokens=350" in tokens.filter(pl.col("group") == "b")["reason"][0]


def test_confidence_is_over_all_groups_at_once_by_holms_step_down():
    """One-sided p-values 0.001, 0.011 and 0.3 of being below 0: each of the first two groups'
    own 95% interval lies below 0, and Holm's step-down (0.001 ≤ 0.025/3, 0.011 ≤ 0.025/2) calls
    both confidently harmful; Bonferroni (0.025/3 for all) would spare the second. Among 36 groups,
    one whose own interval just excludes 0 is not called harmful: 1 in 40 neutral groups is."""
    from scipy.stats import norm

    def frame(p_values):
        z = norm.isf(np.asarray(p_values))  # the score's distance below 0, in standard errors
        return pl.DataFrame({"group": [f"g{i}" for i in range(len(z))], "score": -z * 0.1 / 1.96, "ci95": 0.1,
                             "examples": 1, "tokens": 1})

    assert confidently_past(frame([0.001, 0.011, 0.3]), 0.0, "high_end") == {"g0", "g1"}
    assert confidently_past(frame([0.001, 0.013, 0.3]), 0.0, "high_end") == {"g0"}
    many = frame([0.02] + [0.5] * 35)
    assert many["score"][0] + many["ci95"][0] < 0  # its own interval lies below 0 ...
    kept = apply_keep_rules(many, Select(keep_fraction=1.0, min_score=0.0, threshold_on="high_end"))
    assert kept["selected"].all()  # ... but over 36 groups that is not confidence
    assert not apply_keep_rules(frame([1e-5] + [0.5] * 35), Select(min_score=0.0, training="steps"))["selected"][-1]
    helpful = frame([0.02] + [0.5] * 35).with_columns(score=-pl.col("score"))
    assert confidently_past(helpful, 0.0, "low_end") == set()
    assert confidently_past(helpful, 0.0, "high_end") == set()


def _p_frame(p_values: list[float], ci95: float = 0.1) -> pl.DataFrame:
    """Groups g0, g1, ... whose one-sided p-values of being above 0 are `p_values`."""
    from scipy.stats import norm

    z = norm.isf(np.asarray(p_values))  # the score's distance above 0, in standard errors
    return pl.DataFrame({"group": [f"g{i:02d}" for i in range(len(z))], "score": z * ci95 / 1.96, "ci95": ci95,
                         "examples": 10, "tokens": 100})


def test_a_holm_dropped_groups_reason_shows_the_adjusted_bound_that_excludes_its_score():
    """Its own 95% interval lies above 0 (p = 0.01), but among 15 groups Holm compares its p-value
    with 0.025/15: the reason and the row show that level's low end, which is below 0, not the
    group's own ± that a reader would check against 0."""
    from scipy.stats import norm

    groups = _p_frame([0.01] + [0.5] * 14)
    decided = apply_keep_rules(groups, Select(min_score=0.0, training="epochs"))
    row = decided.filter(pl.col("group") == "g00").row(0, named=True)
    assert row["score"] - row["ci95"] > 0 and not row["selected"]  # the interval shown excludes 0 ...
    se = row["ci95"] / 1.96
    assert row["holm_level"] == pytest.approx(0.025 / 15) and row["holm_reached"]
    assert row["adjusted_bound"] == pytest.approx(row["score"] - norm.isf(0.025 / 15) * se)
    assert row["adjusted_bound"] < 0  # ... the one tested does not
    assert row["reason"].startswith(f"dropped: rank 1/15 by group_effect, score {row['score']:.3g}, "
                                    f"95% interval ±{row['ci95']:.2g}; not confidently above min_score 0.0: ")
    assert (f"its Holm-adjusted low end {row['adjusted_bound']:.3g} (step 1 of 15, level 0.025/15) is not above it"
            in row["reason"])
    later = decided.filter(pl.col("group") == "g01").row(0, named=True)  # after the first failure: not tested
    assert not later["holm_reached"] and later["holm_level"] == pytest.approx(0.025 / 14)
    assert "(nor tested: Holm's step-down stopped at step 1)" in later["reason"]


def test_a_group_after_holms_first_failure_says_why_its_own_bound_did_not_count():
    """p-values 0.02 and 0.021 over two groups: the first fails 0.025/2 and the step-down stops, so
    the second is not confident even though its low end at 0.025/1 is above 0: its reason says so."""
    decided = apply_keep_rules(_p_frame([0.02, 0.021]), Select(min_score=0.0, threshold_on="low_end"))
    second = decided.filter(pl.col("group") == "g01").row(0, named=True)
    assert not second["selected"] and not second["holm_reached"] and second["adjusted_bound"] > 0
    assert (f"its Holm-adjusted low end {second['adjusted_bound']:.3g} (step 2 of 2, level 0.025/1) is above it, "
            "but Holm's step-down stopped before it, at step 1 (g00: low end ") in second["reason"]


def test_a_kept_groups_reason_names_its_adjusted_bound_and_its_budget():
    from scipy.stats import norm

    groups = _p_frame([1e-6, 1e-5] + [0.5] * 10)
    decided = apply_keep_rules(groups, Select(min_score=0.0, training="epochs", max_examples=25))
    best = decided.row(0, named=True)
    assert best["selected"] and best["holm_level"] == pytest.approx(0.025 / 12)
    assert best["adjusted_bound"] == pytest.approx(best["score"] - norm.isf(0.025 / 12) * best["ci95"] / 1.96)
    assert best["reason"] == (f"kept: rank 1/12 by group_effect, score {best['score']:.3g}, 95% interval "
                              f"±{best['ci95']:.2g}; confidently above min_score 0.0: its Holm-adjusted low end "
                              f"{best['adjusted_bound']:.3g} (step 1 of 12, level 0.025/12) is above it; "
                              "10 of max_examples=25 with it")
    # the budget decided the second: its reason says it cleared the threshold and what the budget was
    second = decided.row(1, named=True)
    assert second["selected"] and "20 of max_examples=25 with it" in second["reason"]
    cut = apply_keep_rules(groups, Select(min_score=0.0, training="epochs", max_examples=15)).row(1, named=True)
    assert not cut["selected"] and "is above it; but it would exceed max_examples=15 (10 kept before it + its 10)" \
        in cut["reason"]
    # the high_end rule keeps what is not confidently below: its reason gives the high end it tested
    steps = apply_keep_rules(groups, Select(min_score=0.0, training="steps"))
    neutral = steps.filter(pl.col("group") == "g05").row(0, named=True)
    assert neutral["selected"] and neutral["adjusted_bound"] > 0
    assert neutral["reason"].startswith("kept: ") and re.search(
        rf"; not confidently below min_score 0.0: its Holm-adjusted high end {neutral['adjusted_bound']:.3g} "
        rf"\(step \d+ of 12, level 0.025/\d+\) is not below it", neutral["reason"])
    # without intervals, the score itself against min_score
    plain = apply_keep_rules(groups.with_columns(ci95=None), Select(min_score=0.0, training="epochs"))
    assert plain["reason"][0] == (f"kept: rank 1/12 by group_effect, score {plain['score'][0]:.3g}; not below "
                                  "min_score 0.0 (no interval: the score itself compared)")
    assert plain["adjusted_bound"].is_null().all()


def test_the_evidence_says_when_no_group_is_confidently_separated_from_min_score():
    """`training: steps` keeps every group when none is confidently harmful; when none is
    confidently helpful either, that is no selection, and the summary's evidence says so."""
    from dataselect.select import closest_calls, evidence

    rules = Select(min_score=0.0, training="steps")
    neutral = apply_keep_rules(_p_frame([0.02] + [0.5] * 10), rules)
    assert neutral["selected"].all()
    found = evidence(neutral, rules, validation_rows=12)
    assert found["weak"] and (found["confidently_above"], found["confidently_below"]) == (0, 0)
    assert found["note"].startswith("weak evidence: no group is confidently above or below min_score 0.0 (Holm "
                                    "over all 11 groups, on 12 validation rows); the keep rule kept 11 of 11 groups "
                                    "only because none is confidently below it")
    informed = evidence(apply_keep_rules(_p_frame([1e-6] + [0.5] * 10), rules), rules, validation_rows=200)
    assert not informed["weak"] and informed["confidently_above"] == 1 and "note" not in informed
    assert evidence(neutral.with_columns(ci95=None), rules, 12) is None  # no intervals: nothing to say
    rules = Select(min_score=0.0)
    calls = closest_calls(apply_keep_rules(_p_frame([1e-6, 0.004] + [0.5] * 10), rules), rules)
    assert calls["passed"]["group"] == "g00" and calls["failed"]["group"] == "g01"
    assert calls["failed"]["at"] == "0.025/11" and calls["failed"]["tested"] == "Holm-adjusted low end"


def _additive(effects):
    return lambda members: 1.0 + members.astype(float) @ np.asarray(effects)


def test_forward_selection_adds_the_best_group_at_each_step_up_to_its_budget():
    from dataselect.select import forward_selection

    effects = [-0.3, 0.2, -0.1, 0.05, -0.2, 0.0]  # negative lowers the loss
    chosen, scores = forward_selection(_additive(effects), len(effects), base_loss=1.0, n_keep=3)
    assert chosen == [0, 4, 2]
    assert np.allclose(scores[[0, 4, 2]], [0.3, 0.2, 0.1]) and (scores[[1, 3, 5]] <= 0).all()
    chosen, _ = forward_selection(_additive(effects), len(effects), base_loss=1.0, n_keep=5)
    assert chosen == [0, 4, 2, 5, 3]  # past the last helpful group: the least harmful next
    chosen, _ = forward_selection(_additive(effects), len(effects), base_loss=1.0, n_keep=6, min_gain=0.0)
    assert chosen == [0, 4, 2, 5]  # stops once no addition lowers the estimate (5's gain is 0, 3's negative)


def test_forward_selections_reasons_give_each_groups_change_to_the_estimate():
    from dataselect.select import forward_decisions

    scored = pl.DataFrame({"group": ["a", "b", "c"], "score": [0.3, -0.1, 0.02], "ci95": None, "examples": 1,
                           "tokens": 1}, schema_overrides={"ci95": pl.Float64})
    decided = forward_decisions(scored, ["a", "c"], Select(method="forward", keep_fraction=0.5, min_score=None))
    assert decided["group"].to_list() == ["a", "c", "b"] and decided["selected"].to_list() == [True, True, False]
    assert decided["reason"].to_list() == [
        "kept: added at forward step 1 of 2, its addition lowering the estimated loss by 0.3",
        "kept: added at forward step 2 of 2, its addition lowering the estimated loss by 0.02",
        "dropped: forward selection stopped before adding it (it had added the top 50% of groups (2)); at the last "
        "step its addition would have raised the estimated loss by 0.1"]
    assert decided["adjusted_bound"].is_null().all()  # no interval tested: the columns are there, empty


def test_surrogate_recovers_additive_effects_up_to_their_mean():
    from dataselect.select import surrogate_scores

    effects = np.array([-0.3, 0.2, -0.1, 0.05, -0.2, 0.0])
    subsets = sample_subsets(6, 300, 0.5, seed=0)
    scores = surrogate_scores(subsets, _additive(effects)(subsets), list("abcdef"))
    assert np.allclose(scores["score"].to_numpy(), -(effects - effects.mean()), atol=1e-9)
