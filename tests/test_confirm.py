"""The confirm stage: candidates proposed by the scores, fine-tuned within a budget, the best kept."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from dataselect.confirm import Calibration, Candidate, Costs, Predictions, plan, propose, training_rows
from dataselect.artifacts import FineTune
from dataselect.trainer import finetune_folder, finetuned, load_trained

from .conftest import TINY, demo_recipe


def decided(scores: dict[str, tuple[float, float]]) -> pl.DataFrame:
    return pl.DataFrame({"group": list(scores), "score": [s for s, _ in scores.values()],
                         "ci95": [c for _, c in scores.values()], "examples": [10] * len(scores),
                         "tokens": [100] * len(scores)})


GROUPS = decided({"good": (2.0, 0.1), "fine": (1.0, 0.1), "meh": (0.05, 0.2), "bad": (-2.0, 0.1),
                  "z1": (0.5, 0.1), "z2": (0.3, 0.1), "z3": (0.2, 0.1), "z4": (0.1, 0.1)})


def test_the_candidates_are_distinct_mixtures_all_sources_first():
    orders = {"gradient similarity": ["z4", "good", "z3", "z2", "z1", "meh", "fine", "bad"]}
    for training in ("epochs", "steps"):
        found = propose(GROUPS, training, orders)
        assert found[0].name == "all sources" and set(found[0].weights) == set(GROUPS["group"])
        assert len({c.key() for c in found}) == len(found)
        assert all("bad" not in c.weights for c in found[1:])
    epochs = {c.name: c.weights for c in propose(GROUPS, "epochs", orders)}
    assert set(epochs["confidently helpful"]) == {"good", "fine", "z1", "z2", "z3"}  # 0.1 ± 0.1 is not (Holm)
    assert set(epochs["top eighth by group effect"]) == {"good"}
    assert set(epochs["top quarter by group effect"]) == {"good", "fine"}
    assert set(epochs["top quarter by gradient similarity"]) == {"z4", "good"}  # another order's own top
    assert epochs["confidently helpful ×2"]["good"] == 2
    steps = propose(GROUPS, "steps", orders)
    assert steps[1].name == "all but the confidently harmful" and set(steps[1].weights) == set(GROUPS["group"]) - {"bad"}
    weighted = next(c for c in steps if c.name.startswith("helpful ×2"))
    assert weighted.weights["good"] == 2 and weighted.weights["meh"] == 1 and "bad" not in weighted.weights


def test_the_plan_trains_everything_in_full_when_the_budget_allows_it():
    candidates = [Candidate(n, {n: 1}) for n in ("all", "a", "b", "c")]
    cost = {"all": 1.0, "a": 0.2, "b": 0.3, "c": 0.5}
    short, tried = plan(candidates, lambda c: cost[c.name], 2.0, candidates[0])
    assert short is None and [c.name for c in tried] == ["a", "b", "c"]


def test_the_plan_halves_when_the_budget_is_short_and_leaves_room_for_the_costliest_to_finish():
    candidates = [Candidate(n, {n: 1}) for n in ("all", "a", "b", "c", "d", "e", "f")]
    cost = dict(zip("abcdef", (0.1, 0.125, 0.25, 0.2, 0.5, 0.95)))
    short, tried = plan(candidates, lambda c: cost.get(c.name, 1.0), 2.0, candidates[0])
    assert short == 0.5 and len(tried) == 6
    assert short * sum(cost.values()) + (1 - short) * max(cost.values()) <= 2.0


def test_at_a_fixed_number_of_steps_short_rungs_leave_room_for_one_to_finish():
    candidates = [Candidate(n, {n: 1}) for n in ("all", "a", "b", "c", "d", "e")]
    short, tried = plan(candidates, lambda c: 1.0, 2.0, candidates[0])
    assert short == 0.25 and len(tried) == 5  # 5 × 1/4 + 3/4 = 2; 5 × 1/2 + 1/2 is over
    short, tried = plan(candidates[:3], lambda c: 1.0, 2.0, candidates[0])
    assert short is None and [c.name for c in tried] == ["a", "b"]
    assert plan(candidates, lambda c: 1.0, 0.5, candidates[0]) == (None, [])


def test_a_weighted_mixture_is_its_rows_then_the_repeated_groups_rows_again():
    sources = pl.DataFrame({"group": ["a", "b", "a", "c"], "input_ids": [[1], [2], [3], [4]],
                            "n_prompt_tokens": [0, 0, 0, 0]})
    rows = training_rows(sources, {"a": 2, "b": 1})
    assert [ids for ids, _ in rows] == [[1], [2], [3], [1], [3]]
    costs = Costs({"a": 2, "b": 1, "c": 1}, "epochs")
    assert costs.rows_of(Candidate("x", {"a": 2, "b": 1})) == 5 and costs.of(Candidate("x", {"a": 2})) == 1.0
    assert Costs({"a": 2, "b": 1}, "steps").of(Candidate("x", {"a": 1})) == 1.0


def test_a_landmark_is_predicted_from_the_others_only():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = 1.0 + 0.5 * x
    y[4] = 10.0  # far off the line the others draw
    landmarks = {(i,): {"short": float(x[i]), "full": float(y[i])} for i in range(5)}
    predict = Predictions(landmarks, {(i,): 0.0 for i in range(5)})
    left_out = [predict.left_out((i,), float(x[i])) for i in range(5)]
    assert left_out[4][0] == pytest.approx(3.0) and abs(y[4] - left_out[4][0]) > left_out[4][1]  # outside
    assert all(abs(yi - p) <= h for yi, (p, h) in zip(y[:4], left_out[:4]))
    assert predict.of((4,), 4.0)[0] > 3.0  # with the landmark itself in the fit, the line moves towards it
    assert Calibration(x[:2], y[:2]).predict(1.0) == (None, None)  # two points leave no residual


def test_with_two_landmarks_the_missing_prediction_says_why_and_what_to_raise():
    two = Predictions({("a",): {"short": 1.5, "full": 1.0}, ("b",): {"short": 2.5, "full": 2.0}},
                      {("a",): 1.0, ("b",): 2.0})
    assert two.of(("a",), 1.5) == (None, None)
    why = two.why_none("steps")
    assert "only 2 candidates" in why and "select.confirm" in why and "equal steps" in why
    three = Predictions({**two.landmarks, ("c",): {"short": 3.4, "full": 3.1}}, {**two.estimates, ("c",): 3.0})
    assert three.of(("a",), 1.5)[0] is not None and three.why_none("steps") is None


def test_without_a_part_way_loss_the_prediction_falls_back_to_the_estimate():
    landmarks = {("a",): {"full": 1.0}, ("b",): {"full": 2.0}, ("c",): {"full": 3.1}, ("d",): {"full": 4.0}}
    estimates = {("a",): 1.0, ("b",): 2.0, ("c",): 3.0, ("d",): 4.0, ("e",): 5.0}
    predicted, half = Predictions(landmarks, estimates).of(("e",), None)
    assert predicted == pytest.approx(5.0, abs=0.2) and half > 0


@pytest.mark.slow
def test_a_fine_tune_stopped_short_and_continued_ends_where_an_uninterrupted_one_does(tmp_path):
    recipe = demo_recipe(tmp_path, f"model.tiny={json.dumps(TINY)}", "meta_init.epochs=2", "sources.0.max_rows=40")
    from dataselect import run

    run(recipe, until="ingest")
    from dataselect.examples import token_rows, usable
    from dataselect.tokens import load_tokenizer

    rows = token_rows(usable(recipe.run.ingested.examples(), "source", "lexicon"))
    pad = load_tokenizer(recipe, recipe.run.ingested).pad_token_id
    halfway = finetuned(recipe, rows, tmp_path / "a", pad, until=0.5)
    folder = FineTune(finetune_folder(recipe, rows, tmp_path / "a"))
    assert folder.checkpoint.exists() and not folder.theta.exists()
    finetuned(recipe, rows, tmp_path / "a", pad)  # goes on from the checkpoint
    finetuned(recipe, rows, tmp_path / "b", pad)  # never stopped
    continued = load_trained(recipe, recipe.run.ingested, folder.theta)
    straight = load_trained(recipe, recipe.run.ingested, FineTune(finetune_folder(recipe, rows, tmp_path / "b")).theta)
    for (name, a), (_, b) in zip(continued.named_parameters(), straight.named_parameters()):
        assert bool((a == b).all()), name
    assert any(bool((a != b).any()) for a, b in zip(halfway.parameters(), straight.parameters()))


def test_the_demo_build_confirms_its_mixture_within_the_budget(demo_build):
    recipe, summaries, manifest = demo_build
    confirm = summaries["confirm"]
    assert confirm["confirmed"] and 0 < confirm["cost"] <= recipe.select.confirm
    candidates = pl.DataFrame(manifest["candidates"])
    assert candidates["candidate"][0] == "all sources" and candidates["cost"][0] == 0.0
    trained = candidates.filter(pl.col("validation_loss").is_not_null())
    chosen = candidates.filter("chosen").row(0, named=True)
    assert chosen["validation_loss"] == trained["validation_loss"].min() == confirm["validation_loss"]
    assert chosen["candidate"] == confirm["chosen"]
    groups = {g["group"]: g for g in manifest["groups"]}
    weights = dict(w.rsplit("×", 1) for w in chosen["weights"])
    assert {g for g, row in groups.items() if row["selected"]} == set(weights)
    assert sum(row["examples"] * row["repeats"] for row in groups.values()) == manifest["mixture"]["rows"]
    assert sum(row["share"] for row in groups.values()) == pytest.approx(1.0)
    assert not any(g.startswith("wrong_") for g in weights)  # the demo's corrupted groups stay out


def test_without_confirmation_the_mixture_is_the_keep_rules(demo_copy):
    recipe, _, _ = demo_copy
    pure = recipe.model_copy(update={"select": recipe.select.model_copy(update={"confirm": 0.0})})
    from dataselect import run

    summary = run(pure, until="confirm")["confirm"]
    kept = set(pure.run.selection.read().filter(pl.col("selected"))["group"])
    assert not summary["confirmed"] and summary["cost"] == 0.0
    assert pure.run.confirmation.mixture() == dict.fromkeys(sorted(kept), 1)
