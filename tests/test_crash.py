"""Crash safety: a build killed with SIGKILL during meta-init and during sketching resumes without
redoing finished work and ends with the mixture an uninterrupted build writes; a run directory
in use is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataselect.artifacts import FineTune, Run, Sketches
from dataselect.pipeline import run_lock
from dataselect.recipe import RecipeError

from .conftest import DEMO

BIN = Path(sys.executable).parent


def _build(tmp: Path) -> subprocess.Popen:
    args = [str(BIN / "dataselect"), "build", "-r", str(DEMO), f"--set=workdir={tmp / 'run'}",
            f"--set=output.path={tmp / 'out'}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"build ended before the kill point:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _sketched_chunks(run: Run, sources: list[str]) -> int:
    import json

    unfinished = Sketches(run.unfinished_dir("sketch"))
    files = [unfinished.source_store(source) / "progress.json" for source in sources]
    return sum(json.loads(f.read_text())["chunks_done"] for f in files if f.exists())


def test_sigkill_in_meta_init_and_in_sketching_resumes_to_the_same_mixture(demo_build, tmp_path):
    recipe, summaries, _ = demo_build
    run, sources = Run(tmp_path / "run"), [s.name for s in recipe.sources]
    checkpoint = FineTune(run.unfinished_dir("meta_init")).checkpoint
    _kill_when(_build(tmp_path), checkpoint.exists)

    proc = _build(tmp_path)
    _kill_when(proc, lambda: _sketched_chunks(run, sources) >= 2)
    log = proc.stdout.read()
    assert "meta-init: resuming at step" in log  # the checkpoint was used, not training from scratch
    assert run.meta_init.theta.exists() and not run.unfinished_dir("meta_init").exists()

    proc = _build(tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "sketch: resuming the unfinished run" in out and "meta_init: reusing finished stage" in out
    assert f"fingerprint {summaries['export']['fingerprint']}" in out


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
