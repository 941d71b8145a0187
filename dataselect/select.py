"""Stage 5, selection: score every group, then apply the keep-rules.

Every method produces one score per group (positive = estimated to help the target) and the same
keep-rules decide, so the methods can be compared on the same data:

- `group_effect` (the default): each group's own estimate, L⁰ − f̂({g}), the first-order drop in
  the target's loss per step of training on it alone, with a 95% interval over its examples and the target's. It
  is absolute (> 0: estimated to help), so `min_score: 0` keeps, with confidence over all the
  groups at once (Holm), only the groups estimated to help (`threshold_on: low_end`, the default
  for a mixture trained for epochs) or drops only those estimated to hurt (`high_end`, the
  default for a fixed number of steps).
- `random_ensemble` (GradEx-RE): how much lower the estimated target loss is over sampled subsets
  that contain the group than over those that do not, with a 95% confidence interval; the
  paper's T_i (mean estimate over subsets that contain it) is kept as `mean_loss_with`.
- `surrogate`: a linear model f̂(S) ≈ β₀ + Σ_i β_i·[i ∈ S] fitted to the same estimates; score −β_i.
- `forward` (GradEx-FS): true forward stepwise selection on estimates; each step adds the group
  whose addition gives the lowest estimated loss, up to `keep_fraction` of the groups and while
  that addition lowers it by at least `min_score`.
- baselines: `all` (every group), `random` (random scores, so the same keep-rules give the same
  budget), `gradient_similarity` (LESS: cosine of an example's loss gradient to a target
  example's at each point of the path, weighted by the learning rate there, max over target
  examples), `representation_similarity`
  (cosine of the mean-pooled last hidden state to the target's mean), `dsir` (hashed unigram and
  bigram importance weights, DSIR-style).
  Per-example baseline scores are centred on the pool's mean and averaged per group, so for
  these and the ensemble a score of 0 means "as good as the average group".
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import polars as pl
import torch

from .artifacts import Estimates, FineTune, Ingested, Run, Selection, Sketches
from .estimate import load_pool
from .examples import token_rows, usable
from .trainer import load_trained
from .recipe import Recipe, RecipeError, Select
from .selectors import SELECTORS
from .sketch import directions, stacked_sources, target_sketches
from .tokens import load_tokenizer, pad_batch

SCORE_SCHEMA = {"group": pl.String, "score": pl.Float64, "ci95": pl.Float64}


def random_ensemble_scores(subsets: np.ndarray, loss: np.ndarray, groups: list[str]) -> pl.DataFrame:
    rows = []
    for i, group in enumerate(groups):
        inside, outside = loss[subsets[:, i]], loss[~subsets[:, i]]
        if len(inside) < 2 or len(outside) < 2:
            rows.append({"group": group, "score": None, "ci95": None, "mean_loss_with": None,
                         "subsets_with": len(inside)})
            continue
        se = math.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside))
        rows.append({"group": group, "score": float(outside.mean() - inside.mean()), "ci95": 1.96 * se,
                     "mean_loss_with": float(inside.mean()), "subsets_with": len(inside)})
    return pl.DataFrame(rows, schema={**SCORE_SCHEMA, "mean_loss_with": pl.Float64, "subsets_with": pl.Int64})


def surrogate_scores(subsets: np.ndarray, loss: np.ndarray, groups: list[str]) -> pl.DataFrame:
    """Least squares f̂(S) ≈ β₀ + Σ β_i [i ∈ S]; score −(β_i − mean β) with its 95% interval.

    With subsets of one size the intercept and Σβ_i are confounded, so only differences between
    groups are identified: scores are relative to the average group, like the ensemble's.
    """
    design = np.hstack([np.ones((len(loss), 1)), subsets.astype(np.float64)])
    beta, *_ = np.linalg.lstsq(design, loss, rcond=None)
    resid = loss - design @ beta
    dof = max(1, len(loss) - np.linalg.matrix_rank(design))
    cov = (resid @ resid / dof) * np.linalg.pinv(design.T @ design)
    se = np.sqrt(np.clip(np.diag(cov)[1:], 0, None))
    effect = beta[1:] - beta[1:].mean()
    return pl.DataFrame({"group": groups, "score": -effect, "ci95": 1.96 * se}, schema=SCORE_SCHEMA)


def forward_selection(evaluate: Callable[[np.ndarray], np.ndarray], n_groups: int, base_loss: float,
                      n_keep: int, min_gain: float | None = None) -> tuple[list[int], np.ndarray]:
    """Forward stepwise on estimates, up to `n_keep` groups, and only while the best addition
    lowers the estimated loss by at least `min_gain` (when given): (groups in the order added, each
    group's score). Each step adds the group whose addition gives the lowest estimated loss. Since
    f̂(S) is a mean over S, it is lowest for the single best group: with `min_gain: 0` forward
    selection stops there; without it, the set answers "which mixture of this many groups is best".

    A chosen group's score is the drop in estimated loss when it was added; an unchosen one's is
    the drop it would have given at the last step.
    """
    chosen: list[int] = []
    current, scores = base_loss, np.zeros(n_groups)
    while len(chosen) < min(n_keep, n_groups):
        remaining = [i for i in range(n_groups) if i not in chosen]
        candidates = np.zeros((len(remaining), n_groups), dtype=bool)
        candidates[:, chosen] = True
        candidates[np.arange(len(remaining)), remaining] = True
        losses = evaluate(candidates)
        gains = current - losses
        for i, g in zip(remaining, gains):
            scores[i] = g
        best = int(np.argmax(gains))
        if chosen and min_gain is not None and gains[best] < min_gain:
            break
        chosen.append(remaining[best])
        current = float(losses[best])
    return chosen, scores


def gradient_similarity(x: np.ndarray, target: np.ndarray, weights: list[float], group_of: np.ndarray,
                        n_groups: int, seed: int, draws: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Per example: max over target examples of Σ_k w_k cos(g_k, g_target,k), the cosine of the
    two loss gradients at each point of the path weighted by the learning rate there (LESS). Per
    group: the standard error of its centred mean score from the target's side. The target's
    validation rows are a sample too, and a max over them moves when they are redrawn: the
    bootstrap over them, `draws` times, gives it (as the default's interval counts the target).

    Each point's block is scaled to norm 1 and the target's blocks also by their weight, so one
    inner product of the concatenated blocks is the weighted sum of cosines."""
    points = len(weights)
    per_dim = np.repeat(np.asarray(weights, dtype=np.float32), target.shape[1] // points)
    targets = np.asarray(directions(target, points) * per_dim, dtype=np.float32)
    rng = np.random.default_rng(seed)
    redraws = [np.unique(rng.integers(0, len(targets), len(targets))) for _ in range(draws)]
    best = np.empty(len(x), dtype=np.float32)
    redrawn = np.zeros((draws, n_groups))  # per redraw of the target, each group's summed score
    for i in range(0, len(x), 4096):
        sims = np.asarray(directions(x[i : i + 4096], points), dtype=np.float32) @ targets.T
        best[i : i + len(sims)] = sims.max(1)
        groups = group_of[i : i + len(sims)]
        for b, picks in enumerate(redraws):
            redrawn[b] += np.bincount(groups, weights=sims[:, picks].max(1), minlength=n_groups)
    means = redrawn / np.maximum(np.bincount(group_of, minlength=n_groups), 1)
    centred = means - redrawn.sum(1, keepdims=True) / max(len(x), 1)
    return best, centred.std(0, ddof=1)


def dsir_scores(texts: list[str], target_texts: list[str], buckets: int = 10_000) -> np.ndarray:
    """Per example: Σ over its hashed unigrams and bigrams of log p_target − log p_raw, per n-gram."""
    def features(text: str) -> np.ndarray:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        return np.bincount([zlib.crc32(g.encode()) % buckets for g in grams], minlength=buckets)

    raw = np.stack([features(t) for t in texts]).astype(np.float64)
    target = np.stack([features(t) for t in target_texts]).sum(0) + 1.0
    weights = np.log(target / target.sum()) - np.log((raw.sum(0) + 1.0) / (raw.sum() + buckets))
    return (raw @ weights) / raw.sum(1).clip(1)


def representation_similarity(recipe: Recipe, ingested: Ingested, theta: Path, ids: list[str]) -> np.ndarray:
    """Per example: cosine of its mean-pooled last hidden state at θ* to the target's mean."""
    model = load_trained(recipe, ingested, theta)
    pad = load_tokenizer(recipe, ingested).pad_token_id
    examples = ingested.examples()

    def pooled(rows):
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), recipe.sketch.batch_size):
                b = pad_batch(rows[i : i + recipe.sketch.batch_size], pad)
                hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               output_hidden_states=True).hidden_states[-1]
                mask = b["attention_mask"].unsqueeze(-1).float()
                out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
        return np.concatenate(out)

    order = examples.filter(pl.col("id").is_in(ids)).sort(pl.col("id").replace_strict(ids, range(len(ids))))
    reps = pooled(token_rows(order))
    target = pooled(token_rows(usable(examples, "validation"))).mean(0)
    return reps @ target / (np.linalg.norm(reps, axis=1) * np.linalg.norm(target)).clip(1e-30)


HOLM_ALPHA = 0.025  # one-sided, over all the groups at once: the level of one group's own 95% interval


@dataclass(frozen=True)
class HolmTest:
    """One group's place in Holm's step-down over the m groups with an interval: the k-th smallest
    p-value is compared with α/(m − k + 1), and the step-down stops at its first failure, so no
    group after it is called confident. `bound` is the score's one-sided bound at that level
    (score − z·se for the low end, score + z·se for the high end, z the level's normal quantile):
    it is past `min_score` exactly when the p-value clears the level, so a reason can show the
    number the rule compared, which is wider than the group's own 95% interval. For a group after
    the first failure it is the bound at the level it would have needed."""

    group: str
    p_value: float
    step: int  # k: 1 for the smallest p-value
    groups: int  # m
    reached: bool  # the step-down got to this step (False after its first failure)
    passed: bool  # confidently past min_score: reached, and the p-value cleared its level
    bound: float

    @property
    def divisor(self) -> int:
        return self.groups - self.step + 1

    @property
    def level(self) -> float:
        return HOLM_ALPHA / self.divisor

    @property
    def clears(self) -> bool:
        """Whether its p-value clears its own level (for a group the step-down never reached:
        whether it would have)."""
        return self.p_value <= self.level


def holm_step_down(groups: pl.DataFrame, min_score: float, side: str) -> dict[str, HolmTest]:
    """Each group's test of being, with confidence over all the groups at once, below `min_score`
    (side "high_end": even the bound's high end is) or above it ("low_end").

    Each group's own 95% interval is a one-sided test at 2.5%; over dozens of groups some neutral
    group would fail it by chance (36 groups: one or two). Holm's step-down keeps the chance that
    any group is called confidently past `min_score` wrongly at 2.5%: the k-th smallest p-value
    must be ≤ 0.025 / (m − k + 1), for it and every one before it."""
    rows = _with_interval(groups)
    sign = -1.0 if side == "high_end" else 1.0

    def p_value(row: dict) -> float:  # P(a score this far past min_score | the true score is min_score)
        se = row["ci95"] / 1.96
        gap = sign * (row["score"] - min_score)
        return 0.5 * math.erfc(gap / (se * math.sqrt(2))) if se > 0 else float(gap <= 0)

    ordered = sorted(((p_value(r), r["group"], r) for r in rows), key=lambda t: (t[0], t[1]))
    tests, going = {}, True
    for k, (p, group, row) in enumerate(ordered, start=1):
        level = HOLM_ALPHA / (len(ordered) - k + 1)
        z = NormalDist().inv_cdf(1 - level)
        tests[group] = HolmTest(group, p, k, len(ordered), going, going and p <= level,
                                row["score"] - sign * z * row["ci95"] / 1.96)
        going = tests[group].passed
    return tests


def confidently_past(groups: pl.DataFrame, min_score: float, side: str) -> set[str]:
    """The groups whose score is, with confidence over all the groups at once (Holm's step-down,
    `holm_step_down`), below `min_score` (side "high_end") or above it ("low_end")."""
    return {group for group, test in holm_step_down(groups, min_score, side).items() if test.passed}


def _with_interval(groups: pl.DataFrame) -> list[dict]:
    """The groups a simultaneous test covers: those with a score and an interval."""
    return [r for r in groups.iter_rows(named=True) if r["score"] is not None and r.get("ci95") is not None]


# What each group's row says about the test its decision rests on (null where none was made).
TEST_SCHEMA = {"p_value": pl.Float64, "holm_level": pl.Float64, "holm_reached": pl.Boolean,
               "adjusted_bound": pl.Float64}


def with_test_columns(groups: pl.DataFrame) -> pl.DataFrame:
    """`groups` with the columns of `TEST_SCHEMA` (null where missing): every decided frame has them."""
    return groups.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in TEST_SCHEMA.items() if c not in groups.columns])


def holm_clause(test: HolmTest, min_score: float, side: str, stop: HolmTest | None) -> str:
    """The simultaneous test in words, with the numbers it compared: the Holm-adjusted bound (at the
    level the group's p-value was, or would have been, compared with) against `min_score`; `stop`
    is the step-down's first failure."""
    end, past = ("low end", "above") if side == "low_end" else ("high end", "below")
    bound = f"its Holm-adjusted {end} {test.bound:.3g} (step {test.step} of {test.groups}, level {HOLM_ALPHA}/{test.divisor})"
    if test.passed:
        return f"confidently {past} min_score {min_score}: {bound} is {past} it"
    if test.reached or not test.clears or stop is None:
        after = "" if test.reached or stop is None else f" (nor tested: Holm's step-down stopped at step {stop.step})"
        return f"not confidently {past} min_score {min_score}: {bound} is not {past} it{after}"
    return (f"not confidently {past} min_score {min_score}: {bound} is {past} it, but Holm's step-down stopped "
            f"before it, at step {stop.step} ({stop.group}: {end} {stop.bound:.3g} at level "
            f"{HOLM_ALPHA}/{stop.divisor}, not {past} it), and calls no group after its first failure confident")


def _threshold_clause(row: dict, rules: Select, holm: dict[str, HolmTest], stop: HolmTest | None) -> str:
    """Why the group clears `min_score` or not, with the number compared."""
    test = holm.get(row["group"])
    if test is not None:
        return holm_clause(test, rules.min_score, rules.side, stop)
    how = "threshold_on: estimate" if rules.side == "estimate" else "no interval"
    relation = "below" if row["score"] < rules.min_score else "not below"
    return f"{relation} min_score {rules.min_score} ({how}: the score itself compared)"


def apply_keep_rules(groups: pl.DataFrame, rules: Select) -> pl.DataFrame:
    """Mark groups kept, best score first, with the reason for each decision, kept or dropped, and
    the numbers it was made with.

    `groups` has columns group, score, examples, tokens (and ci95). Rules: keep the top
    `keep_fraction` of groups, only those with score ≥ `min_score` (compared as `rules.side`
    says: the estimate, or, where the method gives intervals, confidence over all the groups at
    once that a group is above it (`low_end`) or not below it (`high_end`)), and skip a group
    that would exceed `max_examples` or `max_tokens`.

    Where `min_score` is tested with confidence, each row also carries its Holm test
    (`TEST_SCHEMA`): its `p_value`, `holm_level` (the level the p-value was compared with, or for
    a group after the step-down's first failure, would have been), `holm_reached`, and
    `adjusted_bound`, the one-sided bound at that level (the low end for `low_end`, the high end
    for `high_end`): the number the rule compared with `min_score`.
    """
    ranked = groups.sort(["score", "group"], descending=[True, False], nulls_last=True)
    n_keep = max(1, math.ceil(rules.keep_fraction * ranked.height))
    holm = holm_step_down(ranked, rules.min_score, rules.side) \
        if rules.min_score is not None and rules.side != "estimate" else {}
    stop = min((t for t in holm.values() if t.reached and not t.passed), key=lambda t: t.step, default=None)
    kept, reasons, examples, tokens = [], [], 0, 0
    for rank, row in enumerate(ranked.iter_rows(named=True), start=1):
        where = f"rank {rank}/{ranked.height} by {rules.method}"
        if row["score"] is None:
            kept.append(False)
            reasons.append("dropped: no score: the group was in too few or too many sampled subsets")
            continue
        if rank > n_keep:
            kept.append(False)
            reasons.append(f"dropped: {where}, outside the top {rules.keep_fraction:.0%} of groups ({n_keep})")
            continue
        margin = f", 95% interval ±{row['ci95']:.2g}" if row.get("ci95") is not None else ""
        parts = [f"{where}, score {row['score']:.3g}{margin}"]
        if rules.min_score is not None:
            parts.append(_threshold_clause(row, rules, holm, stop))
        if rules.min_score is not None and _below_threshold(row, rules, holm):
            keep = False
        elif rules.max_examples is not None and examples + row["examples"] > rules.max_examples:
            keep = False
            parts.append(f"but it would exceed max_examples={rules.max_examples} "
                         f"({examples} kept before it + its {row['examples']})")
        elif rules.max_tokens is not None and tokens + row["tokens"] > rules.max_tokens:
            keep = False
            parts.append(f"but it would exceed max_tokens={rules.max_tokens} ({tokens} kept before it + its {row['tokens']})")
        else:
            keep = True
            examples, tokens = examples + row["examples"], tokens + row["tokens"]
            if rules.keep_fraction < 1 or rules.min_score is None:
                parts.append(f"within the top {rules.keep_fraction:.0%} of groups ({n_keep})")
            if rules.max_examples is not None:
                parts.append(f"{examples} of max_examples={rules.max_examples} with it")
            if rules.max_tokens is not None:
                parts.append(f"{tokens} of max_tokens={rules.max_tokens} with it")
        kept.append(keep)
        reasons.append(("kept: " if keep else "dropped: ") + "; ".join(parts))
    tests = [holm.get(g) for g in ranked["group"]]
    columns = {"p_value": [t and t.p_value for t in tests], "holm_level": [t and t.level for t in tests],
               "holm_reached": [t and t.reached for t in tests], "adjusted_bound": [t and t.bound for t in tests]}
    return ranked.with_columns(pl.Series("selected", kept), pl.Series("reason", reasons),
                               pl.Series("rank", range(1, ranked.height + 1)),
                               *(pl.Series(c, v, dtype=TEST_SCHEMA[c]) for c, v in columns.items()))


def stability(scored: pl.DataFrame, rules: Select, kept: set[str], seed: int, draws: int = 200) -> dict | None:
    """How much the kept groups would change if the scores moved within their 95% intervals: the
    keep-rules re-applied to `draws` redraws of every score from N(score, (ci95/1.96)²), and the
    overlap (Jaccard) of each redrawn kept set with this one. The intervals are the scores' noise
    over a group's examples; a group kept in some redraws and not others is a close call. None for
    methods without intervals."""
    if "ci95" not in scored.columns or scored["ci95"].is_null().all():
        return None
    rng = np.random.default_rng([seed, 0x5E1EC7])
    score, ci = scored["score"].to_numpy(), scored["ci95"].fill_null(0.0).to_numpy()
    counts = dict.fromkeys(scored["group"], 0)
    overlaps = []
    for _ in range(draws):
        redrawn = scored.with_columns(score=pl.Series(score + rng.normal(size=len(score)) * ci / 1.96))
        chosen = set(apply_keep_rules(redrawn, rules).filter(pl.col("selected"))["group"])
        overlaps.append(len(chosen & kept) / max(1, len(chosen | kept)))
        for g in chosen:
            counts[g] += 1
    close = {g: c / draws for g, c in counts.items() if 0.05 <= c / draws <= 0.95}
    return {"draws": draws, "mean_overlap": float(np.mean(overlaps)), "min_overlap": float(np.min(overlaps)),
            "close_calls": dict(sorted(close.items(), key=lambda item: abs(item[1] - 0.5))[:20])}


def _below_threshold(row: dict, rules: Select, holm: dict[str, HolmTest]) -> bool:
    """Whether the group fails `min_score`: by its estimate, or where it has an interval, by the
    simultaneous test of `holm_step_down` (low_end: not confidently above; high_end: confidently below)."""
    test = holm.get(row["group"])
    if test is None:
        return row["score"] < rules.min_score
    return not test.passed if rules.side == "low_end" else test.passed


def nothing_kept(decided: pl.DataFrame, rules: Select) -> str:
    """Why an empty mixture is refused, with the best group's case and the ways out: an empty
    dataset handed to a trainer fails later and further from the cause."""
    best = decided.sort("score", descending=True, nulls_last=True).row(0, named=True)
    return (f"select: the keep rules kept none of the {decided.height} groups (method {rules.method}, "
            f"threshold_on {rules.side}, min_score {rules.min_score}); the best, {best['group']}: {best['reason']}. "
            "More validation rows narrow the intervals; `select.training: steps` (or `threshold_on: high_end`) "
            "drops only what confidently hurts; `keep_fraction` with `min_score: null` keeps a top fraction")


Scores = tuple[pl.DataFrame, list[str] | None]  # per-group scores, and the forward set (forward only)


@dataclass(frozen=True)
class Inputs:
    """What selection reads: the examples, θ* (for representations), the sketches and the estimates."""

    ingested: Ingested
    meta: FineTune
    sketches: Sketches
    estimates: Estimates

    @classmethod
    def of(cls, run: Run) -> Inputs:
        """A finished run's, for scoring it again by another method (verify's baselines)."""
        return cls(run.ingested, run.meta_init, run.sketches, run.estimates)


def score_groups(recipe: Recipe, inputs: Inputs) -> Scores:
    """Per-group scores by the recipe's method, and the forward set when the method is `forward`."""
    return SELECTORS[recipe.select.method].score()(recipe, inputs)


def by_random_ensemble(recipe: Recipe, inputs: Inputs) -> Scores:
    groups, subsets, loss = inputs.estimates.read()
    return random_ensemble_scores(subsets, loss, groups), None


def by_surrogate(recipe: Recipe, inputs: Inputs) -> Scores:
    groups, subsets, loss = inputs.estimates.read()
    return surrogate_scores(subsets, loss, groups), None


def by_group_effect(recipe: Recipe, inputs: Inputs) -> Scores:
    """Each group's own effect, computed once by the estimate stage."""
    effects = inputs.estimates.group_gradients().select("group", score="effect", ci95="ci95")
    return effects.cast(SCORE_SCHEMA), None


def by_all(recipe: Recipe, inputs: Inputs) -> Scores:
    groups = inputs.estimates.read()[0]
    return pl.DataFrame({"group": groups, "score": None, "ci95": None}, schema=SCORE_SCHEMA), None


def by_random(recipe: Recipe, inputs: Inputs) -> Scores:
    groups = inputs.estimates.read()[0]
    score = np.random.default_rng(recipe.seed).random(len(groups)) - 0.5
    return pl.DataFrame({"group": groups, "score": score, "ci95": None}, schema=SCORE_SCHEMA), None


def by_forward(recipe: Recipe, inputs: Inputs) -> Scores:
    groups = inputs.estimates.read()[0]
    pool = load_pool(recipe, inputs.ingested, inputs.sketches)
    n_keep = max(1, math.ceil(recipe.select.keep_fraction * len(groups)))
    chosen, scores = forward_selection(lambda m: pool.evaluate(m, budget="steps"), len(groups), pool.base_loss, n_keep,
                                       recipe.select.min_score)
    frame = pl.DataFrame({"group": groups, "score": scores, "ci95": None}, schema=SCORE_SCHEMA)
    return frame, [groups[i] for i in chosen]


def by_gradient_similarity(recipe: Recipe, inputs: Inputs) -> Scores:
    _, _, x, _ = stacked_sources(recipe, inputs.ingested.examples(), inputs.sketches)
    weights = [p["weight"] for p in inputs.sketches.settings()["points"]]
    groups = inputs.estimates.read()[0]
    index = {g: i for i, g in enumerate(groups)}
    group_of = np.array([index[g] for g in inputs.estimates.assignments()["group"]], dtype=np.int64)
    per_example, target_se = gradient_similarity(np.asarray(x), target_sketches(inputs.sketches)[1], weights,
                                                 group_of, len(groups), recipe.seed)
    return _per_group(inputs, per_example, pl.DataFrame({"group": groups, "se_target": target_se}))


def by_dsir(recipe: Recipe, inputs: Inputs) -> Scores:
    examples = inputs.ingested.examples()
    text = examples.select("id", text=pl.col("prompt") + " " + pl.col("response"))
    lookup = dict(zip(text["id"], text["text"]))
    target = usable(examples, "validation")
    ids = inputs.estimates.assignments()["id"].to_list()
    return _per_group(inputs, dsir_scores([lookup[i] for i in ids],
                                          (target["prompt"] + " " + target["response"]).to_list()))


def by_representation_similarity(recipe: Recipe, inputs: Inputs) -> Scores:
    ids = inputs.estimates.assignments()["id"].to_list()
    return _per_group(inputs, representation_similarity(recipe, inputs.ingested, inputs.meta.theta, ids))


def _per_group(inputs: Inputs, per_example: np.ndarray, target_side: pl.DataFrame | None = None) -> Scores:
    """Per-example scores (in the estimate stage's assignment order) centred on the pool's mean, so
    0 is an average example, and averaged per group with a 95% interval over the group's examples
    and, where `target_side` gives each group's `se_target`, over the target's too."""
    per_example = per_example - per_example.mean()
    frame = (inputs.estimates.assignments().with_columns(score=pl.Series(per_example)).group_by("group")
             .agg(pl.col("score").mean(), se=pl.col("score").std() / pl.len().sqrt()))
    if target_side is not None:
        frame = frame.join(target_side, on="group").with_columns(se=(pl.col("se") ** 2 + pl.col("se_target") ** 2).sqrt())
    return frame.with_columns(ci95=1.96 * pl.col("se")).select(list(SCORE_SCHEMA)).cast(SCORE_SCHEMA), None


def forward_decisions(scored: pl.DataFrame, forward_set: list[str], rules: Select) -> pl.DataFrame:
    """Forward selection's groups in the order added, then the rest, each with why: the drop in
    the estimate its addition gave (or, for a group not added, would have given at the last step)."""
    n_keep = max(1, math.ceil(rules.keep_fraction * scored.height))
    floor = "" if rules.min_score is None else f", at least min_score {rules.min_score}"
    order = {g: i for i, g in enumerate(forward_set)}

    def change(gain: float, tense: int) -> str:  # tense 0: "lowering", 1: "lowered"
        verb = ("lowering", "lowered")[tense] if gain >= 0 else ("raising", "raised")[tense]
        return f"{verb} the estimated loss by {abs(gain):.3g}"

    rows = []
    for row in scored.iter_rows(named=True):
        step = order.get(row["group"])
        if step is not None:
            why = (f"kept: added at forward step {step + 1} of {len(forward_set)}, its addition "
                   f"{change(row['score'], 0)}{floor}")
        else:
            stopped = ("it had added the top " f"{rules.keep_fraction:.0%} of groups ({n_keep})"
                       if len(forward_set) >= n_keep else "no addition lowered the estimate by min_score "
                       f"{rules.min_score}")
            why = (f"dropped: forward selection stopped before adding it ({stopped}); at the last step its addition "
                   f"would have {change(row['score'], 1)}")
        rows.append({"group": row["group"], "selected": step is not None, "reason": why,
                     "rank": None if step is None else step + 1})
    decisions = pl.DataFrame(rows, schema={"group": pl.String, "selected": pl.Boolean, "reason": pl.String,
                                           "rank": pl.Int64})
    return with_test_columns(scored.join(decisions, on="group").sort(["rank", "score", "group"],
                                                                      descending=[False, True, False], nulls_last=True))


def _tested(row: dict, rules: Select) -> tuple[bool, float, str] | None:
    """The number a group's threshold test compared with `min_score`, what it was, and whether it
    passed (kept by the threshold); None for a group without a score."""
    if row["score"] is None:
        return None
    if row.get("adjusted_bound") is None:
        return row["score"] >= rules.min_score, row["score"], "score"
    confident = bool(row["holm_reached"]) and row["p_value"] <= row["holm_level"]
    end = "low end" if rules.side == "low_end" else "high end"
    passed = confident if rules.side == "low_end" else not confident
    return passed, row["adjusted_bound"], f"Holm-adjusted {end}"


def closest_calls(decided: pl.DataFrame, rules: Select) -> dict | None:
    """Per side of `min_score`, the group whose tested number (its Holm-adjusted bound, or its score
    where it has no interval) came nearest to it: the decisions most worth a second look. None
    without a threshold."""
    if rules.min_score is None:
        return None
    out: dict[str, dict | None] = {"passed": None, "failed": None}
    for row in decided.iter_rows(named=True):
        tested = _tested(row, rules)
        if tested is None:
            continue
        passed, value, what = tested
        side = "passed" if passed else "failed"
        if out[side] is None or abs(value - rules.min_score) < abs(out[side]["value"] - rules.min_score):
            level = row.get("holm_level")
            out[side] = {"group": row["group"], "score": row["score"], "tested": what, "value": value,
                         "level": level, "at": None if level is None else f"{HOLM_ALPHA}/{round(HOLM_ALPHA / level)}",
                         "selected": row["selected"]}
    return out


def evidence(decided: pl.DataFrame, rules: Select, validation_rows: int) -> dict | None:
    """Whether the scores separate any group from `min_score` with confidence (Holm, either way). When
    none is, whatever the keep rule kept it kept by default (`high_end`: every group, since none is
    confidently harmful), and the summary says so rather than passing a guess off as a selection.
    None for a method without intervals, or without a threshold."""
    if rules.min_score is None or not _with_interval(decided):
        return None
    tested = len(_with_interval(decided))
    above = confidently_past(decided, rules.min_score, "low_end")
    below = confidently_past(decided, rules.min_score, "high_end")
    found = {"groups_tested": tested, "confidently_above": len(above), "confidently_below": len(below),
             "validation_rows": validation_rows, "weak": not above and not below}
    if found["weak"]:
        kept = int(decided["selected"].sum())
        why = {"high_end": "only because none is confidently below it",
               "estimate": "by estimates that all lie within their noise of it"}.get(rules.side, "without evidence")
        found["note"] = (f"weak evidence: no group is confidently above or below min_score {rules.min_score} "
                         f"(Holm over all {tested} groups, on {validation_rows} validation rows); the keep rule kept "
                         f"{kept} of {decided.height} groups {why}. More validation rows narrow the intervals")
    return found


def stage(recipe: Recipe, out: Path, ingested: Ingested, meta: FineTune, sketches: Sketches,
          estimates: Estimates) -> dict:
    """Per-group scores joined with sizes, then the keep decision and its reason."""
    inputs = Inputs(ingested, meta, sketches, estimates)
    assignments = estimates.assignments()
    examples = ingested.examples()
    sizes = (examples.select("id", "source", "n_tokens")
             .join(assignments, on="id", how="inner")
             .group_by("group").agg(pl.col("source").first(), examples=pl.len(), tokens=pl.col("n_tokens").sum()))
    scores, forward_set = score_groups(recipe, inputs)
    scored = scores.join(sizes, on="group", how="left")
    rules = recipe.select
    if rules.method == "all":
        decided = with_test_columns(scored.sort("group").with_columns(
            selected=pl.lit(True), reason=pl.lit("kept: method all: every group"), rank=pl.lit(None, dtype=pl.Int64)))
    elif forward_set is not None:
        decided = forward_decisions(scored, forward_set, rules)
    else:
        decided = apply_keep_rules(scored, rules)
    kept = decided.filter(pl.col("selected"))
    if kept.is_empty():
        raise RecipeError(nothing_kept(decided, rules))
    Selection(out).write(decided)
    steady = None if forward_set is not None else stability(scored, rules, set(kept["group"]), recipe.seed)
    resolved = rules.model_copy(update={"threshold_on": rules.side}).model_dump(mode="json")
    thresholded = rules.method not in ("all", "forward")
    return {"method": rules.method, "rules": resolved, "groups": decided.height,
            "groups_selected": kept.height, "examples_selected": int(kept["examples"].sum()),
            "tokens_selected": int(kept["tokens"].sum()), "stability": steady,
            "closest_calls": closest_calls(decided, rules) if thresholded else None,
            "evidence": evidence(decided, rules, usable(examples, "validation").height) if thresholded else None}
