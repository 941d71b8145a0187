"""What reproduces: the demo built twice, in differently named work folders with different thread
counts (float rounding differs, as on another CPU), and what each build kept.

    python benchmarks/bench_reproduce.py [--recipe recipes/demo.yaml] [--threads 2,1]

Each build runs in its own process with `OMP_NUM_THREADS` set, from scratch. Prints per build the
kept groups, the mixture's rows and fingerprint, the clusters' sizes and rows near a cluster
boundary, and the selection's overlap under score redraws; then how alike the two builds'
sketches are, and whether the kept groups, the groups' rows and the bytes agree. `--threads 2,2`
checks the same thread count in two work folders.
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
import polars as pl

from dataselect.artifacts import Run
from dataselect.store import read_store


def build(recipe: str, folder: Path, threads: int) -> dict:
    """One build from scratch in `folder` with `threads` threads: its manifest and each row's group."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "dataselect", "build", "-q", "--recipe", recipe,
                    "--set", f"workdir={folder}/run", "--set", f"output.path={folder}/out"], check=True, env=env)
    manifest = json.loads((folder / "out" / "manifest.json").read_text())
    rows = pl.read_parquet(folder / "out" / "rows.parquet")
    stores = Run(folder / "run").sketches
    sketches = {source: np.array(read_store(stores.source_store(source))[1]) for source in manifest["sources"]}
    return {"manifest": manifest, "groups": dict(zip(rows["id"], rows["group"])), "sketches": sketches}


def median_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two builds' sketches of the same rows are: the median over rows of their cosine."""
    return float(np.median((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-30)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--threads", default="2,1")
    args = parser.parse_args()
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, threads in enumerate(int(t) for t in args.threads.split(",")):
            name = f"{i + 1}: threads={threads}"
            builds[name] = build(args.recipe, Path(tmp) / f"{'zyx'[i % 3]}-{i}-work", threads)
    print("\n| build | kept groups | rows | fingerprint | clusters (sizes; rows near a boundary) | "
          "selection overlap under score redraws |\n|---|---|---|---|---|---|")
    kept = {}
    for name, b in builds.items():
        m = b["manifest"]
        kept[name] = sorted(g["group"] for g in m["groups"] if g["selected"])
        clusters = "; ".join(f"{s}: {c['sizes']}, {c['near_boundary']}"
                             for s, c in (m["stages"]["sketch"].get("clusters") or {}).items())
        steady = m["stages"]["select"].get("stability") or {}
        print(f"| {name} | {len(kept[name])}: {', '.join(kept[name])} | {m['mixture']['rows']} | "
              f"{m['mixture']['fingerprint']} | {clusters} | {steady.get('mean_overlap', float('nan')):.3f} |")
    names = list(builds)
    first = builds[names[0]]
    for name in names[1:]:
        other = builds[name]
        moved = sum(first["groups"][i] != g for i, g in other["groups"].items())
        cosines = ", ".join(f"{source} {median_cosine(x, other['sketches'][source]):.3f}"
                            for source, x in first["sketches"].items())
        print(f"\n{names[0]} against {name}: median cosine of a row's sketches in the two builds: {cosines}")
        print(f"\n{names[0]} against {name}: same kept groups: {kept[names[0]] == kept[name]}; "
              f"rows in another group: {moved} of {len(other['groups'])}; same bytes: "
              f"{first['manifest']['mixture']['fingerprint'] == other['manifest']['mixture']['fingerprint']}")


if __name__ == "__main__":
    main()
