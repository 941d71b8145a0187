"""`sources[].max_rows` as a seeded, stratified sample, and a remote source streamed for it.

A local file is sampled in memory (numpy's seeded Generator, stratified by `group_by`). A URL of
data files is streamed: here from a real HTTP server on 127.0.0.1 (`http.server` in a thread,
serving what fsspec's HTTP file system asks: HEAD for a file's size, HTTP Range requests, as it
reads remote files in blocks, and a folder's HTML index page) that serves shards of JSON Lines
compressed with gzip and counts every byte it sends, so the tests can say how much of the dataset
a sample downloaded. A Hub id is streamed from the Hub stand-in (tests/hub_standin.py), through
datasets' own Hub loader. Nothing here touches the network beyond those loopback servers.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import zstandard

from dataselect.ingest import _source_rows, allocate, read_examples
from dataselect.pipeline import run
from dataselect.recipe import Fields, Source, load_recipe
from dataselect.sources import SourceError, is_remote, open_stream

from .conftest import write_jsonl, write_small_recipe
from .hub_standin import HubStandIn

QA = {"prompt": "question", "response": "answer"}
PLANTED = {"alpha": 500, "beta": 300, "gamma": 150, "delta": 45, "epsilon": 5}  # 1,000 rows
SHARDS, SHARD_ROWS = 50, 200  # the served dataset: 10,000 rows


# --- data and recipes ------------------------------------------------------------------------

def planted_rows(n_by_group: dict[str, int], seed: int = 0) -> list[dict]:
    """Rows of groups of the given sizes, in a shuffled order; row i's question names i."""
    topics = [topic for topic, n in n_by_group.items() for _ in range(n)]
    random.Random(seed).shuffle(topics)
    return [{"question": f"question {i} about {topic}", "answer": f"answer {i}", "topic": topic}
            for i, topic in enumerate(topics)]


def make_recipe(tmp: Path, source: dict[str, Any]) -> Path:
    """A recipe with a tiny model, the one source given (name `pool`) and a small local target."""
    target = write_jsonl(tmp / "target.jsonl", [{"question": f"target {i}", "answer": f"t{i}"} for i in range(12)])
    return write_small_recipe(tmp, "streaming", [{"name": "pool", "format": QA, **source}], target, QA, max_length=64)


def ingest(recipe_path: Path, workdir: Path, *overrides: str) -> tuple[dict, pl.DataFrame]:
    """Run the ingest stage into `workdir`: (its summary, the source's ingested examples)."""
    recipe = load_recipe(recipe_path, [f"workdir={workdir}", *overrides])
    summary = run(recipe, until="ingest")["ingest"]
    return summary, recipe.run.ingested.examples().filter(pl.col("role") == "source")


def sample(path: Path, seed: int, max_rows: int | None = 100, group_by: str | None = "topic") -> tuple[list, dict]:
    source = Source(name="pool", dataset=str(path), format=Fields(**QA), group_by=group_by, max_rows=max_rows)
    rows, sampling = _source_rows(source, path.parent, seed)
    return list(rows), sampling


# --- the local sample ------------------------------------------------------------------------

@pytest.mark.parametrize("counts, n, expected", [
    ([500, 300, 150, 45, 5], 100, [50, 30, 15, 4, 1]),  # delta's .5 wins the tie, then gives epsilon its one
    ([6, 3, 1], 5, [3, 1, 1]),
    ([5, 5, 5], 3, [1, 1, 1]),
    ([90, 5, 5], 2, [2, 0, 0]),  # fewer rows than groups: the budget cannot give each one
    ([4, 0, 2], 10, [4, 0, 2]),  # n covers every row
    ([7], 3, [3]),
])
def test_allocation_is_proportional_with_largest_remainders(counts, n, expected):
    out = allocate(counts, n)
    assert out == expected
    assert sum(out) == min(n, sum(counts)) and all(0 <= k <= c for k, c in zip(out, counts))


def test_max_rows_is_a_seeded_stratified_sample(tmp_path):
    rows = planted_rows(PLANTED)
    path = write_jsonl(tmp_path / "pool.jsonl", rows)
    first, sampling = sample(path, seed=0)
    assert len(first) == 100 and all(r["status"] == "ok" for r in first)
    assert Counter(r["group"] for r in first) == {"pool/alpha": 50, "pool/beta": 30, "pool/gamma": 15,
                                                  "pool/delta": 4, "pool/epsilon": 1}
    numbers = [r["row"] for r in first]
    assert numbers == sorted(numbers) and numbers != list(range(100))  # file order, not the first rows
    assert all(r["id"] == f"pool/{r['row']}" and r["prompt"] == rows[r["row"]]["question"] for r in first)
    assert sampling == {"max_rows": 100, "streamed": False, "stratified_by": "topic", "available": 1000,
                        "read": 1000, "how": "seeded sample", "kept": 100, "seed": sampling["seed"]}

    again, sampling_again = sample(path, seed=0)
    assert [r["id"] for r in again] == [r["id"] for r in first] and sampling_again == sampling
    other, sampling_other = sample(path, seed=1)
    assert {r["id"] for r in other} != {r["id"] for r in first} and sampling_other["seed"] != sampling["seed"]
    assert Counter(r["group"] for r in other) == Counter(r["group"] for r in first)  # the same shares

    plain, plain_sampling = sample(path, seed=0, group_by=None)
    assert len(plain) == 100 and plain_sampling["stratified_by"] is None
    everything, all_sampling = sample(path, seed=0, max_rows=5000)
    assert len(everything) == 1000 and all_sampling["how"] == "all rows" and all_sampling["seed"] is None


def test_the_ingest_summary_records_the_sample(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", planted_rows(PLANTED))
    summary, examples = ingest(make_recipe(tmp_path, {"dataset": str(path), "group_by": "topic", "max_rows": 60}),
                               tmp_path / "run")
    assert examples.height == 60 and summary["rows"]["pool"]["rows"] == 60
    assert summary["sampling"]["pool"] | {"seed": None} == {
        "max_rows": 60, "how": "seeded sample", "streamed": False, "stratified_by": "topic", "available": 1000,
        "read": 1000, "kept": 60, "seed": None}
    assert dict(Counter(examples["group"])) == {"pool/alpha": 30, "pool/beta": 18, "pool/gamma": 9,
                                               "pool/delta": 2, "pool/epsilon": 1}


# --- a remote source, streamed ---------------------------------------------------------------

class _CountingWriter:
    """The handler's socket writer, counting every byte written (status line, headers, body)."""

    def __init__(self, inner, server: "FileServer") -> None:
        self._inner, self._server = inner, server

    def write(self, data: bytes) -> int:
        n = self._inner.write(data)
        with self._server.lock:
            self._server.sent += len(data)
        return n

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _Handler(SimpleHTTPRequestHandler):
    """Static files and index pages, plus single HTTP Range requests (`bytes=a-b`, `bytes=a-`)."""

    server: "FileServer"

    def setup(self) -> None:
        super().setup()
        self.wfile = _CountingWriter(self.wfile, self.server)

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def send_head(self):
        with self.server.lock:
            self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if not path.is_file() or match is None:
            return super().send_head()
        size = path.stat().st_size
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        if start >= size:
            self.send_error(416)
            return None
        f = path.open("rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Part(f, end - start + 1)


class _Part:
    """The first `n` bytes of an open file, read as `copyfile` reads."""

    def __init__(self, f, n: int) -> None:
        self.f, self.n = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.n if size < 0 else min(size, self.n)
        self.n -= size
        return self.f.read(size) if size else b""

    def close(self) -> None:
        self.f.close()


class FileServer(ThreadingHTTPServer):
    """A folder served on 127.0.0.1 in a thread; `sent`: bytes sent so far, `requests`: what came."""

    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
        self.sent = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.data = self.url  # the URL of the data folder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.sent, self.requests = 0, []

    def handle_error(self, request, client_address) -> None:  # a client that hung up early: not a failure
        pass


def write_shards(folder: Path) -> list[Path]:
    """SHARDS gzip JSON Lines shards of SHARD_ROWS rows each, with a topic column and some bulk."""
    folder.mkdir(parents=True)
    rnd = random.Random(0)
    for s in range(SHARDS):
        with gzip.open(folder / f"shard-{s:02d}.jsonl.gz", "wt") as f:
            for i in range(SHARD_ROWS):
                words = " ".join(rnd.choice(["red", "green", "blue", "amber", "violet"]) for _ in range(3))
                f.write(json.dumps({"uid": f"{s}-{i}", "question": f"shard {s} row {i}: {words}?",
                                    "answer": f"{rnd.random():.6f}", "topic": rnd.choice("xyz"),
                                    "notes": rnd.randbytes(150).hex()}) + "\n")  # bulk, as real rows have
    return sorted(folder.glob("*.jsonl.gz"))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[FileServer, dict[str, int]]]:
    """SHARDS gzip JSON Lines shards of SHARD_ROWS rows each, served in a folder at `server.data`:
    (server, each shard's size). The folder's name is new each session: datasets caches a downloaded
    URL by its name alone, and a later session may get the same port."""
    root = tmp_path_factory.mktemp("served")
    folder = root / f"data-{uuid.uuid4().hex[:12]}"
    write_shards(folder)
    (folder / "README.md").write_text("not data")
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.jsonl.gz")}
    single = [{"uid": f"u{i}", "question": f"question {i}", "answer": f"answer {i}", "topic": "xyz"[i % 3]}
              for i in range(3000)]
    pl.DataFrame(single).write_parquet(root / "pool.parquet", row_group_size=100)  # 30 row groups: the stream's shards
    (root / "pool.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in single).encode()))
    server = FileServer(root)
    server.data = f"{server.url}/{folder.name}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, sizes
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.mark.slow
def test_a_url_source_with_max_rows_is_streamed_and_reads_little(served, tmp_path):
    server, sizes = served
    total = sum(sizes.values())
    url = f"{server.data}/shard-*.jsonl.gz"
    assert is_remote(url) and not is_remote(str(tmp_path))
    recipe = make_recipe(tmp_path, {"dataset": url, "max_rows": 50,
                                    "format": {**QA, "id": "uid"}})
    server.reset()
    summary, examples = ingest(recipe, tmp_path / "run")
    sent, requests = server.sent, list(server.requests)
    assert examples.height == 50 and (examples["status"] == "ok").all()
    sampling = summary["sampling"]["pool"]
    assert sampling["streamed"] and sampling["kept"] == 50 and sampling["available"] is None
    assert 50 < sampling["read"] <= sampling["buffer"] + 50 + 2 * 10  # B + max_rows, and a row or two per shard ahead
    assert sent < total / 3, f"sent {sent} bytes of {total}: the sample downloaded most of the dataset"
    shards_read = {path for method, path, _ in requests if method == "GET" and path.endswith(".jsonl.gz")}
    assert len(shards_read) <= 11  # up to 10 interleaved, and the first for the schema
    assert all(r for method, path, r in requests if method == "GET" and path.endswith(".jsonl.gz"))  # no whole file
    assert len({uid.split("-")[0] for uid in examples["id"].str.split("/").list.last()}) > 3  # many shards

    _, again = ingest(recipe, tmp_path / "rerun")
    assert again["id"].to_list() == examples["id"].to_list()
    _, other = ingest(recipe, tmp_path / "other", "seed=1")
    assert other.height == 50 and set(other["id"]) != set(examples["id"])


@pytest.mark.slow
def test_a_streamed_sample_is_stratified_within_its_window(served, tmp_path):
    server, sizes = served
    total = sum(sizes.values())
    source = Source(name="pool", dataset=f"{server.data}/", format=Fields(**QA), group_by="topic", max_rows=30)
    server.reset()
    rows, sampling = _source_rows(source, tmp_path, 0)
    rows = list(rows)
    assert len(rows) == 30 and server.sent < total / 3
    assert sampling["read"] <= 2 * sampling["buffer"] + 2 * 10  # B + W, W = max(B, 2·30) = B
    counts = Counter(r["group"] for r in rows)
    assert set(counts) == {"pool/x", "pool/y", "pool/z"} and all(8 <= k <= 12 for k in counts.values())
    again, _ = _source_rows(source, tmp_path, 0)
    assert [r["prompt"] for r in again] == [r["prompt"] for r in rows]
    other, _ = _source_rows(source, tmp_path, 1)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in rows]


@pytest.mark.parametrize("name", [pytest.param("pool.parquet", marks=pytest.mark.slow), "pool.jsonl.zst"])
def test_one_remote_file_of_another_type_is_streamed(served, tmp_path, name, monkeypatch):
    """A parquet file is read by row group (the stream's shards, shuffled), by HTTP Range requests."""
    import datasets

    # datasets waits 5 s after each parquet stream for pyarrow's threads to close (apache/arrow#45214);
    # this test reads two streams of a few row groups each, and keeps 1 s of that wait
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 1)
    server, _ = served
    source = Source(name="pool", dataset=f"{server.url}/{name}", format=Fields(**QA, id="uid"), max_rows=20)
    server.reset()
    rows, sampling = _source_rows(source, tmp_path, 0)
    rows = list(rows)
    assert len(rows) == 20 and all(r["status"] == "ok" for r in rows) and sampling["streamed"]
    assert sampling["read"] <= sampling["buffer"] + 20 + 2 * 10
    assert any(path == f"/{name}" and (r or "").startswith("bytes=") for _, path, r in server.requests)
    assert [r["id"] for r in list(_source_rows(source, tmp_path, 0)[0])] == [r["id"] for r in rows]


def test_without_max_rows_a_url_is_read_whole(served, tmp_path):
    """Today's behaviour, kept: all rows; and the server's count shows what a full read sends."""
    server, sizes = served
    recipe = load_recipe(make_recipe(tmp_path, {"dataset": f"{server.data}/shard-0*.jsonl.gz"}))
    server.reset()
    examples = read_examples(recipe)[0].filter(pl.col("role") == "source")
    assert examples.height == 10 * SHARD_ROWS  # shards 00 to 09
    assert server.sent >= sum(size for name, size in sizes.items() if name.startswith("shard-0"))


def test_remote_errors_name_the_url(served, tmp_path):
    server, _ = served
    with pytest.raises(SourceError, match="a slice cannot be streamed"):
        open_stream(f"{server.data}/shard-00.jsonl.gz", None, "train[:100]")
    with pytest.raises(SourceError, match=r"no file matches this pattern in the folder's index page"):
        open_stream(f"{server.data}/nothing-*.parquet", None, "train")
    with pytest.raises(SourceError, match=r"unsupported file type '\.md'"):
        open_stream(f"{server.data}/README.md", None, "train")
    with pytest.raises(SourceError, match="only the 'train' split"):
        open_stream(f"{server.data}/shard-00.jsonl.gz", None, "test")
    missing = Source(name="pool", dataset=f"{server.data}/missing.jsonl.gz", format=Fields(**QA), max_rows=5)
    with pytest.raises(SourceError, match=r"source pool: .*missing\.jsonl\.gz"):
        _source_rows(missing, tmp_path, 0)


@pytest.fixture
def hub_pool(tmp_path, monkeypatch) -> Iterator[tuple[HubStandIn, int]]:
    """The same shards as a dataset repo `alice/pool` on the Hub stand-in (tests/hub_standin.py),
    with huggingface_hub and datasets pointed at it: (the stand-in, the shards' total bytes)."""
    import datasets
    import huggingface_hub
    from huggingface_hub import HfFileSystem

    files = {f"data/train-{i:05d}-of-{SHARDS:05d}.jsonl.gz": path.read_bytes()
             for i, path in enumerate(write_shards(tmp_path / "shards"))}
    with HubStandIn() as hub:
        hub.add_dataset("alice/pool", files)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)
        HfFileSystem.clear_instance_cache()  # an instance keeps the endpoint it was made with
        yield hub, sum(len(data) for data in files.values())
        HfFileSystem.clear_instance_cache()


@pytest.mark.slow
def test_a_hub_dataset_with_max_rows_is_streamed_and_reads_little(hub_pool, tmp_path):
    """A Hub id goes through datasets' Hub loader (repo info, tree listing, Range reads of the
    shards), as for a real Hub dataset; the sample reads a small part of the repo's bytes, and a
    rerun draws the same rows."""
    hub, total = hub_pool
    assert is_remote("alice/pool")
    recipe = make_recipe(tmp_path, {"dataset": "alice/pool", "max_rows": 50, "format": {**QA, "id": "uid"}})
    summary, examples = ingest(recipe, tmp_path / "run")
    assert examples.height == 50 and (examples["status"] == "ok").all()
    sampling = summary["sampling"]["pool"]
    assert sampling["streamed"] and sampling["kept"] == 50
    assert 50 < sampling["read"] <= sampling["buffer"] + 50 + 2 * 10
    sent = hub.bytes_served["alice/pool"]
    assert 0 < sent < total / 3, f"sent {sent} bytes of {total}: the sample downloaded most of the dataset"
    reads = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(".jsonl.gz")]
    assert reads and all(r.headers.get("range", "").startswith("bytes=") for r in reads)  # no whole file
    assert len({uid.split("-")[0] for uid in examples["id"].str.split("/").list.last()}) > 3  # many shards

    _, again = ingest(recipe, tmp_path / "rerun")
    assert again["id"].to_list() == examples["id"].to_list()
