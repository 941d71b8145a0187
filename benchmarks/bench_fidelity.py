"""How well do the estimates track real fine-tunes? `dataselect verify` on the demo, at scale.

    python benchmarks/bench_fidelity.py [--subsets 30] [--seed 0] [--repeats 5]

Builds the demo from scratch in a temporary folder, fine-tunes the tiny model for real on
`--subsets` random subsets of groups plus the selection and its complement, and prints the
estimate-versus-truth figures: rank correlations, R², median relative error (raw, log-affine
leave-one-out, constant-mean control), the similarity baselines' correlations, the truth's own
noise (`--repeats` subsets fine-tuned again with the next seed), the first-order check against
its zeroth-order control, and the step lengths with the best-ranking λ.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from dataselect import load_recipe
    from dataselect.verify import verify

    print(f"command: python benchmarks/bench_fidelity.py {' '.join(sys.argv[1:])} (seed {args.seed})")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(ROOT / "recipes" / "demo.yaml",
                             [f"workdir={tmp}/run", f"output.path={tmp}/out", f"seed={args.seed}"])
        start = time.perf_counter()
        s = verify(recipe, k_random=args.subsets, repeats=args.repeats)
        print(f"{s['subsets']} subsets verified in {time.perf_counter() - start:.0f} s\n")
        print((Path(tmp) / "run" / "verify" / "report.md").read_text().split("\n\n", 1)[1])


if __name__ == "__main__":
    main()
