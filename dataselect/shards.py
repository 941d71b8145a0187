"""Sketching on several processes or machines: which chunks a shard computes, and the merge.

The sketch stage's work is a list of chunks (every store's rows in fixed chunks, in order).
Shard i of N computes the chunks whose position in that list is i mod N, writes each as its own
file, and a `done-i-of-N.json` manifest when it has finished. The merge (the ordinary sketch
stage, in one process) checks that every shard of N finished with the same settings and that
every chunk is there, then writes the chunks into the stores exactly as a single process would.
Chunks are cut and batched the same way whoever computes them, so the merged stores equal a
single-process run's bit for bit (on the same hardware and kernels).

Shards come from `torchrun` / `accelerate launch` (RANK and WORLD_SIZE in the environment; gloo
on CPU, nccl on GPU) or from `--shard i/N`, one independent job each (e.g. a Slurm array).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .store import StoreMismatch, check_settings


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """`i/N`, e.g. `0/4` … `3/4` (a Slurm array passes ${SLURM_ARRAY_TASK_ID}/N)."""
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match or not int(match[1]) < int(match[2]):
            raise ValueError(f"--shard {text!r}: expected i/N with 0 ≤ i < N, e.g. 0/4")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_env(cls) -> "Shard":
        """The rank and world size torchrun and accelerate set; one process otherwise."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def owns(self, position: int) -> bool:
        return position % self.count == self.index


def init_process_group() -> None:
    """Join the launcher's process group (gloo on CPU, nccl with GPUs); waits for slow stages
    on other ranks (meta-initialization runs on rank 0 only) for up to a day."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=24))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def chunk_file(folder: Path, part: str, chunk: int) -> Path:
    return folder / part.replace(" ", "_") / f"chunk-{chunk:06d}.npz"


def save_chunk(path: Path, rows: np.ndarray, sketches: np.ndarray, f0: np.ndarray) -> None:
    """One computed chunk, written under a temporary name and renamed (no pickle inside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, rows=rows, sketches=sketches, f0=f0)
    os.replace(tmp, path)


def load_chunk(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["rows"], z["sketches"], z["f0"]


def write_done(folder: Path, shard: Shard, settings: dict, chunks: list[tuple[str, int]]) -> None:
    path = folder / f"done-{shard.index}-of-{shard.count}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"shard": shard.index, "count": shard.count, "settings": settings,
                               "chunks": [list(c) for c in chunks]}, indent=1))
    os.replace(tmp, path)


def check_complete(folder: Path, settings: dict, units: list[tuple[str, int]]) -> bool:
    """True when finished shards cover every chunk with these settings; False when there are no
    shards at all; an error naming what is missing or mismatched otherwise."""
    manifests = sorted(folder.glob("done-*-of-*.json"))
    if not manifests:
        return False
    found = [json.loads(p.read_text()) for p in manifests]
    counts = {m["count"] for m in found}
    if len(counts) != 1:
        raise StoreMismatch(f"{folder}: shards of different splits ({sorted(counts)} shards); remove the folder "
                            "and rerun the shard jobs with one N")
    count = counts.pop()
    missing = sorted(set(range(count)) - {m["shard"] for m in found})
    if missing:
        raise StoreMismatch(f"{folder}: shards {', '.join(f'{i}/{count}' for i in missing)} have not finished; "
                            f"run them (dataselect sketch --shard i/{count}) before merging")
    for m in found:
        check_settings(folder / f"done-{m['shard']}-of-{count}.json", {"settings": m["settings"]},
                       {"settings": settings})
    covered = {tuple(c) for m in found for c in m["chunks"]}
    absent = [u for u in units if u not in covered or not chunk_file(folder, *u).exists()]
    if absent:
        raise StoreMismatch(f"{folder}: {len(absent)} chunks missing from finished shards (first: {absent[0]}); "
                            "rerun the shard that owns them")
    return True
