"""Do a fine-tune's gains saturate in a way the sketches can see? The linear estimate against a
damped Newton step that counts the curvature of the subset's own loss.

    python benchmarks/ablate_curvature.py [--targets samsum,xsum,...] [--regime pretrained|scratch]
        [--gsm8k] [--alphas 10,3,0] [--rank 256]

The default estimate is linear in the mixture: a step on S is the token-weighted mean of its
groups' steps, so it values a group the same whether or not the rest of the mixture already
teaches what it teaches. Real fine-tunes saturate (on GSM8K the model-written solutions alone
end 0.37 to 0.44 nats above all sources, while the human rationales alone end within 0.05 of
them; `token_kinds.py`). Here S's step is the damped Newton step on S's own quadratic model,

    Δ_S = (F_S + λ I)⁻¹ λ ḡ_S,   F_S = Σ_{j∈S} φ_j φ_jᵀ / Σ_{j∈S} T_j,

φ_j the stored (path-stacked, learning-rate-weighted) sketches and F_S their per-token second
moment, the Gauss-Newton curvature of S's token-averaged loss as an empirical Fisher. λ = α ·
the mean eigenvalue of the whole pool's F: at α → ∞ Δ_S is the plain gradient step (the linear
estimate), at small α a direction S already teaches strongly stops counting more once it is
learned, as early-stopped gradient descent does (ridge ≈ early stopping). With `budget=epochs`
(how `verify` fine-tunes) a subset that takes fewer steps is damped more: λ_S = λ K / K_S.

Prints, per T0 target with verified subsets (`bench_fidelity.py` first), Spearman(estimate, true
target loss), and the rank each gives an in-pool target's own dataset by its own value and by
what leaving it out of the whole pool costs, and how many groups the estimate says the whole
pool is better without. With `--gsm8k`, the estimated change of the human
rationales alone and of the model-written solutions alone against all sources (`token_kinds.py`
and `leave_out.py` give the truth: −0.047 and +0.371 from scratch, +0.025 and +0.438
pretrained), and whether each model-written source's correct solutions rank above its incorrect
ones. For both, which groups the default keep rule drops when each group's score (and the
estimate stage's 95% interval of it) is its own value under the Newton step instead of the
linear one. Stored sketches only; validation data only.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from settings import CACHE, REGIMES, REGIME_HELP, T0_IN_POOL, T0_TRANSFER, regime_of, setting

from dataselect import run
from dataselect.estimate import GroupSums, Pool, group_sums, load_pool
from dataselect.examples import response_tokens
from dataselect.select import confidently_past
from dataselect.sketch import stacked_sources, target_sketches
from dataselect.verify import spearman


class Curvature:
    """Per group, Σφ_jφ_jᵀ and Σφ_j of the stored sketches, in the estimate stage's group order, and
    the target's per-token gradient; the groups' tokens, squared lengths and alignments (the linear
    estimate) are the estimate stage's own sums."""

    def __init__(self, recipe, sums: GroupSums, rank: int | None = None):
        examples = recipe.run.ingested.examples()
        ids, names, x, _ = stacked_sources(recipe, examples, recipe.run.sketches)
        target_ids, target_x, _ = target_sketches(recipe.run.sketches)
        groups = recipe.run.estimates.read()[0]
        index = {g: i for i, g in enumerate(groups)}
        of = torch.tensor([index[n] for n in names])
        d, n = x.shape[1], len(groups)
        self.gram = torch.zeros((n, d, d), dtype=torch.float64)
        self.sums = torch.zeros((n, d), dtype=torch.float64)
        for start in range(0, len(x), 4096):
            rows, at = torch.from_numpy(np.asarray(x[start : start + 4096], np.float64)), of[start : start + 4096]
            for g in at.unique().tolist():
                self.gram[g] += rows[at == g].T @ rows[at == g]
                self.sums[g] += rows[at == g].sum(0)
        lengths = response_tokens(examples)
        self.target = torch.from_numpy(np.asarray(target_x, np.float64).sum(0) / sum(lengths[i] for i in target_ids))
        self.groups, self.group_sums, self.memo = groups, sums, {}
        self.scale = float(sums.squares.sum() / sums.tokens.sum() / d)  # the pool's mean eigenvalue of F
        self.basis = None
        if rank:  # curvature only in the pool's top `rank` directions; elsewhere the plain step
            self.basis = torch.linalg.eigh(self.gram.sum(0))[1][:, -rank:]
            self.gram = self.basis.T @ self.gram @ self.basis

    def drops(self, members: np.ndarray, alpha: float, steps: np.ndarray) -> np.ndarray:
        """⟨ḡ_target, Δ_S⟩ per subset (boolean rows over groups) at a finite α (0: λ = 1); `steps`:
        K_S / K per subset."""
        key = (alpha, np.asarray(members).tobytes(), np.asarray(steps).tobytes())
        if key not in self.memo:
            self.memo[key] = self._drops(np.atleast_2d(members).astype(np.float64), alpha, np.asarray(steps, np.float64))
        return self.memo[key]

    def _drops(self, members: np.ndarray, alpha: float, steps: np.ndarray) -> np.ndarray:
        """The subsets' curvatures are summed a few at a time, so the groups' matrices are read once per few."""
        m = torch.from_numpy(members)
        tokens = m @ torch.from_numpy(self.group_sums.tokens)
        means, target, linear = (m @ self.sums) / tokens[:, None], self.target, np.zeros(len(members))
        if self.basis is not None:  # outside the basis no curvature: the plain step, K_S / K of it
            means, target = means @ self.basis, self.basis.T @ self.target
            linear = (self.group_sums.per_token(members) - (means @ target).numpy()) * steps
        out, d = [], self.gram.shape[-1]
        flat = self.gram.reshape(len(self.groups), -1)
        for start in range(0, len(m), 8):
            chunk = slice(start, start + 8)
            curvature = (m[chunk] @ flat).reshape(-1, d, d) / tokens[chunk, None, None]
            lam = torch.from_numpy((1.0 if alpha == 0 else alpha * self.scale) / steps[chunk])
            curvature.diagonal(dim1=1, dim2=2).add_(lam[:, None])
            rhs = (lam[:, None] * means[chunk]).unsqueeze(-1)
            step = torch.stack([torch.cholesky_solve(r, torch.linalg.cholesky(c)) for c, r in zip(curvature, rhs)])
            out.append((step.squeeze(-1) @ target).numpy())
        return np.concatenate(out) + linear


def forms(alphas: list[float]) -> dict[str, tuple[float, bool]]:
    """Each form: (α, whether S's step is also scaled as AdamW's is, c_S)."""
    out = {"linear, AdamW's scale (default)": (np.inf, True), "linear, plain step": (np.inf, False)}
    for a in alphas:  # α = 0: λ = 1 in the sketches' own units, which carry meta-init's learning rate
        name = "Newton, λ = 1" if a == 0 else f"Newton α={a:g}"
        out[name] = (a, False)
        out[f"{name}, AdamW's scale"] = (a, True)
    return out


def estimate(curv: Curvature, sums: GroupSums, members: np.ndarray, form: tuple[float, bool],
             budget: str) -> np.ndarray:
    """The estimated drop of the target's loss per subset (larger: a lower loss)."""
    alpha, adam = form
    lengths = sums.training_lengths(members, budget)
    if np.isinf(alpha):  # the linear estimate, whose step grows with the steps taken
        drop = lengths * sums.per_token(members)
    else:
        drop = curv.drops(members, alpha, lengths)
    return drop * (sums.step_scales(members) if adam else 1.0)


def leave_out_costs(curv: Curvature, sums: GroupSums, form) -> np.ndarray:
    """Per group, what leaving it out of all sources costs at equal steps (below 0: the estimate
    says the mixture is better without it)."""
    n = len(curv.groups)
    everything = estimate(curv, sums, np.ones((1, n), dtype=bool), form, "steps")[0]
    return everything - estimate(curv, sums, ~np.eye(n, dtype=bool), form, "steps")


def own_ranks(curv: Curvature, sums: GroupSums, form, own: str) -> tuple[int, int]:
    """The rank of the target's own group by its own value, and by what leaving it out costs."""
    alone = estimate(curv, sums, np.eye(len(curv.groups), dtype=bool), form, "steps")
    cost, at = leave_out_costs(curv, sums, form), curv.groups.index(own)
    return int((alone > alone[at]).sum()) + 1, int((cost > cost[at]).sum()) + 1


def newton_pool(pool: Pool, x: torch.Tensor, heads: torch.Tensor, alpha: float) -> Pool:
    """The estimate stage's pool with each group's own step taken as the Newton step on its own
    curvature, so that the library's `group_effects` gives the default selector's score and 95%
    interval under it. With F_g taken as known (as c_g is), a group's own value is linear in its
    examples and in the target's: example j counts ⟨φ_j, v_g⟩ and target example i ⟨h_i, Δ_g⟩ T_g,
    v_g = λ(F_g + λ)⁻¹ ḡ_target. Per group in its rows' kernel (Woodbury), λ(F_g + λ)⁻¹u =
    u − Φ_gᵀ(Φ_gΦ_gᵀ + λT_g I)⁻¹Φ_g u, so no d × d matrix is formed. `x`: the pool's sketches in
    its row order; `heads`: the target's."""
    target = heads.sum(0) / pool.target_tokens.sum()
    lam = 1.0 if alpha == 0 else alpha * float(pool.sums.squares.sum() / pool.sums.tokens.sum() / x.shape[1])
    alignment, per_target = np.zeros(len(x)), np.zeros_like(pool.per_target)
    for g in range(len(pool.groups)):
        rows = pool.group_of == g
        phi, tokens = x[torch.from_numpy(rows)], float(pool.tokens[rows].sum())
        kernel = phi @ phi.T
        solve = torch.linalg.cholesky(kernel + lam * tokens * torch.eye(len(phi), dtype=torch.float64))
        # ⟨φ_j, v_g⟩ = ⟨φ_j, t⟩ − (K M⁻¹ Φ t)_j
        along = phi @ target
        alignment[rows] = (along - kernel @ torch.cholesky_solve(along[:, None], solve)[:, 0]).numpy()
        # ⟨Σ_j φ_j, λ(F+λ)⁻¹h_i⟩ = ⟨Σ_j φ_j, h_i⟩ − (K1)ᵀ M⁻¹ Φ h_i
        damped = torch.cholesky_solve(kernel.sum(1)[:, None], solve)[:, 0]
        per_target[g] = (heads @ phi.sum(0) - damped @ (phi @ heads.T)).numpy()
    by_group = np.bincount(pool.group_of, weights=alignment, minlength=len(pool.groups))
    return replace(pool, alignment=alignment, per_target=per_target, sums=replace(pool.sums, alignment=by_group))


def keep_decisions(recipe, alphas: list[float], own: str | None) -> dict[str, str]:
    """The groups the default keep rule drops (confidently harmful, Holm) and the own group's rank,
    under the linear own value (the default, as the estimate stage stored it) and under the
    Newton step with AdamW's scale, per α."""
    pool = load_pool(recipe, recipe.run.ingested, recipe.run.sketches)
    x = torch.from_numpy(np.asarray(stacked_sources(recipe, recipe.run.ingested.examples(), recipe.run.sketches)[2],
                                    np.float64))
    heads = torch.from_numpy(np.asarray(target_sketches(recipe.run.sketches)[1], np.float64))
    effects = {"linear, AdamW's scale (default)": recipe.run.estimates.group_gradients()}
    for alpha in alphas:
        name = "Newton, λ = 1, AdamW's scale" if alpha == 0 else f"Newton α={alpha:g}, AdamW's scale"
        effects[name] = newton_pool(pool, x, heads, alpha).group_effects()
    out = {}
    for name, frame in effects.items():
        scored = frame.select("group", score="effect", ci95="ci95")
        dropped = sorted(g.split("/", 1)[-1] for g in confidently_past(scored, 0.0, "high_end"))
        signal = float((scored["score"].abs() / scored["ci95"]).median())
        mine = ""
        if own:
            ranked = scored.sort("score", descending=True).with_row_index("rank", 1)
            row = ranked.row(by_predicate=pl.col("group") == own, named=True)
            mine = f"own {row['rank']}: {row['score']:+.3f} ± {row['ci95']:.3f}; "
        out[name] = (", ".join(dropped) or "none") + f" ({mine}{signal:.2f})"
    return out


def print_keeps(keeps: dict[str, dict[str, str]]) -> None:
    print("\nthe groups the default keep rule drops (confidently harmful over all groups, Holm) when a group's "
          "score is its own value under each step (own: the in-pool target's own dataset's rank and score; "
          "then the median over groups of |score| / its 95% interval)\n\n| step | "
          + " | ".join(keeps) + " |\n|---|" + "---|" * len(keeps))
    for name in next(iter(keeps.values())):
        print(f"| {name} | " + " | ".join(by_step[name] for by_step in keeps.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(T0_IN_POOL[:3] + T0_TRANSFER))
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--alphas", default="10,3,0", help="0: λ = 1, meta-init's own learning rate")
    parser.add_argument("--gsm8k", action="store_true")
    parser.add_argument("--rank", type=int, default=None, help="curvature in the pool's top directions only")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    torch.set_num_threads(2)
    alphas = [float(a) for a in args.alphas.split(",")]
    chosen_forms = forms(alphas)
    rhos: dict[str, dict[str, float]] = {f: {} for f in chosen_forms}
    ranks: dict[str, dict[str, str]] = {f: {} for f in chosen_forms}
    better_without: dict[str, dict[str, str]] = {f: {} for f in chosen_forms}
    targets = [t for t in args.targets.split(",") if t]
    keeps: dict[str, dict[str, str]] = {}
    for target in targets:
        chosen = setting("t0", target=target, regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-seed0", "seed=0")
        results = recipe.run.verification.results()
        if results is None:
            raise SystemExit(f"{target}: no verified subsets; run bench_fidelity.py --targets {target} "
                             f"--regime {regime_of('t0', args.regime)} first")
        run(recipe, until="estimate")
        sums = group_sums(recipe, recipe.run.estimates)
        curv = Curvature(recipe, sums, args.rank)
        members = recipe.run.verification.memberships().astype(bool)
        for name, form in chosen_forms.items():
            rhos[name][target] = spearman(-estimate(curv, sums, members, form, "epochs"), results["true_loss"].to_numpy())
            if chosen.own_group:
                ranks[name][target] = "{} / {}".format(*own_ranks(curv, sums, form, chosen.own_group))
            better_without[name][target] = f"{int((leave_out_costs(curv, sums, form) < 0).sum())} of {len(curv.groups)}"
        keeps[target] = keep_decisions(recipe, alphas, chosen.own_group)
        print(f"{target}: done; λ = 1 is α = {1 / curv.scale:.3g}", flush=True)
    if targets:
        print("\nSpearman(estimate, true target loss) over each target's verified subsets\n\n| step | "
              + " | ".join(targets) + " | median |\n|---|" + "---|" * (len(targets) + 1))
        for name, by_target in rhos.items():
            print(f"| {name} | " + " | ".join(f"{by_target[t]:.3f}" for t in targets)
                  + f" | {np.median(list(by_target.values())):.3f} |")
        own = [t for t in targets if t in ranks[next(iter(ranks))]]
        if own:
            print("\nthe in-pool target's own dataset: its rank by its own value / by what leaving it out costs\n\n"
                  "| step | " + " | ".join(own) + " |\n|---|" + "---|" * len(own))
            for name, by_target in ranks.items():
                print(f"| {name} | " + " | ".join(by_target[t] for t in own) + " |")
        print("\nthe groups whose leaving out of all sources the estimate says lowers the target's loss, at "
              "equal steps\n\n| step | " + " | ".join(targets) + " |\n|---|" + "---|" * len(targets))
        for name, by_target in better_without.items():
            print(f"| {name} | " + " | ".join(by_target[t] for t in targets) + " |")
        print_keeps(keeps)
    if args.gsm8k:
        gsm8k(args, chosen_forms, alphas)


def gsm8k(args, chosen_forms, alphas: list[float]) -> None:
    """The two leave-out mixtures against all sources, and correct above incorrect, per form."""
    chosen = setting("gsm8k", regime=args.regime, cache=args.cache)
    recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-tiny")
    run(recipe, until="estimate")
    sums = group_sums(recipe, recipe.run.estimates)
    curv = Curvature(recipe, sums, args.rank)
    groups = curv.groups
    human = np.array([g.startswith("human/") for g in groups])
    mixtures = np.stack([np.ones(len(groups), dtype=bool), human, ~human])
    sources = sorted({g.split("/")[0] for g in groups if g.endswith("/True")})
    print(f"\n{chosen.name}: the estimated change of the target's loss against all sources, at equal steps\n\n"
          "| step | human alone | model-written alone | ratio | correct above incorrect (own value) |"
          " dropping it hurts (human clusters; model-written groups) |\n|---|---|---|---|---|---|")
    for name, form in chosen_forms.items():
        drop = estimate(curv, sums, mixtures, form, "steps")
        alone = estimate(curv, sums, np.eye(len(groups), dtype=bool), form, "steps")
        cost = drop[0] - estimate(curv, sums, ~np.eye(len(groups), dtype=bool), form, "steps")
        above = sum(alone[groups.index(f"{s}/True")] > alone[groups.index(f"{s}/False")] for s in sources)
        print(f"| {name} | {drop[0] - drop[1]:+.3g} | {drop[0] - drop[2]:+.3g} | {(drop[0] - drop[1]) / (drop[0] - drop[2]):+.2f} "
              f"| {above} of {len(sources)} | {int((cost[human] > 0).sum())} of {int(human.sum())}; "
              f"{int((cost[~human] > 0).sum())} of {int((~human).sum())} |")
    print_keeps({chosen.name: keep_decisions(recipe, alphas, None)})


if __name__ == "__main__":
    main()
