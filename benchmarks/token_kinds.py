"""Where GSM8K's estimated group values come from: which target tokens, which points of the path.

    python benchmarks/token_kinds.py [--regime scratch|pretrained] [--finetune] [--set KEY=VALUE ...]

Real fine-tunes at equal steps gain far more from GSM8K's human rationales than from the
model-written solutions (leave_out.py: the model-written solutions alone end 0.34 nats above all
sources), while the estimate values both alike per step. The human rationales carry `<<48/2=24>>`
calculator annotations and end in `#### 72`; the model-written ones have neither and end in
`A: 72`. This splits the target's validation tokens into *format* (inside `<<…>>` and the `####`
answer) and *content* (the rest) and prints, per group, its value per step (the default
selector's own effect, L⁰ − f̂({g})) against each kind's target gradient and at each point of
meta-init's path; the parts add up to the effect. Then the estimated change of the target's loss
for the human rationales alone and the model-written solutions alone against all sources, per
kind. With `--finetune` it fine-tunes those three mixtures from the base (seed 0, as many steps
as all sources get; shared with leave_out.py's cache) and prints the true change per kind beside it.

Reads the build `rank_groups.py --setting gsm8k` makes (and makes it if missing); `--set`
overrides build in a folder of their own.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import polars as pl
import torch
from settings import CACHE, REGIMES, REGIME_HELP, setting

from dataselect import run
from dataselect.estimate import group_sums
from dataselect.examples import token_rows, usable
from dataselect.sketch import Sketcher, path_sketcher, point_blocks, stacked_sources
from dataselect.tokens import load_tokenizer, pad_batch, response_logprobs

FORMAT = re.compile(r"<<[^>]*>>|####.*$", re.S)
KINDS = {"format": True, "content": False}
MIXTURES = {"all sources": lambda g: True, "human alone": lambda g: g.startswith("human/"),
            "model-written alone": lambda g: not g.startswith("human/")}


def format_masks(tokenizer, rows: list[tuple[list[int], int]]) -> list[np.ndarray]:
    """Per row, which response tokens are format: they overlap an annotation or the answer line."""
    masks = []
    for ids, n_prompt in rows:
        pieces = [tokenizer.decode([t]) for t in ids[n_prompt:]]
        marked = np.zeros(sum(map(len, pieces)) + 1, dtype=bool)
        for m in FORMAT.finditer("".join(pieces)):
            marked[m.start() : m.end()] = True
        ends = np.cumsum([len(p) for p in pieces])
        masks.append(np.array([marked[e - len(p) : e].any() for p, e in zip(pieces, ends)], dtype=bool))
    return masks


def kind_batch(rows, masks, pad_id: int, kind: bool) -> dict[str, torch.Tensor]:
    """A padded batch whose loss counts only the response tokens of one kind."""
    b = pad_batch(rows, pad_id)
    keep = torch.zeros_like(b["target_mask"])
    for i, ((ids, n_prompt), m) in enumerate(zip(rows, masks)):
        keep[i, n_prompt - 1 : len(ids) - 1] = torch.from_numpy(m == kind)
    b["target_mask"] &= keep
    return b


def target_gradients(sketcher, rows, masks, pad_id: int, kind: bool, batch: int) -> list[np.ndarray]:
    """Per point of the path: the sketch of the summed loss gradient over the target's tokens of
    one kind, scaled by √weight as the stored sketches are."""
    blocks = []
    for point in sketcher.points:
        sketcher.move_to(point)
        sketch = Sketcher(sketcher.model, sketcher.modules, point.projector)
        total = torch.zeros(point.projector.proj_dim, dtype=torch.float64)
        for i in range(0, len(rows), batch):
            total += sketch(kind_batch(rows[i : i + batch], masks[i : i + batch], pad_id, kind))[0].sum(0).double()
        blocks.append((total * point.weight**0.5).numpy())
    return blocks


def kind_losses(model, rows, masks, pad_id: int, batch: int) -> dict[str, float]:
    """Mean token loss on the target's format tokens and on its content tokens."""
    out = {}
    with torch.no_grad():
        for name, kind in KINDS.items():
            total, count = 0.0, 0
            for i in range(0, len(rows), batch):
                b = kind_batch(rows[i : i + batch], masks[i : i + batch], pad_id, kind)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                total -= float(response_logprobs(logits, b["input_ids"], b["target_mask"]).sum())
                count += int(b["target_mask"].sum())
            out[name] = total / count
    return out


def kind_alignments(recipe, rows, masks, pad: int) -> tuple[list[str], dict[str, np.ndarray], list[float]]:
    """Per kind of target token, A[p, g] = ⟨the target's gradient over that kind at point p, group g's
    summed sketch⟩ / the target's tokens; and per point, the cosine of the target's whole gradient
    with the pool's."""
    examples, points = recipe.run.ingested.examples(), recipe.sketch_path
    sketcher = path_sketcher(recipe, recipe.run.ingested, recipe.run.meta_init)
    groups = recipe.run.estimates.group_gradients()["group"].to_list()
    _, names, x, _ = stacked_sources(recipe, examples, recipe.run.sketches)
    index = np.array([groups.index(n) for n in names])
    blocks, tokens = point_blocks(np.asarray(x), len(points)), sum(len(m) for m in masks)
    A, target = {}, [0.0] * len(points)
    for kind, flag in KINDS.items():
        gradients = target_gradients(sketcher, rows, masks, pad, flag, recipe.sketch.batch_size)
        A[kind] = np.stack([np.bincount(index, weights=b.astype(np.float64) @ g, minlength=len(groups)) / tokens
                            for b, g in zip(blocks, gradients)])
        target = [t + g for t, g in zip(target, gradients)]
    pools = [b.sum(0, dtype=np.float64) for b in blocks]
    return groups, A, [float(t @ q / (np.linalg.norm(t) * np.linalg.norm(q))) for t, q in zip(target, pools)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=REGIMES, default=None, help=REGIME_HELP)
    parser.add_argument("--finetune", action="store_true", help="also fine-tune the mixtures for the truth")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override (e.g. sketch.path=[0.1,0.25,0.5]), built in a folder of its own")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    chosen = setting("gsm8k", regime=args.regime, cache=args.cache)
    folder = f"{chosen.name}-tiny" + "".join("-" + re.sub(r"[^\w.=]+", "_", s) for s in args.set)
    recipe = chosen.load(args.cache / "runs" / folder, *args.set)
    run(recipe, until="estimate")
    tokenizer = load_tokenizer(recipe, recipe.run.ingested)
    pad, points = tokenizer.pad_token_id, recipe.sketch_path
    rows = token_rows(usable(recipe.run.ingested.examples(), "validation"))
    masks = format_masks(tokenizer, rows)
    share = {"format": float(np.concatenate(masks).mean())}
    share["content"] = 1 - share["format"]
    groups, A, cosines = kind_alignments(recipe, rows, masks, pad)
    sums = group_sums(recipe, recipe.run.estimates)

    def value(member: np.ndarray, part: np.ndarray) -> float:
        """L⁰ − f̂(S) at a fixed budget of steps, from one part of the target's gradient."""
        m = member.astype(np.float64)
        return float(sums.step_scales(m)[0] * (part @ m) / max(sums.tokens @ m, 1.0))

    print(f"gsm8k ({chosen.name}), path {points}: {share['format']:.1%} of the target's {sum(map(len, masks))} "
          "validation tokens are format; the target's gradient and the whole pool's, cosine by point: "
          + ", ".join(f"{p}: {c:.2f}" for p, c in zip(points, cosines)) + "\n")
    print("| group | rows | value per step | format tokens | content tokens | "
          + " | ".join(f"at {p}" for p in points) + " |\n|---|---|---|---|---|" + "---|" * len(points))
    effects = recipe.run.estimates.group_gradients()["effect"].to_numpy()
    for g in np.argsort(-effects):
        one = np.eye(len(groups))[g]
        by_kind = {k: value(one, a.sum(0)) for k, a in A.items()}
        by_point = [value(one, A["format"][p] + A["content"][p]) for p in range(len(points))]
        print(f"| {groups[g]} | {int(sums.count[g])} | {effects[g]:+.4f} | {by_kind['format']:+.4f} | "
              f"{by_kind['content']:+.4f} | " + " | ".join(f"{v:+.4f}" for v in by_point) + " |")

    print("\nThe change of the target's loss against all sources at all sources' steps, split by the target's "
          "tokens (each kind's part of the mean loss) and by the point of the path the estimate's gradients "
          "come from:\n\n| mixture | estimated, format | estimated, content | estimated | "
          + " | ".join(f"at {p} alone" for p in points) + " |" + (" true, format | true, content | true |"
                                                             if args.finetune else "")
          + "\n|---|---|---|---|" + "---|" * len(points) + "---|---|---|" * args.finetune)
    truth = finetuned_losses(recipe, rows, masks, pad, args.cache) if args.finetune else {}
    everything = np.ones(len(groups), dtype=bool)
    for label in ("human alone", "model-written alone"):
        member = np.array([MIXTURES[label](g) for g in groups])
        est = {k: value(everything, a.sum(0)) - value(member, a.sum(0)) for k, a in A.items()}
        at = [value(everything, A["format"][p] + A["content"][p]) - value(member, A["format"][p] + A["content"][p])
              for p in range(len(points))]
        line = (f"| {label} | {est['format']:+.4f} | {est['content']:+.4f} | {sum(est.values()):+.4f} | "
                + " | ".join(f"{v:+.2e}" for v in at) + " |")
        if truth:
            true = {k: share[k] * (truth[label][k] - truth["all sources"][k]) for k in KINDS}
            line += f" {true['format']:+.4f} | {true['content']:+.4f} | {sum(true.values()):+.4f} |"
        print(line)
    pool = [value(everything, A["format"][p] + A["content"][p]) for p in range(len(points))]
    print("\nAll sources' own value per step, L⁰ − f̂(all sources), by point: "
          + ", ".join(f"{p}: {v:+.4f}" for p, v in zip(points, pool)))
    if truth:
        print("\n| model | format loss | content loss |\n|---|---|---|")
        for label, r in truth.items():
            print(f"| {label} | {r['format']:.3f} | {r['content']:.3f} |")


def finetuned_losses(recipe, rows, masks, pad: int, cache: Path) -> dict[str, dict[str, float]]:
    """Each kind's target loss at the base and after fine-tuning each mixture from it (seed 0, as many
    steps as all sources get: the fine-tunes leave_out.py makes)."""
    from bench_selection import source_rows

    from dataselect.evaluate import finetuned
    from dataselect.meta_init import load_base_model

    sources, batch = source_rows(recipe), recipe.sketch.batch_size
    out = {"base": kind_losses(load_base_model(recipe, recipe.run.ingested).eval(), rows, masks, pad, batch)}
    for label, chosen in MIXTURES.items():
        kept = [g for g in sources["group"].unique().to_list() if chosen(g)]
        mixture = token_rows(sources.filter(pl.col("group").is_in(kept)))
        trained = recipe.model_copy(update={"seed": 0, "meta_init": recipe.meta_init.model_copy(
            update={"epochs": recipe.meta_init.epochs * len(sources) / len(mixture)})})
        out[label] = kind_losses(finetuned(trained, mixture, cache / "finetunes", pad), rows, masks, pad, batch)
    return out


if __name__ == "__main__":
    main()
