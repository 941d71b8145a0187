"""Is the demo's meta-init the same across thread counts, and would float64 make it so?

    python benchmarks/reproduce_meta_init.py [--recipe recipes/demo.yaml] [--threads 1,2]

Ingests the recipe once, then runs its meta-init from scratch once per thread count and dtype
(float32, as dataselect trains, and float64: the model and its log-softmax cast up), each in its
own process with `OMP_NUM_THREADS` set. Prints, per dtype, how far the runs' training losses are
apart at a few steps and how far apart their θ* end (relative L2). A gap that starts at rounding
level and grows by orders of magnitude is chaos in the training run, which no precision removes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def train(recipe: str, work: Path, out: Path, float64: bool) -> None:
    """One meta-init into `out` (this process; the caller sets the threads)."""
    import torch

    from dataselect import meta_init
    from dataselect.recipe import load_recipe

    loaded = load_recipe(recipe, [f"workdir={work}"])
    if float64:
        base = meta_init.load_base_model
        meta_init.load_base_model = lambda r, ingested: base(r, ingested).double()
        meta_init.response_logprobs = lambda logits, ids, mask: torch.where(
            mask, torch.gather(torch.log_softmax(logits, -1), -1, torch.roll(ids, -1, -1).unsqueeze(-1)).squeeze(-1),
            torch.zeros((), dtype=logits.dtype))
    out.mkdir(parents=True)
    meta_init.stage(loaded, out, loaded.run.ingested)


def relative_distance(a: Path, b: Path) -> float:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    gap = sum(float(((x[k].astype(np.float64) - y[k]) ** 2).sum()) for k in x)
    size = sum(float((x[k].astype(np.float64) ** 2).sum()) for k in x)
    return (gap / size) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--train", nargs=3, metavar=("WORK", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:
        train(args.recipe, Path(args.train[0]), Path(args.train[1]), args.train[2] == "float64")
        return
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "dataselect", "ingest", "-q", "--recipe", args.recipe,
                        "--set", f"workdir={work}"], check=True)
        print(f"recipe {args.recipe}; threads {threads}\n")
        print("| dtype | loss gap at step 5 | 100 | 200 | 400 | last | θ* apart (relative L2) |\n|---|---|---|---|---|---|---|")
        for dtype in ("float32", "float64"):
            outs = []
            for n in threads:
                out = Path(tmp) / f"{dtype}-{n}"
                env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
                subprocess.run([sys.executable, __file__, "--recipe", args.recipe, "--train", str(work), str(out), dtype],
                               check=True, env=env, stderr=subprocess.DEVNULL)
                outs.append(out)
            losses = [np.array(json.loads((o / "losses.json").read_text())) for o in outs]
            gap = np.abs(losses[0] - losses[1])
            at = [5, 100, 200, 400, len(gap) - 1]
            print(f"| {dtype} | " + " | ".join(f"{gap[s]:.1e}" for s in at)
                  + f" | {relative_distance(outs[0] / 'theta.safetensors', outs[1] / 'theta.safetensors'):.3f} |")


if __name__ == "__main__":
    main()
