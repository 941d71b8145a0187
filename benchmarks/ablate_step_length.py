"""Does a subset's step length carry information? The estimate with S's gradient as it is, scaled
to the whole pool's length (AdamW, which the fine-tunes use, takes steps of about the same length
whatever the gradient's size), or scaled by the root of its mean square over a batch, signal plus
batch noise (as Adam's second moment does, in one number for all coordinates).

    python benchmarks/ablate_step_length.py [--targets samsum,xsum,...] [--regime pretrained|scratch]
        [--gsm8k] [--smollm2]

Reads the stored sketches and, per T0 target, the subsets `bench_fidelity.py` fine-tuned for real
(run it first); prints the Spearman correlation of each form with the true target loss, and
the rank each gives an in-pool target's own dataset. With
`--gsm8k`, also the ranking each form gives GSM8K's groups (from `bench_selection.py --setting
gsm8k`'s run): whether every model-written source's correct solutions rank above its incorrect ones.
With `--smollm2`, the rank each form gives samsum's own data among the T0 groups with
SmolLM2-135M-Instruct and LoRA (from `bench_selection.py --setting t0 --model smollm2 --targets
samsum`'s run). Validation data only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from settings import CACHE, T0_IN_POOL, T0_TRANSFER, setting

from dataselect.examples import response_tokens
from dataselect.sketch import stacked_sources, target_sketches
from dataselect.verify import spearman


@dataclass
class Groups:
    """Per group, sums over its examples j: the sketches g_j, the response tokens T_j, the count,
    ‖g_j‖², T_j·g_j and T_j² (all additive over groups, so any subset's follow); and the target's
    per-token gradient."""

    names: list[str]
    sums: np.ndarray
    tokens: np.ndarray
    count: np.ndarray
    squares: np.ndarray
    token_weighted: np.ndarray
    token_squares: np.ndarray
    target: np.ndarray


def group_gradients(recipe) -> Groups:
    examples = recipe.run.ingested.examples()
    ids, names, x, _ = stacked_sources(recipe, examples, recipe.run.sketches)
    target_ids, target_x, _ = target_sketches(recipe.run.sketches)
    lengths = response_tokens(examples)
    target = np.asarray(target_x, np.float64).sum(0) / sum(lengths[i] for i in target_ids)
    groups = sorted(set(names))
    index = {g: i for i, g in enumerate(groups)}
    group_of = np.array([index[n] for n in names])
    x, tokens = np.asarray(x, np.float64), np.array([lengths[i] for i in ids], np.float64)

    def by_group(values: np.ndarray) -> np.ndarray:
        out = np.zeros((len(groups), *values.shape[1:]))
        np.add.at(out, group_of, values)
        return out

    return Groups(groups, by_group(x), by_group(tokens), by_group(np.ones(len(x))), by_group((x * x).sum(1)),
                  by_group(x * tokens[:, None]), by_group(tokens**2), target)


def drops(membership: np.ndarray, g: Groups, batch: int) -> dict[str, np.ndarray]:
    """Per subset, the first-order drop of the target's loss under each form of the step."""
    tokens, count = membership @ g.tokens, membership @ g.count
    gradient = (membership @ g.sums) / tokens[:, None]  # S's per-token gradient
    signal = (gradient * gradient).sum(1)
    # the spread of Σ_{j∈B} g_j / Σ_{j∈B} T_j over batches of `batch` examples (the delta method)
    spread = (membership @ g.squares - 2 * ((membership @ g.token_weighted) * gradient).sum(1)
              + (membership @ g.token_squares) * signal) / count
    noise = spread / (batch * (tokens / count) ** 2)
    pool = np.linalg.norm(g.sums.sum(0) / g.tokens.sum())
    return {"as is (default)": gradient @ g.target,
            "scaled to the pool's length": pool * (gradient @ g.target) / np.sqrt(signal),
            "scaled by signal plus batch noise": pool * (gradient @ g.target) / np.sqrt(signal + noise)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(T0_IN_POOL[:3] + T0_TRANSFER))
    parser.add_argument("--regime", choices=["pretrained", "scratch"], default="pretrained")
    parser.add_argument("--gsm8k", action="store_true")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    rhos: dict[str, dict[str, float]] = {}
    own: dict[str, dict[str, int]] = {}  # in-pool targets: the rank of the target's own dataset
    for target in args.targets.split(","):
        chosen = setting("t0", target=target, regime=args.regime, cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-seed0", "seed=0")
        results, members = recipe.run.verification.results(), recipe.run.verification.memberships()
        if results is None or members is None:
            raise SystemExit(f"{target}: no verified subsets; run bench_fidelity.py --targets {target} "
                             f"--regime {args.regime} first")
        g = group_gradients(recipe)
        for form, drop in drops(members.astype(np.float64), g, recipe.meta_init.batch_size).items():
            rhos.setdefault(form, {})[target] = spearman(-drop, results["true_loss"].to_numpy())
        if chosen.own_group:
            for form, drop in drops(np.eye(len(g.names)), g, recipe.meta_init.batch_size).items():
                order = [g.names[i] for i in np.argsort(-drop)]
                own.setdefault(form, {})[target] = order.index(chosen.own_group) + 1
    targets = args.targets.split(",")
    print("Spearman(estimate, true target loss) over each target's verified subsets\n\n| step | "
          + " | ".join(targets) + " | median |\n|---|" + "---|" * (len(targets) + 1))
    for form, by_target in rhos.items():
        print(f"| {form} | " + " | ".join(f"{by_target[t]:.3f}" for t in targets)
              + f" | {np.median(list(by_target.values())):.3f} |")
    if own:
        print("\nthe rank each form gives an in-pool target's own dataset among the groups\n\n| step | "
              + " | ".join(own[next(iter(own))]) + " |\n|---|" + "---|" * len(own[next(iter(own))]))
        for form, by_target in own.items():
            print(f"| {form} | " + " | ".join(str(r) for r in by_target.values()) + " |")
    if args.gsm8k:
        recipe = setting("gsm8k").load(args.cache / "runs" / "gsm8k-tiny")
        g = group_gradients(recipe)
        groups = g.names
        for form, drop in drops(np.eye(len(groups)), g, recipe.meta_init.batch_size).items():
            rank = {groups[i]: r + 1 for r, i in enumerate(np.argsort(-drop))}
            sources = sorted({g.split("/")[0] for g in groups if g.endswith("/True")})
            above = [s for s in sources if rank[f"{s}/True"] < rank[f"{s}/False"]]
            print(f"\ngsm8k, {form}: correct above incorrect for {len(above)} of {len(sources)} sources ("
                  + ", ".join(f"{s} {rank[f'{s}/True']} vs {rank[f'{s}/False']}" for s in sources) + ")")
    if args.smollm2:
        chosen = setting("t0", model="smollm2", target="samsum", cache=args.cache)
        recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-smollm2")
        g = group_gradients(recipe)
        groups = g.names
        for form, drop in drops(np.eye(len(groups)), g, recipe.meta_init.batch_size).items():
            order = [groups[i] for i in np.argsort(-drop)]
            print(f"\nt0 samsum, SmolLM2-135M-Instruct + LoRA, {form}: samsum ranked {order.index('t0/samsum') + 1} "
                  f"of {len(groups)}; first: {', '.join(order[:3])}")


if __name__ == "__main__":
    main()
