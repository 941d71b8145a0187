"""Sketch stores: chunks resume and read back, a store made with other settings is refused
(a real SIGKILL in the middle of a store: tests/test_crash.py)."""

import numpy as np
import pytest

from dataselect.store import SketchStore, StoreMismatch, read_store

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
