"""Crash safety: a build killed with SIGKILL during meta-init and in the middle of a sketch store
resumes without redoing finished work and ends with the stores and the mixture an uninterrupted
build writes, bit for bit; a run directory in use is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dataselect.artifacts import FineTune, Run, Sketches
from dataselect.pipeline import run_lock
from dataselect.recipe import RecipeError

from dataselect import build

from .conftest import DEMO, SMALL, demo_recipe

BIN = Path(sys.executable).parent
# The demo cut small, with sketch chunks of 16 rows so that each store has several.
SETTINGS = (*SMALL, "meta_init.epochs=3", "sketch.chunk_size=16", "select.confirm=0")  # no confirming fine-tunes: the kills are earlier


def _build(tmp: Path) -> subprocess.Popen:
    """The build as a user runs it, in its own process."""
    args = [str(BIN / "dataselect"), "build", "-r", str(DEMO), f"--set=workdir={tmp / 'run'}",
            f"--set=output.path={tmp / 'out'}", *(f"--set={s}" for s in SETTINGS)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"build ended before the kill point:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _half_written_store(run: Run, sources: list[str]) -> bool:
    """Whether some source's store has two chunks written and more to come."""
    unfinished = Sketches(run.unfinished_dir("sketch"))
    for source in sources:
        try:
            progress = json.loads((unfinished.source_store(source) / "progress.json").read_text())
        except (OSError, ValueError):  # not started, or being written
            continue
        if progress["chunks_done"] >= 2 and not progress["complete"]:
            return True
    return False


@pytest.mark.slow
def test_sigkill_in_meta_init_and_in_sketching_resumes_to_the_same_mixture(tmp_path):
    recipe = demo_recipe(tmp_path / "uninterrupted", *SETTINGS)
    summaries = build(recipe)
    run, sources = Run(tmp_path / "run"), [s.name for s in recipe.sources]
    shutil.copytree(recipe.run.stage_dir("ingest"), run.stage_dir("ingest"))  # the same recipe's: reused
    checkpoint = FineTune(run.unfinished_dir("meta_init")).checkpoint
    _kill_when(_build(tmp_path), checkpoint.exists)

    proc = _build(tmp_path)
    _kill_when(proc, lambda: _half_written_store(run, sources))
    log = proc.stdout.read()
    assert "training: resuming at step" in log  # the checkpoint was used, not training from scratch
    assert run.meta_init.theta.exists() and not run.unfinished_dir("meta_init").exists()

    proc = _build(tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "sketch: resuming the unfinished run" in out and "meta_init: reusing finished stage" in out
    assert f"fingerprint {summaries['export']['fingerprint']}" in out
    for source in sources:
        for name in ("sketches.npy", "f0.npy"):
            resumed = np.load(run.sketches.source_store(source) / name)
            assert np.array_equal(resumed, np.load(recipe.run.sketches.source_store(source) / name)), (source, name)


def test_a_run_directory_in_use_is_refused(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RecipeError, match="in use by another dataselect run"):
            with run_lock(tmp_path):
                pass
        probe = subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from dataselect.pipeline import run_lock\n"
            "try:\n  run_lock(Path(sys.argv[1])).__enter__()\nexcept Exception as e: print(e)"), str(tmp_path)],
            capture_output=True, text=True, timeout=60)
        assert "in use by another dataselect run" in probe.stdout
    with run_lock(tmp_path):  # released when the holder is done
        pass
