"""Sources as they are stored (issue 14): compressed files, glob patterns of shards, folders of shards.

Each test writes small real files and reads them back through `open_dataset`, which must return the
rows written, in order; a file it cannot read must be a SourceError naming it, not a traceback.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
from pathlib import Path

import polars as pl
import pytest
import zstandard

from dataselect.sources import SourceError, open_dataset

COMPRESS = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress, ".bz2": bz2.compress,
            ".xz": lzma.compress}


def rows(n: int = 5, tag: str = "") -> list[dict[str, str]]:
    """String-only rows (CSV reads every column back as text) with non-ASCII text, which the UTF-8
    check must let through."""
    return [{"q": f"qué es {i}{tag}", "a": f"réponse {i}{tag} ✓"} for i in range(n)]


def encode(data: list[dict[str, str]], kind: str) -> bytes:
    """The rows as the bytes of a .jsonl, .json or .csv file."""
    if kind == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data).encode()
    if kind == ".json":
        return json.dumps(data, ensure_ascii=False).encode()
    out = io.BytesIO()
    pl.DataFrame(data).write_csv(out)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    """Write `data`, compressed as the name's last suffix says (.gz, .zst, ...), or as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = COMPRESS.get(path.suffix.lower())
    path.write_bytes(compress(data) if compress else data)
    return path


def read(dataset: str | Path, split: str = "train") -> list[dict]:
    return open_dataset(str(dataset), None, split, Path("unused-run-dir"), 0).to_list()


def write_shards(folder: Path, kind: str, n: int = 3) -> list[dict[str, str]]:
    """n shards named shard-0000K<kind>, written out of name order (so a reader that keeps directory
    order, not name order, shows); returns the rows in name order."""
    for k in reversed(range(n)):
        path = folder / f"shard-{k:05d}{kind}"
        if kind == ".parquet":
            folder.mkdir(parents=True, exist_ok=True)
            pl.DataFrame(rows(2, f"/{k}")).write_parquet(path)
        else:
            write(path, encode(rows(2, f"/{k}"), ".jsonl"))
    return [r for k in range(n) for r in rows(2, f"/{k}")]


# --- 1. compressed single files ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["x.jsonl.gz", "x.jsonl.zst", "x.json.gz", "x.csv.gz", "x.jsonl.bz2",
                                  "x.json.xz", "X.JSONL.GZ"])
def test_a_compressed_file_reads_back_the_rows_written(tmp_path, name):
    kind = "." + name.lower().split(".")[1]
    path = write(tmp_path / name, encode(rows(), kind))
    assert read(path) == rows()


def test_a_slice_of_a_compressed_file_reads_only_its_rows(tmp_path):
    path = write(tmp_path / "x.jsonl.zst", encode(rows(), ".jsonl"))
    assert read(path, "train[1:3]") == rows()[1:3]


# --- 2. glob patterns -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [".parquet", ".jsonl.gz"])
def test_a_glob_reads_every_matching_shard_in_name_order(tmp_path, kind):
    expected = write_shards(tmp_path / "data", kind)
    pl.DataFrame(rows(1, "/not matched")).write_parquet(tmp_path / "data" / "other.parquet")
    write(tmp_path / "data" / "other.jsonl.gz", encode(rows(1, "/not matched"), ".jsonl"))
    assert read(tmp_path / "data" / f"shard-*{kind}") == expected


def test_a_relative_glob_is_read_from_the_working_folder(tmp_path, monkeypatch):
    expected = write_shards(tmp_path / "data", ".jsonl.gz")
    monkeypatch.chdir(tmp_path)
    assert read("data/*.jsonl.gz") == expected
    assert read("data/*.jsonl.gz", "train[2:4]") == expected[2:4]


def test_plain_and_compressed_shards_of_one_format_mix(tmp_path):
    """One builder reads both, so a pattern may match a folder half compressed."""
    write(tmp_path / "d" / "a.jsonl", encode(rows(2, "/a"), ".jsonl"))
    write(tmp_path / "d" / "b.jsonl.gz", encode(rows(2, "/b"), ".jsonl"))
    assert read(tmp_path / "d" / "*.jsonl*") == rows(2, "/a") + rows(2, "/b")


def test_a_glob_that_matches_nothing_names_the_pattern(tmp_path, monkeypatch):
    write_shards(tmp_path / "data", ".parquet")
    pattern = str(tmp_path / "data" / "*.jsonl.gz")
    with pytest.raises(SourceError, match=f"^{re.escape(pattern)}: no file matches this pattern$"):
        read(pattern)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"^nope/\*\.parquet: no file matches this pattern \(relative to "):
        read("nope/*.parquet")


def test_a_glob_that_matches_mixed_types_names_the_pattern_and_the_types(tmp_path):
    write_shards(tmp_path / "data", ".parquet")
    write(tmp_path / "data" / "shard-extra.jsonl", encode(rows(1), ".jsonl"))
    pattern = str(tmp_path / "data" / "shard-*")
    with pytest.raises(SourceError) as e:
        read(pattern)
    message = str(e.value)
    assert message.startswith(f"{pattern}: the matching files mix file types (")
    assert ".jsonl: 1 (" in message and ".parquet: 3 (" in message


def test_a_glob_of_an_unsupported_type_names_it(tmp_path):
    write(tmp_path / "a.txt", b"words\n")
    with pytest.raises(SourceError, match=r"\*\.txt: unsupported file type '\.txt' \(.*a\.txt\); use one of"):
        read(tmp_path / "*.txt")


def test_a_bad_line_in_one_shard_names_the_pattern_and_the_shard(tmp_path):
    write_shards(tmp_path / "data", ".jsonl.gz")
    bad = write(tmp_path / "data" / "shard-00001.jsonl.gz", encode(rows(1), ".jsonl") + b'{"q": "x", "a": \n')
    pattern = str(tmp_path / "data" / "*.jsonl.gz")
    with pytest.raises(SourceError, match=f"^{re.escape(f'{pattern}: {bad}')}: line 2: not valid JSON"):
        read(pattern)


def test_a_glob_has_only_the_train_split(tmp_path):
    write_shards(tmp_path, ".parquet")
    with pytest.raises(SourceError, match="only the 'train' split .* not 'validation'"):
        read(tmp_path / "*.parquet", "validation")


# --- 3. folders of shards ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", [".parquet", ".jsonl.gz"])
def test_a_folder_of_shards_reads_every_row_in_name_order(tmp_path, kind):
    expected = write_shards(tmp_path / "data", kind)
    assert read(tmp_path / "data") == expected


def test_a_folder_with_no_data_files_names_the_folder(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SourceError, match=f"^{re.escape(str(tmp_path / 'data'))} .*doesn't contain any data files"):
        read(tmp_path / "data")


# --- files that cannot be read ----------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("x.jsonl.gz", b"this was never gzip"),
    ("x.jsonl.gz", gzip.compress(encode(rows(50), ".jsonl"))[:-40]),  # cut short
    ("x.jsonl.zst", b"(\xb5/\xfd garbage"),
    ("x.csv.xz", b"not xz"),
], ids=["not-gzip", "truncated-gzip", "corrupt-zst", "not-xz"])
def test_a_corrupt_compressed_file_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SourceError, match=f"^{re.escape(f'{path}: cannot read it as {Path(name).suffixes[0]}')}"):
        read(path)


@pytest.mark.parametrize("content, message", [
    (b'{"q": "a", "a": "b"}\n{"q": "caf\xe9", "a": "d"}\n',
     "line 2: not UTF-8 text (byte 0xe9 at byte 11 of the line); save the file as UTF-8"),
    (b'{"q": "a", "a": "b"}\n{"q": "c" "a": "d"}\n',
     "line 2: not valid JSON (Expecting ',' delimiter at column 11); "
     "each line of a JSON Lines file must be one complete JSON object"),
    (b"\n  \n", "the file is empty (0 rows)"),
], ids=["latin1", "bad-json", "blank"])
def test_a_bad_line_in_a_compressed_file_names_the_file_and_line(tmp_path, content, message):
    path = write(tmp_path / "x.jsonl.gz", content)
    with pytest.raises(SourceError) as e:
        read(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("name, kind", [("x.txt.gz", ".txt.gz"), ("x.parquet.gz", ".parquet.gz"),
                                        ("x.gz", ".gz")])
def test_an_unsupported_compressed_type_is_named(tmp_path, name, kind):
    path = write(tmp_path / name, b"x")
    with pytest.raises(SourceError, match=f"^{re.escape(f'{path}: unsupported file type {kind!r}; use one of ')}"):
        read(path)


def test_a_missing_compressed_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="^data/nope.jsonl.gz: no such file or folder$"):
        read("data/nope.jsonl.gz")
