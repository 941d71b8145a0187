"""A sketch store: one folder per source with memory-mapped sketches, F⁰ and ids.

`store.json` records everything the numbers depend on (model and adapter hashes, seed,
dimension, projection, parameter set, output function). Opening a store with other settings is
refused rather than mixing sketches from two runs. Rows are written in chunks; `progress.json`
names the chunks finished, so a run killed at any point resumes at the next chunk and ends with
the same arrays as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import UserError

# A store's files, named here only: the format is this module's.
SETTINGS, SKETCHES, F0, IDS, PROGRESS = "store.json", "sketches.npy", "f0.npy", "ids.json", "progress.json"


class StoreMismatch(UserError, RuntimeError):
    """A store on disk was made with other settings than the ones asked for."""


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class SketchStore:
    def __init__(self, folder: Path, settings: dict, ids: list[str], dim: int, chunk_rows: int):
        self.folder, self.settings, self.ids, self.dim, self.chunk_rows = Path(folder), settings, ids, dim, chunk_rows

    @classmethod
    def open(cls, folder: Path, settings: dict, ids: list[str], dim: int, chunk_rows: int) -> "SketchStore":
        """Create a store, or reopen a partial one made with exactly these settings and rows."""
        store = cls(folder, settings, ids, dim, chunk_rows)
        recorded = store.folder / SETTINGS
        wanted = {"settings": settings, "rows": len(ids), "dim": dim, "chunk_rows": chunk_rows}
        if recorded.exists():
            found = json.loads(recorded.read_text())
            check_settings(store.folder, found, wanted)
            if json.loads((store.folder / IDS).read_text()) != ids:
                raise StoreMismatch(f"{store.folder}: holds sketches of other examples; remove it to re-sketch")
            return store
        store.folder.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(store.folder / SKETCHES, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        np.lib.format.open_memmap(store.folder / F0, mode="w+", dtype=np.float32, shape=(len(ids),))
        (store.folder / IDS).write_text(json.dumps(ids))
        _write_json(store.folder / PROGRESS, {"chunks_done": 0, "complete": False})
        _write_json(recorded, wanted)
        return store

    @property
    def n_chunks(self) -> int:
        return -(-len(self.ids) // self.chunk_rows)

    def progress(self) -> dict:
        return json.loads((self.folder / PROGRESS).read_text())

    def pending_chunks(self) -> Iterator[int]:
        yield from range(self.progress()["chunks_done"], self.n_chunks)

    def write_chunk(self, chunk: int, rows: np.ndarray, sketches: np.ndarray, f0: np.ndarray) -> None:
        """Write one chunk's rows, flush them to disk, then record the chunk as done."""
        assert chunk == self.progress()["chunks_done"], "chunks are written in order"
        for name, values in ((SKETCHES, sketches), (F0, f0)):
            array = np.load(self.folder / name, mmap_mode="r+")
            array[rows] = values
            array.flush()
            del array
        _write_json(self.folder / PROGRESS, {"chunks_done": chunk + 1, "complete": False})

    def finish(self) -> None:
        """Mark the store done: readers refuse a store until then."""
        _write_json(self.folder / PROGRESS, {"chunks_done": self.n_chunks, "complete": True})


def check_settings(folder: Path, found: dict, wanted: dict) -> None:
    """Refuse a store whose recorded settings differ, naming each difference."""
    diffs = []
    for key in sorted(set(found) | set(wanted)):
        if key == "settings":
            for k in sorted(set(found.get(key, {})) | set(wanted.get(key, {}))):
                a, b = found.get(key, {}).get(k), wanted.get(key, {}).get(k)
                if a != b:
                    diffs.append(f"{k}: store has {a!r}, asked for {b!r}")
        elif found.get(key) != wanted.get(key):
            diffs.append(f"{key}: store has {found.get(key)!r}, asked for {wanted.get(key)!r}")
    if diffs:
        raise StoreMismatch(f"{folder}: sketch store made with other settings; refusing to mix them:\n  "
                            + "\n  ".join(diffs))


def read_store(folder: Path, settings: dict | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, sketches memory-mapped, F⁰) of a finished store, checked against `settings` if given."""
    folder = Path(folder)
    recorded = json.loads((folder / SETTINGS).read_text())
    if settings is not None:
        check_settings(folder, {"settings": recorded["settings"]}, {"settings": settings})
    if not json.loads((folder / PROGRESS).read_text())["complete"]:
        raise StoreMismatch(f"{folder}: sketching did not finish; rerun the sketch stage to resume it")
    return (json.loads((folder / IDS).read_text()), np.load(folder / SKETCHES, mmap_mode="r"),
            np.load(folder / F0))
