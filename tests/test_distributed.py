"""Sketching split over processes: two `--shard i/N` jobs and `torchrun --nproc_per_node 2` (gloo)
give stores equal to a single process's bit for bit, and the merge refuses incomplete shards.

Every process runs with OMP_NUM_THREADS=1, as torchrun sets it: CPU float reductions depend on
the thread count, so bit-equality holds between runs with the same threads per process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataselect.artifacts import Run
from dataselect.pipeline import run, run_shard
from dataselect.shards import Shard
from dataselect.store import StoreMismatch

from .conftest import DEMO, SMALL, demo_recipe

BIN = Path(sys.executable).parent
FAST = ("meta_init.epochs=1", "sketch.chunk_size=32", *SMALL)


def _start(*args: str, launcher: tuple[str, ...] = (str(BIN / "dataselect"),)) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([*launcher, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*jobs: subprocess.Popen) -> None:
    for job in jobs:
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out


def _dataselect(*args: str, launcher: tuple[str, ...] = (str(BIN / "dataselect"),)) -> None:
    _finish(_start(*args, launcher=launcher))


def _sets(folder: Path) -> list[str]:
    return [f"--set=workdir={folder / 'run'}", f"--set=output.path={folder / 'out'}", *(f"--set={s}" for s in FAST)]


def _store_files(folder: Path) -> dict[str, bytes]:
    root = Run(folder / "run").stage_dir("sketch")
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".npy", ".json")
            and p.name not in ("stage.json", "sketch_settings.json")}


@pytest.fixture(scope="module")
def meta_initialized(tmp_path_factory):
    """A demo run finished up to meta-init, and the single-process sketch of it."""
    base = tmp_path_factory.mktemp("dist")
    run(demo_recipe(base / "base", *FAST), until="meta_init")
    single = base / "single"
    shutil.copytree(base / "base", single)
    _dataselect("sketch", "-r", str(DEMO), "-q", *_sets(single))
    return base, _store_files(single)


def _copy(meta_initialized, name: str) -> Path:
    base, _ = meta_initialized
    folder = base / name
    shutil.copytree(base / "base", folder)
    return folder


@pytest.mark.slow
def test_two_shard_jobs_merge_into_the_single_process_store(meta_initialized):
    folder = _copy(meta_initialized, "shards")
    _finish(*(_start("sketch", "-r", str(DEMO), "-q", "--shard", f"{i}/2", *_sets(folder)) for i in range(2)))  # at once, as array jobs run
    _dataselect("sketch", "-r", str(DEMO), "-q", *_sets(folder))  # the merge, and the clustering after it
    merged = _store_files(folder)
    assert merged.keys() == meta_initialized[1].keys() and len(merged) > 10
    assert merged == meta_initialized[1]


@pytest.mark.slow
def test_torchrun_two_ranks_on_gloo_equals_the_single_process_store(meta_initialized):
    folder = _copy(meta_initialized, "torchrun")
    torchrun = (str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dataselect")
    _dataselect("sketch", "-r", str(DEMO), "-q", *_sets(folder), launcher=torchrun)
    assert _store_files(folder) == meta_initialized[1]


@pytest.mark.slow
def test_merge_refuses_until_every_shard_has_finished(meta_initialized):
    folder = _copy(meta_initialized, "partial")
    recipe = demo_recipe(folder, *FAST)
    summary = run_shard(recipe, Shard(1, 3))
    assert summary["chunks"] < summary["of"]
    with pytest.raises(StoreMismatch, match=r"shards 0/3, 2/3 have not finished"):
        run(recipe, until="sketch")


def test_shard_jobs_need_a_finished_meta_init(tmp_path):
    from dataselect.recipe import RecipeError

    with pytest.raises(RecipeError, match="meta-init"):
        run_shard(demo_recipe(tmp_path, *FAST), Shard(0, 2))


@pytest.mark.parametrize("text", ["2/2", "a/2", "1"])
def test_bad_shard_specs_are_refused(text):
    with pytest.raises(ValueError, match="i/N"):
        Shard.parse(text)
