"""Stage 6, confirm: a few real fine-tunes, proposed by the estimates, choose the mixture.

The estimates rank groups like real fine-tunes do, but they are linear in the mixture: they
cannot see saturation, repetition or forgetting, which decide how many groups to keep and how
often to repeat them. So the select stage's scores propose a short list of candidate mixtures
(the groups confidently helpful, all but the confidently harmful, helpful groups repeated, all
sources, and the top fractions of three orders of the groups), each with its estimate and interval; the base
model is fine-tuned on each as the user will train it (`select.training`), scored on the target's
validation split, and the lowest wins. The cost is cut the way hyper-parameter search cuts it
(successive halving): when the budget cannot train every candidate in full, all are trained
short first and the better half in full. All sources trained in full is meta-init's own θ*, so
the user's default alternative is always measured, at no cost.

Every candidate is looked at part-way through (the short rung, or half-way when the budget
trains all in full: a scoring, no extra steps), and the candidates trained in full are landmarks
for a calibrated prediction: a line from the part-way loss to the full one (or, for a candidate
never trained, from its estimate), with an interval from the residuals; each landmark is
predicted from the others, so no candidate grades itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .artifacts import Confirmation, Estimates, FineTune, Ingested, Selection, Sketches
from .estimate import GroupSums, group_sums, load_pool, subset_losses
from .examples import token_rows, usable
from .recipe import Recipe, Training
from .tokens import load_tokenizer
from .trainer import Rows, finetune_and_score, load_trained, score, score_trained

log = logging.getLogger(__name__)

FRACTIONS = ((2, "top half"), (4, "top quarter"), (8, "top eighth"))
FORWARD = 4  # forward selection is run to a quarter of the groups, the largest top fraction taken from it
REPEAT = 2  # how often the helpful groups are repeated in the weighted candidate
SHORT = (0.5, 0.25, 0.125)  # the short rung's share of a full fine-tune, the longest that fits the budget
MIDWAY = 0.5  # where every candidate is looked at when the budget trains all in full


@dataclass(frozen=True)
class Candidate:
    """A mixture: how many times each group's rows appear in it (groups not named are left out)."""

    name: str
    weights: dict[str, int]

    def key(self) -> tuple:
        return tuple(sorted(self.weights.items()))

    def membership(self, groups: list[str]) -> np.ndarray:
        return np.array([float(self.weights.get(g, 0)) for g in groups])


def propose(decided: pl.DataFrame, training: Training, orders: dict[str, list[str]] | None = None) -> list[Candidate]:
    """The short list, from the select stage's groups (score, ci95, and the confidence tests the
    keep rules use) and from other orders of the groups (`orders`: forward selection on the
    estimates, gradient similarity), since no one ranking finds the best few groups for every
    target: all sources first, then distinct mixtures in the order they are worth trying for this
    training (a budget that cannot try them all drops them from the end).

    For `epochs` a smaller mixture also trains for fewer steps, so the focused mixtures come first
    (the groups confidently helpful, the top eighth and quarter of each order, the helpful groups
    twice); for `steps` a small mixture is repeated many times, so the broad ones do (all but the
    confidently harmful, the same with the helpful groups repeated, the top halves)."""
    from .select import confidently_past

    ranked = decided.sort(["score", "group"], descending=[True, False], nulls_last=True)
    groups = ranked["group"].to_list()
    has_intervals = "ci95" in ranked.columns and ranked["ci95"].is_not_null().any()
    helpful = [g for g in groups if g in confidently_past(ranked, 0.0, "low_end")] if has_intervals else []
    harmful = confidently_past(ranked, 0.0, "high_end") if has_intervals else set()
    kept = [g for g in groups if g not in harmful]
    orders = rankings(decided, orders or {})
    proposals = {
        "confidently helpful": dict.fromkeys(helpful, 1),
        f"confidently helpful ×{REPEAT}": dict.fromkeys(helpful, REPEAT),
        "all but the confidently harmful": dict.fromkeys(kept, 1),
        f"helpful ×{REPEAT}, the rest once, harmful dropped": {g: REPEAT if g in helpful else 1 for g in kept},
        **fixed_shares(orders, len(groups)),
    }
    tops = [f"top {fraction} by {ranking}" for fraction in ("eighth", "quarter") for ranking in orders]
    order = (["confidently helpful", *tops, "top half by group effect", f"confidently helpful ×{REPEAT}"]
             if training == "epochs" else
             ["all but the confidently harmful", f"helpful ×{REPEAT}, the rest once, harmful dropped",
              *[f"top half by {ranking}" for ranking in orders], *tops[len(orders):], "confidently helpful"])
    everything = Candidate("all sources", dict.fromkeys(groups, 1))
    distinct = {everything.key(): everything}
    for name in order:
        weights = proposals.get(name) or {}
        if weights:
            distinct.setdefault(Candidate(name, weights).key(), Candidate(name, weights))
    return list(distinct.values())


def rankings(decided: pl.DataFrame, others: dict[str, list[str]]) -> dict[str, list[str]]:
    """The orders the top fractions are taken from: the select stage's scores (best first, groups
    without a score left out), then `others`."""
    scored = decided.filter(pl.col("score").is_not_null()).sort(["score", "group"], descending=[True, False])
    return {"group effect": scored["group"].to_list(), **others}


def fixed_shares(orders: dict[str, list[str]], groups: int) -> dict[str, dict[str, int]]:
    """The top eighth, quarter and half of each order of the groups, by name ("top eighth by
    gradient similarity"): the fixed budgets a ranking alone would take."""
    shares = {}
    for ranking, order in orders.items():
        for divisor, name in FRACTIONS:
            size = max(1, math.ceil(groups / divisor))
            if len(order) >= size:
                shares[f"{name} by {ranking}"] = dict.fromkeys(order[:size], 1)
    return shares


@dataclass(frozen=True)
class Costs:
    """What a candidate's full fine-tune costs, as a share of one full fine-tune of the pool
    (meta-init's steps): its rows' share at `epochs`, one at `steps`."""

    rows: dict[str, int]  # per group
    training: Training

    def rows_of(self, c: Candidate) -> int:
        return sum(self.rows[g] * w for g, w in c.weights.items())

    def of(self, c: Candidate) -> float:
        return 1.0 if self.training == "steps" else self.rows_of(c) / sum(self.rows.values())


def plan(candidates: list[Candidate], cost: Callable[[Candidate], float], budget: float,
         free: Candidate) -> tuple[float | None, list[Candidate]]:
    """(the short rung's share of each fine-tune's steps, or None for none; the candidates tried),
    within `budget` full fine-tunes of the pool. `free` (all sources, whose fine-tune is meta-init's
    own) costs nothing. Every candidate in full when that fits; else successive halving: all
    trained for the longest share of their steps that still leaves room for the costliest to go on
    to the end (a finalist continues from where it stopped, so its short rung is not spent twice);
    else the same with the list cut from its end (the candidates last proposed go first)."""
    paid = [c for c in candidates if c is not free]
    while paid:
        total = sum(cost(c) for c in paid)
        if total <= budget:
            return None, paid
        for share in SHORT:
            if share * total + (1 - share) * max(cost(c) for c in paid) <= budget:
                return share, paid
        paid = paid[:-1]
    return None, []


@dataclass
class Calibration:
    """The measured validation loss as a line a + b·x in one feature of the landmarks (their
    part-way loss, or their estimate f̂), with a t prediction interval (90%) from the residuals."""

    x: np.ndarray
    y: np.ndarray

    def predict(self, x: float) -> tuple[float | None, float | None]:
        n = len(self.x)
        if n < 3 or np.ptp(self.x) == 0:
            return None, None
        b, a = np.polyfit(self.x, self.y, 1)
        resid = self.y - (a + b * self.x)
        s = math.sqrt(float(resid @ resid) / (n - 2))
        sxx = float(((self.x - self.x.mean()) ** 2).sum())
        half = _t90(n - 2) * s * math.sqrt(1 + 1 / n + (x - self.x.mean()) ** 2 / sxx)
        return float(a + b * x), half



@dataclass(frozen=True)
class Predictions:
    """A candidate's validation loss in full, predicted from the landmarks (the candidates trained
    in full): from its loss part-way through where it has one (a line fitted to the landmarks'
    part-way and full losses: successive halving's own extrapolation), else from its estimate (a
    line in f̂, which is first order and sees no saturation). A landmark is predicted from the
    others only, so none grades itself."""

    landmarks: dict[tuple, dict]  # key -> {"short": loss part-way (where measured), "full": loss}
    estimates: dict[tuple, float]

    def _line(self, feature: str, leave: tuple | None) -> Calibration:
        keys = [k for k in self.landmarks if k != leave and (feature == "estimate" or "short" in self.landmarks[k])]
        x = [self.estimates[k] if feature == "estimate" else self.landmarks[k]["short"] for k in keys]
        return Calibration(np.array(x, dtype=float), np.array([self.landmarks[k]["full"] for k in keys]))

    def _predict(self, key: tuple, short: float | None, leave: tuple | None) -> tuple[float | None, float | None]:
        if short is not None:
            found = self._line("short", leave).predict(short)
            if found[0] is not None:
                return found
        return self._line("estimate", leave).predict(self.estimates[key])

    def of(self, key: tuple, short: float | None) -> tuple[float | None, float | None]:
        return self._predict(key, short, None)

    def left_out(self, key: tuple, short: float | None) -> tuple[float | None, float | None]:
        return self._predict(key, short, key)

    def why_none(self, training: Training) -> str | None:
        """Why the chosen mixture gets no prediction (a line with an interval needs three
        landmarks), in words a user can act on; None where it gets one."""
        if len(self.landmarks) >= 3:
            return None
        each = "a full fine-tune each at equal steps" if training == "steps" else "their share of the pool's steps"
        return (f"only {len(self.landmarks)} candidates were trained in full (all sources included), and a line with "
                f"an interval needs 3: raise select.confirm (they cost {each})")


def midway_loss(recipe: Recipe, ingested: Ingested, meta: FineTune, rung: float) -> float | None:
    """All sources' validation loss `rung` of the way through meta-init, where meta-init kept a
    snapshot there (its gradient path's points), else None."""
    snapshot = meta.snapshot(rung, meta.summary()["steps"])
    if snapshot == meta.theta or not snapshot.exists():
        return None
    tokenizer = load_tokenizer(recipe, ingested)
    return score(recipe, load_trained(recipe, ingested, snapshot), tokenizer, ("validation",))["validation"]["loss"]


def _t90(dof: int) -> float:
    """The two-sided 90% quantile of Student's t."""
    from scipy.stats import t

    return float(t.ppf(0.95, dof))


def candidate_estimates(candidates: list[Candidate], groups: list[str], sums: GroupSums, effects: pl.DataFrame,
                        base_loss: float, training: Training) -> list[tuple[float, float]]:
    """Each candidate's f̂ as it will be trained, and the half-width of its 95% interval: the
    groups' per-token noise over their rows added (independent), and over the target's rows added
    in step (the same rows for every group: the conservative sum), times the step scale and length."""
    membership = np.stack([c.membership(groups) for c in candidates])
    estimate = subset_losses(membership, sums, base_loss, training)
    frame = effects.select("group", "tokens", "scale", "ci95_examples", "ci95_target")
    order = {g: i for i, g in enumerate(frame["group"])}
    rows = [order[g] for g in groups]
    tokens = frame["tokens"].to_numpy()[rows]
    scale = np.maximum(frame["scale"].to_numpy()[rows], 1e-300)
    per_token_ex = frame["ci95_examples"].to_numpy()[rows] / scale  # 95% of the group's per-token alignment
    per_token_t = frame["ci95_target"].to_numpy()[rows] / scale
    length = sums.training_lengths(membership, training) * sums.step_scales(membership)
    weighted_tokens = np.maximum(membership @ tokens, 1.0)
    examples = np.sqrt((membership * tokens * per_token_ex) ** 2 @ np.ones(len(groups))) / weighted_tokens
    target = (membership * tokens * per_token_t) @ np.ones(len(groups)) / weighted_tokens
    return [(float(e), float(h)) for e, h in zip(estimate, length * np.hypot(examples, target))]


def other_orders(recipe: Recipe, ingested: Ingested, meta: FineTune, sketches: Sketches,
                 estimates: Estimates) -> dict[str, list[str]]:
    """Two more orders of the groups to take top fractions from: forward selection on the
    estimates (which group, added to those before it, lowers f̂ most: it sees what the groups
    share, where each group's own effect does not), and gradient similarity (LESS's), whose few
    best groups are sometimes better than the estimates'."""
    from .select import Inputs, forward_selection, score_groups

    pool = load_pool(recipe, ingested, sketches)
    chosen, _ = forward_selection(lambda m: pool.evaluate(m, budget="steps"), len(pool.groups), pool.base_loss,
                                  math.ceil(len(pool.groups) / FORWARD))
    similar = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": "gradient_similarity"})})
    scores, _ = score_groups(similar, Inputs(ingested, meta, sketches, estimates))
    ranked = scores.sort(["score", "group"], descending=[True, False], nulls_last=True)["group"].to_list()
    return {"forward selection": [pool.groups[i] for i in chosen], "gradient similarity": ranked}


def stage(recipe: Recipe, out: Path, ingested: Ingested, meta: FineTune, sketches: Sketches, estimates: Estimates,
          selection: Selection) -> dict:
    """Propose, fine-tune within the budget, choose; write every candidate's account and the
    chosen mixture's repeats per group."""
    spec, training = recipe.select, recipe.select.training
    decided = selection.read()
    by_rule = Candidate("the keep rule's groups", dict.fromkeys(sorted(decided.filter(pl.col("selected"))["group"]), 1))
    folder = Confirmation(out)
    budget = spec.confirm_budget(meta.summary()["steps"])
    candidates = (propose(decided, training, other_orders(recipe, ingested, meta, sketches, estimates))
                  if spec.method == "group_effect" and budget > 0 else [])
    if budget <= 0 or len(candidates) < 2:
        why = ("select.confirm is 0" if budget <= 0 else f"method {spec.method} proposes no candidates"
               if spec.method != "group_effect" else "the candidates are all one mixture")
        folder.write(_account([_row(by_rule, f"chosen: not confirmed ({why})")]), by_rule.weights)
        return {"confirmed": False, "chosen": by_rule.name, "why": why, "candidates": 1, "cost": 0.0}
    if by_rule.key() not in {c.key() for c in candidates}:  # a keep rule set in the recipe
        candidates.insert(1, by_rule)
    groups = estimates.read()[0]
    estimated = dict(zip((c.key() for c in candidates), candidate_estimates(
        candidates, groups, group_sums(recipe, estimates), estimates.group_gradients(),
        estimates.summary()["base_loss"], training)))
    sources = usable(ingested.examples(), "source").drop("group").join(estimates.assignments(), on="id")
    costs = Costs(dict(sources.group_by("group").len().iter_rows()), training)
    free = candidates[0]
    short, tried = plan(candidates, costs.of, budget, free)
    trial = Trial(recipe, sources, costs)
    measured: dict[tuple, dict] = {free.key(): {"full": score_trained(recipe, ingested, meta)["validation"]["loss"]}}
    spent: dict[tuple, float] = {free.key(): 0.0}
    rung = short if short is not None else MIDWAY
    free_short = midway_loss(recipe, ingested, meta, rung)
    if free_short is not None:
        measured[free.key()]["short"] = free_short
    for c in tried:  # every candidate is looked at part-way: it costs a scoring, and calibrates the prediction
        measured[c.key()] = {"short": trial.loss(c, rung)}
        spent[c.key()] = rung * costs.of(c)
    ahead, finalists = tried, len(tried)
    if short is not None:
        left, ahead = budget - sum(spent.values()), []
        for c in sorted(tried, key=lambda c: measured[c.key()]["short"]):  # the better half, as far as the budget goes
            if len(ahead) < math.ceil(len(tried) / 2) and (1 - short) * costs.of(c) <= left + 1e-9:
                ahead.append(c)
                left -= (1 - short) * costs.of(c)
        finalists = len(ahead)
    for c in ahead:  # a finalist goes on from where its short rung stopped
        measured.setdefault(c.key(), {})["full"] = trial.loss(c, 1.0)
        spent[c.key()] = costs.of(c)
    final = [c for c in candidates if "full" in measured.get(c.key(), {})]
    chosen = min(final, key=lambda c: (measured[c.key()]["full"], c is not free))
    predict = Predictions({c.key(): measured[c.key()] for c in final},
                          {c.key(): estimated[c.key()][0] for c in candidates})
    rows = []
    for c in candidates:
        m = measured.get(c.key(), {})
        why = ("chosen: the lowest validation loss of the candidates trained in full" if c is chosen else
               "trained in full: a higher validation loss" if "full" in m else
               f"trained short ({short:.0%} of its steps): not among the best {finalists}" if "short" in m else
               "not trained: over the budget")
        predicted = predict.left_out(c.key(), m.get("short")) if c in final else predict.of(c.key(), m.get("short"))
        rows.append(_row(c, why, costs, estimated[c.key()], m, predicted, spent.get(c.key())))
    prediction = predict.of(chosen.key(), measured[chosen.key()].get("short"))
    folder.write(_account(rows), chosen.weights)
    log.info("confirm: chose '%s' (validation loss %.4f; all sources %.4f) for %.2f full fine-tunes",
             chosen.name, measured[chosen.key()]["full"], measured[free.key()]["full"], sum(spent.values()))
    return {"confirmed": True, "chosen": chosen.name, "candidates": len(candidates), "training": training,
            "budget": budget, "cost": round(sum(spent.values()), 3), "short_rung": short, "finalists": finalists,
            "validation_loss": measured[chosen.key()]["full"],
            "all_sources_validation_loss": measured[free.key()]["full"],
            "predicted_validation_loss": prediction[0], "predicted_interval90": prediction[1],
            "no_prediction": predict.why_none(training) if prediction[0] is None else None}


def training_rows(sources: pl.DataFrame, weights: dict[str, int]) -> Rows:
    """A mixture's rows as its fine-tune trains on them, and as export writes them: every row of
    the kept groups in the sources' order, then the rows of the groups repeated twice or more
    again, and so on."""
    repeats = sources["group"].replace_strict(weights, default=0, return_dtype=pl.Int64)
    most = max(weights.values(), default=0)
    return [row for k in range(1, most + 1) for row in token_rows(sources.filter(repeats >= k))]


@dataclass(frozen=True)
class Trial:
    """A candidate fine-tuned from the base as the mixture will be trained (`share` of its steps:
    a short rung of successive halving, or 1), and its validation loss. Fine-tunes are the run's,
    shared with verify and reused on a rerun."""

    recipe: Recipe
    sources: pl.DataFrame
    costs: Costs

    def loss(self, c: Candidate, share: float) -> float:
        rows = training_rows(self.sources, c.weights)
        spec = self.recipe.meta_init
        pool = sum(self.costs.rows.values())
        epochs = spec.epochs * (pool / len(rows) if self.costs.training == "steps" else 1.0)
        trained = self.recipe.model_copy(update={"meta_init": spec.model_copy(update={"epochs": epochs})})
        return finetune_and_score(trained, rows, self.recipe.run.finetunes, exact_on=(), until=share)["validation"][
            "loss"]


def _row(c: Candidate, why: str, costs: Costs | None = None, estimate: tuple[float, float] | None = None,
         measured: dict | None = None, predicted: tuple | None = None, spent: float | None = None) -> dict:
    measured, predicted = measured or {}, predicted or (None, None)
    return {"candidate": c.name, "groups": len(c.weights), "repeated": sum(w > 1 for w in c.weights.values()),
            "rows": costs.rows_of(c) if costs else None, "cost": spent,
            "estimate": estimate[0] if estimate else None, "estimate_ci95": estimate[1] if estimate else None,
            "short_loss": measured.get("short"), "validation_loss": measured.get("full"),
            "predicted": predicted[0], "predicted_interval90": predicted[1], "decision": why,
            "chosen": why.startswith("chosen"), "weights": [f"{g}×{w}" for g, w in sorted(c.weights.items())]}


def _account(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"candidate": pl.String, "groups": pl.Int64, "repeated": pl.Int64,
                                      "rows": pl.Int64, "cost": pl.Float64, "estimate": pl.Float64,
                                      "estimate_ci95": pl.Float64, "short_loss": pl.Float64,
                                      "validation_loss": pl.Float64, "predicted": pl.Float64,
                                      "predicted_interval90": pl.Float64, "decision": pl.String,
                                      "chosen": pl.Boolean, "weights": pl.List(pl.String)})
