"""Sketch stores: resume after a real SIGKILL, refusal of other settings."""

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

from dataselect.artifacts import Run, Sketches
from dataselect.store import SketchStore, StoreMismatch, read_store

from .conftest import DEMO

SETTINGS = {"seed": 0, "dim": 4, "projection": "kronecker_rademacher_hash", "model_sha256": "abc"}


def _store(tmp_path, settings=SETTINGS, ids=("a", "b", "c")):
    return SketchStore.open(tmp_path / "s", settings, list(ids), dim=4, chunk_rows=2)


def test_store_with_other_settings_is_refused_by_name(tmp_path):
    _store(tmp_path)
    with pytest.raises(StoreMismatch, match=r"dim: store has 4, asked for 8"):
        _store(tmp_path, {**SETTINGS, "dim": 8})
    with pytest.raises(StoreMismatch, match="other examples"):
        _store(tmp_path, ids=("a", "b", "x"))
    with pytest.raises(StoreMismatch, match="did not finish"):
        read_store(tmp_path / "s")


def test_chunks_resume_and_a_finished_store_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    store = _store(tmp_path)
    store.write_chunk(0, np.array([0, 1]), x[:2], np.zeros(2, np.float32))
    again = _store(tmp_path)  # a new process would reopen it like this
    assert list(again.pending_chunks()) == [1]
    again.write_chunk(1, np.array([2]), x[2:], np.ones(1, np.float32))
    again.finish()
    ids, sketches, f0 = read_store(tmp_path / "s", SETTINGS)
    assert ids == ["a", "b", "c"] and np.array_equal(sketches, x) and f0.tolist() == [0, 0, 1]
    with pytest.raises(StoreMismatch, match="model_sha256"):
        read_store(tmp_path / "s", {**SETTINGS, "model_sha256": "other"})


def _progress(run: Path, sources: list[str]) -> list[dict]:
    """The progress of each source store the unfinished sketch stage has opened so far."""
    unfinished = Sketches(Run(run).unfinished_dir("sketch"))
    found = []
    for source in sources:
        try:
            found.append(json.loads((unfinished.source_store(source) / "progress.json").read_text()))
        except (OSError, ValueError):
            pass
    return found


def test_sketching_killed_mid_run_resumes_to_identical_stores(demo_build, tmp_path):
    recipe, _, _ = demo_build
    run, sources = tmp_path / "run", [s.name for s in recipe.sources]
    for stage in ("ingest", "meta_init"):
        shutil.copytree(recipe.run.stage_dir(stage), Run(run).stage_dir(stage))
    cmd = [sys.executable, "-m", "dataselect.cli", "sketch", "-q", "--recipe", str(DEMO), "--set", f"workdir={run}",
           "--set", f"output.path={tmp_path / 'out'}", "--set", "sketch.chunk_size=16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(p["chunks_done"] >= 2 and not p["complete"] for p in _progress(run, sources)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "sketching finished before it could be killed"
    assert not Run(run).stage_dir("sketch").exists()
    resumed = subprocess.run(cmd[:4] + cmd[5:], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming the unfinished run" in resumed.stderr
    for source in sources:
        for name in ("sketches.npy", "f0.npy"):
            a = np.load(Run(run).sketches.source_store(source) / name)
            b = np.load(recipe.run.sketches.source_store(source) / name)
            assert np.array_equal(a, b), (source, name)
