"""Which first-order estimate tracks real fine-tunes? Variants, scored on verified runs.

    python benchmarks/ablate_estimator.py [--setting t0|demo|gsm8k] [--targets samsum,...]
                                          [--regime pretrained|scratch]

Reads the runs `bench_fidelity.py` finished (same arguments): their verified subsets and true
target losses (real fine-tunes from the base model; validation split only). Computes what each
variant needs once, into each run's `ablation/` folder (meta-init is run again, to the same θ*,
keeping snapshots along its path), and prints per variant and target the Spearman correlation of
the estimate with the true loss over the verified subsets, and the rank the random ensemble
gives the target's own dataset (t0 in-pool). Nothing here reads a test split.

Two families:
- `logistic`: the paper's form, linearised at one point. A logistic fit
  ŵ_S = argmin_w mean_{j∈S} ℓ(F⁰_j + ĝ_j·w) + λ‖w‖² on sketches of F (the mean log-odds of the
  response tokens) or of the mean cross-entropy, then the target's loss to first order along ŵ.
  Axes: the point (θ* or the base model), the offsets F⁰ (at θ*, at the base, cross-fitted — each
  row's F⁰ from a meta-init on the other half of the pool —, or zero), per-example sketches raw or
  scaled to norm 1, examples counted once or by response tokens, λ.
- `path`: what dataselect does — ⟨∇L_target, ∇L_S⟩ at snapshots of meta-init's path, summed with
  weights (the learning rate spent near each, "lr mass"; or 1/spread, every point alike), S's
  gradient the token-weighted mean of its examples' cross-entropy (or mean log-odds) gradients.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as nnf
from settings import CACHE, REGIMES, REGIME_HELP, T0_IN_POOL, T0_TRANSFER, regime_of, setting

from dataselect.artifacts import FineTune

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


# --- the paper's pieces, kept here to compare with ---------------------------------------------

def mean_log_odds(logits, input_ids, target_mask):
    """F per example: the mean over response tokens of logit(p) = log p − log(1 − p), stable."""
    from dataselect.tokens import response_logprobs

    gold = response_logprobs(logits, input_ids, target_mask).clamp(max=-1e-6)
    odds = torch.where(target_mask, gold - torch.log(-torch.expm1(gold)), torch.zeros_like(gold))
    return odds.sum(-1) / target_mask.sum(-1).clamp(min=1)


def mean_loss(logits, input_ids, target_mask):
    from dataselect.sketch import response_loss

    return response_loss(logits, input_ids, target_mask) / target_mask.sum(-1).clamp(min=1)


def logistic_steps(x: torch.Tensor, f0: torch.Tensor, weights: torch.Tensor, lam: float,
                   iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """ŵ for each row of `weights` (subsets × examples, rows summing to 1): Newton-like steps
    preconditioned by the pool's Hessian at w = 0, a step that raises a subset's objective halved."""
    curvature = torch.sigmoid(f0) * torch.sigmoid(-f0) / len(f0)
    chol = torch.linalg.cholesky((x.T * curvature) @ x + 2 * lam * torch.eye(x.shape[1]))

    def objective(w):
        margins = f0 + w @ x.T
        return ((weights * nnf.softplus(-margins)).sum(1) + lam * (w * w).sum(1),
                -(weights * torch.sigmoid(-margins)) @ x + 2 * lam * w)

    w = torch.zeros(weights.shape[0], x.shape[1])
    step = torch.ones(weights.shape[0], 1)
    loss, grad = objective(w)
    g0 = grad.norm(dim=1).clamp(min=1e-30)
    for _ in range(iters):
        if bool((grad.norm(dim=1) <= tol * g0).all()):
            break
        proposal = w - step * torch.cholesky_solve(grad.T, chol).T
        new_loss, new_grad = objective(proposal)
        better = (new_loss <= loss + 1e-5 * loss.abs()).unsqueeze(1)
        w, grad = torch.where(better, proposal, w), torch.where(better, new_grad, grad)
        loss, step = torch.where(better.squeeze(1), new_loss, loss), torch.where(better, step, step / 2)
    return w


# --- views: every array a variant reads, computed once per run ----------------------------------

def sketch_rows(recipe, model, rows, function) -> tuple[np.ndarray, np.ndarray]:
    """(sketches, values) of `rows` in their order, one projection to `sketch.dim` (the run's seed)."""
    from dataselect.projection import KroneckerProjector
    from dataselect.sketch import Sketcher, length_order, sketched_modules
    from dataselect.tokens import load_tokenizer, pad_batch

    modules = sketched_modules(model, recipe.sketch.modules)
    projector = KroneckerProjector({n: tuple(m.weight.shape) for n, m in modules.items()}, recipe.sketch.dim,
                                   recipe.seed)
    sketcher, pad = Sketcher(model, modules, projector, function), load_tokenizer(recipe, recipe.run.ingested).pad_token_id
    order = length_order(rows)
    x, v = np.zeros((len(rows), recipe.sketch.dim), np.float32), np.zeros(len(rows), np.float32)
    for start in range(0, len(order), recipe.sketch.batch_size):
        idx = order[start : start + recipe.sketch.batch_size]
        s, values = sketcher(pad_batch([rows[i] for i in idx], pad))
        x[idx], v[idx] = s.numpy(), values.detach().numpy()
    return x, v


class Views:
    def __init__(self, recipe):
        from dataselect.examples import token_rows, usable
        from dataselect.meta_init import meta_train_rows

        self.recipe, self.folder = recipe, recipe.run.stage_dir("ablation")
        self.folder.mkdir(exist_ok=True)
        examples = recipe.run.ingested.examples()
        assigned = recipe.run.estimates.assignments()
        self.groups = recipe.run.estimates.read()[0]
        index = {g: i for i, g in enumerate(self.groups)}
        self.group_of = np.array([index[g] for g in assigned["group"]])
        sources = pl.concat([usable(examples, "source", s.name) for s in recipe.sources])
        lookup = dict(zip(sources["id"], token_rows(sources)))
        self.rows = [lookup[i] for i in assigned["id"]]
        self.target_rows = token_rows(usable(examples, "validation"))
        self.tokens = np.array([len(ids) - n for ids, n in self.rows], dtype=np.float64)
        self.target_tokens = np.array([len(ids) - n for ids, n in self.target_rows], dtype=np.float64)
        self.train_rows = meta_train_rows(recipe, {s.name: token_rows(usable(examples, "source", s.name))
                                                   for s in recipe.sources})

    def cached(self, name: str, compute) -> tuple[np.ndarray, np.ndarray]:
        xs, vs = self.folder / f"{name}.x.npy", self.folder / f"{name}.v.npy"
        if not xs.exists():
            x, v = compute()
            np.save(vs, v, allow_pickle=False)
            np.save(xs, x, allow_pickle=False)
        return np.load(xs).astype(np.float64), np.load(vs).astype(np.float64)

    def path(self) -> tuple[Path, int]:
        """Meta-init again with snapshots at FRACTIONS (same recipe and seed: the same path)."""
        from dataselect.meta_init import meta_init, training_steps
        from dataselect.tokens import load_tokenizer

        folder = self.folder / "path"
        steps = training_steps(self.recipe.meta_init, len(self.train_rows))
        if not all(FineTune(folder).snapshot(f, steps).exists() for f in FRACTIONS):
            folder.mkdir(exist_ok=True)
            meta_init(self.recipe, self.recipe.run.ingested, self.train_rows, folder,
                      load_tokenizer(self.recipe, self.recipe.run.ingested).pad_token_id, FRACTIONS)
        return folder, steps

    def model(self, fraction: float):
        from dataselect.meta_init import load_theta_star

        folder, steps = self.path()
        return load_theta_star(self.recipe, self.recipe.run.ingested, FineTune(folder).snapshot(fraction, steps))

    def sources(self, function: str, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        fn = {"logodds": mean_log_odds, "ce": mean_loss}[function]
        return self.cached(f"{function}-{fraction:g}", lambda: sketch_rows(self.recipe, self.model(fraction),
                                                                            self.rows, fn))

    def target(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Per validation example: its summed response cross-entropy's gradient sketch, and that sum."""
        from dataselect.sketch import response_loss

        return self.cached(f"target-{fraction:g}", lambda: sketch_rows(self.recipe, self.model(fraction),
                                                                        self.target_rows, response_loss))

    def crossfit_offsets(self) -> np.ndarray:
        """F at the meta-init of the half of the pool that did not hold the row."""
        from dataselect.meta_init import load_theta_star, meta_init
        from dataselect.tokens import load_tokenizer

        def compute():
            fold = np.random.default_rng(self.recipe.seed).integers(0, 2, len(self.rows))
            values = np.zeros(len(self.rows))
            for k in (0, 1):
                folder = self.folder / f"crossfit-{k}"
                folder.mkdir(exist_ok=True)
                if not FineTune(folder).theta.exists():
                    meta_init(self.recipe, self.recipe.run.ingested, [r for r, f in zip(self.rows, fold) if f != k],
                              folder, load_tokenizer(self.recipe, self.recipe.run.ingested).pad_token_id)
                model = load_theta_star(self.recipe, self.recipe.run.ingested, FineTune(folder).theta)
                values[fold == k] = sketch_rows(self.recipe, model, [r for r, f in zip(self.rows, fold) if f == k],
                                                mean_log_odds)[1]
            return np.zeros((1, 1)), values

        return self.cached("crossfit", compute)[1]

    def lr_mass(self, use: tuple[float, ...]) -> list[float]:
        """Per snapshot in `use`: meta-init's learning rate summed over the steps nearest to it."""
        from dataselect.meta_init import lr_factor

        _, steps = self.path()
        at = [round(f * steps) for f in use]
        edges = [0] + [(a + b) // 2 for a, b in zip(at, at[1:])] + [steps]
        spec = self.recipe.meta_init
        return [spec.lr * sum(lr_factor(spec, steps, s) for s in range(lo, hi)) for lo, hi in zip(edges, edges[1:])]


# --- variants -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Logistic:
    grad: str = "logodds"  # what a source sketch differentiates: logodds (F) or ce (mean cross-entropy)
    point: float = 1.0  # 1: θ*, 0: the base model
    offsets: str = "star"  # star, base, crossfit, zero
    norm: str = "raw"
    weight: str = "example"
    l2: float = 0.5

    def label(self) -> str:
        where = {1.0: "θ*", 0.0: "base"}[self.point]
        return (f"logistic: {self.grad} at {where}, F⁰ {self.offsets}, {self.norm}, by {self.weight}, "
                f"λ {self.l2:g}")

    def estimate(self, views: Views, memberships: np.ndarray) -> np.ndarray:
        x, _ = views.sources(self.grad, self.point)
        if self.grad == "ce":
            x = -x  # descent on the loss is ascent on the log-probability
        if self.norm == "unit":
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-30)
        f0 = {"zero": lambda: np.zeros(len(x)), "crossfit": views.crossfit_offsets,
              "star": lambda: views.sources("logodds", 1.0)[1],
              "base": lambda: views.sources("logodds", 0.0)[1]}[self.offsets]()
        t, _ = views.target(self.point)
        target = torch.from_numpy(t.sum(0) / views.target_tokens.sum()).float()
        xt, ft = torch.from_numpy(x).float(), torch.from_numpy(f0).float()
        lam = self.l2 * float((xt**2).sum(1).mean())
        weight = torch.from_numpy(views.tokens if self.weight == "token" else np.ones(len(x))).float()
        out = []
        for start in range(0, len(memberships), 256):
            member = torch.from_numpy(memberships[start : start + 256][:, views.group_of]).float() * weight
            out.append((logistic_steps(xt, ft, member / member.sum(1, keepdim=True), lam) @ target).numpy())
        return np.concatenate(out)


@dataclass(frozen=True)
class PathSum:
    use: tuple[float, ...] = (0.0, 0.5, 1.0)
    weighting: str = "mass"  # mass (lr summed near each point), scaled (each point alike), realized
    grad: str = "ce"
    weight: str = "token"

    def label(self) -> str:
        return f"path: {self.grad} at {','.join(f'{u:g}' for u in self.use)}, {self.weighting}, by {self.weight}"

    def estimate(self, views: Views, memberships: np.ndarray) -> np.ndarray:
        if self.weighting == "realized":
            return self.realized(views, memberships)
        total, n = np.zeros(len(memberships)), len(views.groups)
        masses = views.lr_mass(self.use)
        for fraction, mass in zip(self.use, masses):
            x, _ = views.sources(self.grad, fraction)
            t, _ = views.target(fraction)
            # per example: ⟨ascent direction of its mean log-probability, descent of the target loss⟩
            per_example = (x @ (t.sum(0) / views.target_tokens.sum())) * (1 if self.grad == "ce" else -1)
            weight = views.tokens if self.weight == "token" else np.ones(len(x))
            per_group = np.bincount(views.group_of, weights=per_example * weight, minlength=n)
            denominator = memberships @ np.bincount(views.group_of, weights=weight, minlength=n)
            term = (memberships @ per_group) / denominator
            total -= term * (mass if self.weighting == "mass" else 1 / per_example.std())
        return total

    def realized(self, views: Views, memberships: np.ndarray) -> np.ndarray:
        """Meta-init moved the target's loss by ΔL between consecutive points; S's share of each
        stretch is ΔL times S's per-token alignment with the target's gradient over the pool's
        (the mean at the stretch's two ends), so S = all sources gives θ*'s loss exactly."""
        n = len(views.groups)
        weight = views.tokens if self.weight == "token" else np.ones(len(views.tokens))
        ratios, losses = [], []
        for fraction in self.use:
            x, _ = views.sources(self.grad, fraction)
            t, values = views.target(fraction)
            per_example = (x @ (t.sum(0) / views.target_tokens.sum())) * (1 if self.grad == "ce" else -1) * weight
            per_group = np.bincount(views.group_of, weights=per_example, minlength=n)
            group_weight = np.bincount(views.group_of, weights=weight, minlength=n)
            pool = per_group.sum() / group_weight.sum()
            ratios.append((memberships @ per_group) / (memberships @ group_weight) / pool)
            losses.append(values.sum() / views.target_tokens.sum())
        estimate = np.full(len(memberships), losses[0])
        for k in range(len(self.use) - 1):
            estimate += (losses[k + 1] - losses[k]) * (ratios[k] + ratios[k + 1]) / 2
        return estimate


VARIANTS = [
    Logistic(),  # the paper's form: dataselect's default before the path estimate
    Logistic(offsets="zero"), Logistic(offsets="base"), Logistic(offsets="crossfit"),
    Logistic(norm="unit"), Logistic(offsets="zero", norm="unit"), Logistic(weight="token"),
    Logistic(l2=0.005), Logistic(offsets="zero", l2=0.005),
    Logistic(grad="ce", offsets="zero"), Logistic(grad="ce", offsets="zero", weight="token"),
    Logistic(point=0.0, offsets="base"), Logistic(grad="ce", point=0.0, offsets="zero", weight="token"),
    PathSum(), PathSum(use=FRACTIONS), PathSum(use=(0.0, 0.25, 0.5, 0.75, 1.0)), PathSum(use=(0.0,)),
    PathSum(use=(1.0,)), PathSum(weighting="scaled"), PathSum(use=FRACTIONS, weighting="scaled"),
    PathSum(weight="example"), PathSum(grad="logodds"), PathSum(use=(0.5, 1.0)), PathSum(use=(0.5, 0.75, 1.0)),
    PathSum(weighting="realized"), PathSum(use=FRACTIONS, weighting="realized"),
    PathSum(use=(0.0, 0.25, 0.5, 0.75, 1.0), weighting="realized"), PathSum(use=(0.0, 1.0), weighting="realized"),
    PathSum(use=(0.0, 0.1, 0.25, 0.5)), PathSum(use=(0.0, 0.25, 0.5)), PathSum(use=(0.0, 0.1, 0.5, 1.0)),
    PathSum(use=(0.0, 0.25, 0.5, 1.0)), PathSum(use=(0.1, 0.25, 0.5, 0.75, 1.0)), PathSum(use=(0.0, 0.1, 0.25)),
    PathSum(use=(0.0, 0.1, 0.5)), PathSum(use=(0.0, 0.1, 0.5, 0.75)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["t0", "demo", "gsm8k"], default="t0")
    parser.add_argument("--targets", default=",".join(T0_IN_POOL + T0_TRANSFER))
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--variants", default="", help="indices into VARIANTS (default: all)")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from dataselect.select import random_ensemble_scores
    from dataselect.verify import spearman

    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    targets = args.targets.split(",") if args.setting == "t0" else [None]
    cells: dict[str, dict[str, str]] = {v.label(): {} for v in chosen}
    rhos: dict[str, list[float]] = {v.label(): [] for v in chosen}
    print(f"command: python benchmarks/ablate_estimator.py {' '.join(sys.argv[1:])}", flush=True)
    for target in targets:
        s = setting(args.setting, target=target, regime=args.regime, cache=args.cache)
        recipe = s.load(args.cache / "runs" / f"{s.name}-seed{args.seed}", f"seed={args.seed}")
        verified = recipe.run.verification
        memberships = verified.memberships()
        if memberships is None:
            sys.exit(f"{verified.folder}: run benchmarks/bench_fidelity.py with the same arguments first")
        truth = verified.results()["true_loss"].to_numpy()
        memberships = memberships.astype(np.float64)
        subsets = recipe.run.estimates.read()[1]
        views = Views(recipe)
        for v in chosen:
            rho = spearman(v.estimate(views, memberships), truth)
            cell = f"{rho:.2f}"
            if s.own_group:
                scores = random_ensemble_scores(subsets, v.estimate(views, subsets.astype(np.float64)), views.groups)
                ranked = scores.sort("score", descending=True, nulls_last=True)["group"].to_list()
                cell += f" #{ranked.index(s.own_group) + 1}"
            rhos[v.label()].append(rho)
            cells[v.label()][target or args.setting] = cell
        print(f"{target or args.setting}: done", file=sys.stderr, flush=True)
    names = [t or args.setting for t in targets]
    print(f"\n{args.setting}, regime {regime_of(args.setting, args.regime)}: Spearman with the true target loss over the verified subsets "
          "(#: the rank the random ensemble gives the target's own dataset)\n")
    print("| variant | " + " | ".join(names) + " | median |\n|---|" + "---|" * (len(names) + 1))
    for v in chosen:
        print(f"| {v.label()} | " + " | ".join(cells[v.label()].get(n, "") for n in names)
              + f" | {np.median(rhos[v.label()]):.2f} |")


if __name__ == "__main__":
    main()
