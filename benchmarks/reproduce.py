"""reproduce: what a rebuild in another folder, with another thread count, keeps.

The demo built twice, in differently named work folders with different thread counts (float
rounding differs, as on another CPU), and what each build kept.

    python -m benchmarks reproduce [--recipe recipes/demo.yaml] [--threads 2,1] [--meta-init]

Each build runs in its own process with `OMP_NUM_THREADS` set, from scratch. Reports per build the
kept groups, the mixture's rows and fingerprint, the clusters' sizes and rows near a cluster
boundary, and the selection's overlap under score redraws; then how alike the two builds'
sketches are, and whether the kept groups, the groups' rows and the bytes agree. `--threads 2,2`
checks the same thread count in two work folders.

`--meta-init` asks whether the gap is chaos in training: it runs the recipe's meta-init once per
thread count and dtype (float32, as dataselect trains, and float64) and reports how far the runs'
training losses are apart along the way and how far apart their θ* end (relative L2). A gap that
starts at rounding level and grows by orders of magnitude is chaos, which no precision removes.
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

from .common import ROOT, Results, Table, slug


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--threads", default="2,1", help="two thread counts, one per build")
    parser.add_argument("--meta-init", action="store_true", help="meta-init per thread count, float32 and float64")
    parser.add_argument("--train", nargs=3, metavar=("WORK", "OUT", "DTYPE"), help=argparse.SUPPRESS)


def default_name(args: argparse.Namespace) -> str:
    return slug("reproduce", Path(args.recipe).stem, "threads", args.threads.replace(",", "-"),
                "meta-init" if args.meta_init else None)


def run(args: argparse.Namespace) -> Results:
    if args.train:
        train(args.recipe, Path(args.train[0]), Path(args.train[1]), args.train[2] == "float64")
        raise SystemExit(0)
    threads = [int(t) for t in args.threads.split(",")]
    results = Results()
    if args.meta_init:
        meta_init_gaps(args.recipe, threads, results)
    else:
        builds_alike(args.recipe, threads, results)
    return results


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def build(recipe: str, folder: Path, threads: int) -> dict:
    """One build from scratch in `folder` with `threads` threads: its manifest and each row's group."""
    import polars as pl

    from dataselect.artifacts import Run
    from dataselect.outputs import read_manifest
    from dataselect.store import read_store

    subprocess.run([sys.executable, "-m", "dataselect", "build", "-q", "--recipe", recipe,
                    "--set", f"workdir={folder}/run", "--set", f"output.path={folder}/out"], check=True,
                   env=_env(threads), cwd=ROOT)
    manifest = read_manifest(folder / "out")
    rows = pl.read_parquet(folder / "out" / "rows.parquet")
    stores = Run(folder / "run").sketches
    sketches = {source: np.array(read_store(stores.source_store(source))[1]) for source in manifest["sources"]}
    return {"manifest": manifest, "groups": dict(zip(rows["id"], rows["group"])), "sketches": sketches}


def median_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two builds' sketches of the same rows are: the median over rows of their cosine."""
    return float(np.median((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-30)))


def builds_alike(recipe: str, threads: list[int], results: Results) -> None:
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, n in enumerate(threads):
            builds[f"{i + 1}: threads={n}"] = build(recipe, Path(tmp) / f"{'zyx'[i % 3]}-{i}-work", n)
    table = Table("each build from scratch: what it kept",
                  [("build", "build", ""), ("kept", "kept groups", ""), ("rows", "rows", ""),
                   ("fingerprint", "fingerprint", ""), ("clusters", "clusters (sizes; rows near a boundary)", ""),
                   ("overlap", "selection overlap under score redraws", ".3f")])
    kept = {}
    for name, b in builds.items():
        m = b["manifest"]
        kept[name] = sorted(g["group"] for g in m["groups"] if g["selected"])
        clusters = "; ".join(f"{s}: {c['sizes']}, {c['near_boundary']}"
                             for s, c in (m["stages"]["sketch"].get("clusters") or {}).items())
        steady = m["stages"]["select"].get("stability") or {}
        table.rows.append({"build": name, "kept": kept[name], "rows": m["mixture"]["rows"],
                           "fingerprint": m["mixture"]["fingerprint"], "clusters": clusters,
                           "overlap": steady.get("mean_overlap")})
    results.add("builds", table)
    names = list(builds)
    first = builds[names[0]]
    compared = Table("the first build against each other one",
                     [("builds", "builds", ""), ("cosine", "median cosine of a row's sketches, per source", ""),
                      ("same_kept", "same kept groups", ""), ("moved", "rows in another group", ""),
                      ("same_bytes", "same bytes", "")])
    for name in names[1:]:
        other = builds[name]
        compared.rows.append({
            "builds": f"{names[0]} / {name}",
            "cosine": ", ".join(f"{s} {median_cosine(x, other['sketches'][s]):.3f}" for s, x in first["sketches"].items()),
            "same_kept": kept[names[0]] == kept[name],
            "moved": f"{sum(first['groups'][i] != g for i, g in other['groups'].items())} of {len(other['groups'])}",
            "same_bytes": first["manifest"]["mixture"]["fingerprint"] == other["manifest"]["mixture"]["fingerprint"]})
    results.add("compared", compared)


def train(recipe: str, work: Path, out: Path, float64: bool) -> None:
    """One meta-init into `out` (this process; the caller sets the threads)."""
    import torch

    from dataselect import meta_init, trainer
    from dataselect.recipe import load_recipe

    loaded = load_recipe(recipe, [f"workdir={work}"])
    if float64:
        base = trainer.load_base_model
        trainer.load_base_model = lambda r, ingested: base(r, ingested).double()
        trainer.response_logprobs = lambda logits, ids, mask: torch.where(
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


def meta_init_gaps(recipe: str, threads: list[int], results: Results) -> None:
    from dataselect.artifacts import FineTune

    steps = [5, 100, 200, 400]
    table = Table(f"meta-init of {recipe} with {threads[0]} and {threads[1]} threads: the gap between the two runs' "
                  "training losses at a few steps, and between their θ*",
                  [("dtype", "dtype", ""), *[(f"at_{s}", f"loss gap at step {s}", ".1e") for s in steps],
                   ("last", "at the last step", ".1e"), ("theta", "θ* apart (relative L2)", ".3f")])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "dataselect", "ingest", "-q", "--recipe", recipe,
                        "--set", f"workdir={work}"], check=True, cwd=ROOT)
        for dtype in ("float32", "float64"):
            outs = []
            for n in threads:
                out = Path(tmp) / f"{dtype}-{n}"
                subprocess.run([sys.executable, "-m", "benchmarks", "reproduce", "--recipe", recipe, "--train",
                                str(work), str(out), dtype], check=True, env=_env(n), cwd=ROOT,
                               stderr=subprocess.DEVNULL)
                outs.append(FineTune(out))
            losses = [np.array(json.loads((o.folder / "losses.json").read_text())) for o in outs]
            gap = np.abs(losses[0] - losses[1])
            row = {"dtype": dtype, **{f"at_{s}": float(gap[s]) for s in steps if s < len(gap)},
                   "last": float(gap[-1]), "theta": relative_distance(outs[0].theta, outs[1].theta)}
            table.rows.append(row)
    results.add("meta_init", table)
