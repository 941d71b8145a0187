"""Opening a source: one split of a Hub dataset, a local file (maybe compressed), a glob of files,
a folder, a saved dataset, the data files at an http(s) URL, or a demo dataset; and, when a local
file does not load, finding out why and naming the line at fault, so the user reads one sentence
instead of a datasets traceback. A remote source (Hub or URL) can also be opened as a stream
(`open_stream`), read only as far as it is iterated.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import fnmatch
import functools
import glob
import gzip
import io
import json
import logging
import lzma
import os
import urllib.parse
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import zstandard

from . import demo
from .artifacts import Run
from .errors import UserError

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_TEXT_BUILDERS = ("json", "csv")
# datasets decompresses these text data files on the fly; a parquet file is compressed inside already
_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
_BUILDERS = {**_FILE_BUILDERS, **{kind + c: builder for kind, builder in _FILE_BUILDERS.items()
                                  if builder in _TEXT_BUILDERS for c in _COMPRESSIONS}}
_SUPPORTED = (f"use one of {', '.join(_FILE_BUILDERS)}, or a .json, .jsonl or .csv file compressed as "
              f"{', '.join(_COMPRESSIONS[:-1])} or {_COMPRESSIONS[-1]}")
_EMPTY = "the file is empty (0 rows)"
_JSONL_HINT = "each line of a JSON Lines file must be one complete JSON object"
_UTF8_HINT = "save the file as UTF-8"
BAD_LINES_SHOWN = 20  # the bad lines a malformed file's error lists; the rest are counted
_HTTP_BLOCK = 1 << 20  # bytes per Range request: a stream that stops early downloads at most this much more


class SourceError(UserError, ValueError):
    """A dataset that cannot be opened, or a field the format names that it lacks."""


def open_dataset(dataset: str, config: str | None, split: str, run_dir: Path, seed: int):
    """One split of a Hub dataset, a local file (maybe compressed), a glob pattern of local files, a
    folder, a saved dataset, the data files at an http(s) URL (downloaded whole), or a demo dataset."""
    import datasets  # datasets takes seconds to import: only when a source is read

    if dataset.startswith("demo:"):
        dataset = str(demo.materialize(dataset.removeprefix("demo:"), Run(run_dir).demo_data, seed))
    path = Path(dataset).expanduser()
    try:
        if is_url(dataset):
            _train_only(dataset, split, "the files at a URL have")
            files, builder = url_files(dataset)
            return datasets.load_dataset(builder, data_files=files, split=split)
        if path.is_file():
            builder = _BUILDERS.get(_file_type(path))
            if builder is None:
                raise SourceError(f"{dataset}: unsupported file type {_file_type(path)!r}; {_SUPPORTED}")
            return _load_files(dataset, [path], builder, split, pattern=False)
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                saved = datasets.load_from_disk(str(path))
                if isinstance(saved, datasets.DatasetDict):
                    if split not in saved:
                        raise SourceError(f"{dataset}: no split {split!r}; it has {sorted(saved)}")
                    return saved[split]
                return saved
            return datasets.load_dataset(str(path), config, split=split)
        if any(c in dataset for c in "*?["):
            files, builder = _matching_files(dataset)
            return _load_files(dataset, files, builder, split, pattern=True)
        if dataset.startswith((".", "/", "~")) or path.suffix.lower() in (*_FILE_BUILDERS, *_COMPRESSIONS):
            raise SourceError(f"{dataset}: no such file or folder")
        return datasets.load_dataset(dataset, config, split=split)
    except SourceError:
        raise
    except Exception as e:  # datasets raises a zoo of types; keep the name and the cause
        raise SourceError(f"{dataset} (split {split!r}): cannot load: {_cause(e)}") from e


def _load_files(dataset: str, files: list[Path], builder: str, split: str, pattern: bool):
    """The 'train' split (or a slice of it) of local files of one builder: one file, or the files a
    glob pattern matched, in order. Problems name the file (after the pattern, for a pattern)."""
    import datasets  # datasets takes seconds to import: only when a source is read

    def at(file: Path) -> str:
        return f"{dataset}: {file}" if pattern else dataset

    _train_only(dataset, split, "the files a pattern matches have" if pattern else "a single file has")
    if not pattern and files[0].stat().st_size == 0:
        raise SourceError(f"{dataset}: {_EMPTY}")
    # pyarrow reads invalid UTF-8 into JSON strings unchecked; it would fail later, nameless
    not_utf8 = []
    for file in files if builder in _TEXT_BUILDERS else ():
        try:
            problem = _not_utf8(file)
        except _decompress_errors() as e:  # a corrupt or truncated .gz, .zst, ...: the whole stream was read
            raise SourceError(f"{at(file)}: cannot read it as {_file_type(file)}: {type(e).__name__}: {e}") from e
        if problem:
            not_utf8.append(f"{at(file)}: {problem}")
    if not_utf8:
        raise SourceError("\n".join(not_utf8))  # every file at fault in one run, not one per run
    data_files = [str(f) for f in files] if pattern else str(files[0])
    try:
        with _quiet_json_builder():
            return datasets.load_dataset(builder, data_files=data_files, split=split)
    except Exception as e:
        problems = [(f, _diagnose_file(f, builder)) for f in files]  # the lines at fault, found only now
        faults = [f"{at(file)}: {problem}" for file, problem in problems if problem and problem != _EMPTY]
        if faults:
            raise SourceError("\n".join(faults)) from e
        if problems and all(problem == _EMPTY for _, problem in problems):
            raise SourceError(f"{dataset}: {_EMPTY}" if not pattern else
                              f"{dataset}: all {len(files)} matching files are empty (0 rows)") from e
        noun = "the matching files have" if pattern else "the file has"
        if "[" in split:
            raise SourceError(f"{dataset}: split {split!r} is out of range or malformed ({_cause(e)}); "
                              f"{_row_count(builder, data_files, noun)}write a slice as 'train[:1000]', "
                              f"'train[100:200]' or 'train[:10%]'") from e
        if "corresponds to no data" in str(e):  # e.g. a CSV file with only its header line
            raise SourceError(f"{dataset}: {noun} 0 rows") from e
        raise


@contextlib.contextmanager
def _quiet_json_builder() -> Iterator[None]:
    """Silence datasets' JSON builder while it loads: on a malformed file it logs pyarrow's parse
    error ("Invalid encoding in string. in row 10", a row counted from 0 within a block) before it
    raises, which would print ahead of, and contradict, the diagnosis that names the lines."""
    logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _train_only(dataset: str, split: str, what: str) -> None:
    """Data files have one split, 'train', which may be sliced."""
    if split != "train" and not split.startswith("train["):
        raise SourceError(f"{dataset}: {what} only the 'train' split (or a slice such as "
                          f"'train[:1000]'), not {split!r}")


def is_url(dataset: str) -> bool:
    """An http(s) URL of data files, rather than a path, a Hub id or a demo."""
    return dataset.lower().startswith(("http://", "https://"))


def is_remote(dataset: str) -> bool:
    """A URL or a Hub dataset id: what `open_stream` can read, as `open_dataset` tells them apart."""
    if is_url(dataset):
        return True
    if dataset.startswith("demo:") or any(c in dataset for c in "*?[") or dataset.startswith((".", "/", "~")):
        return False
    path = Path(dataset).expanduser()
    return not path.exists() and path.suffix.lower() not in (*_FILE_BUILDERS, *_COMPRESSIONS)


def open_stream(dataset: str, config: str | None, split: str):
    """One split of a Hub dataset, or the data files at a URL, as a `datasets.IterableDataset`: nothing
    is downloaded up front, and iterating reads the files (shard by shard, in blocks) only as far as
    it goes, so a sample of a large remote dataset reads a small part of it."""
    import datasets  # datasets takes seconds to import: only when a source is read

    if "[" in split:
        raise SourceError(f"{dataset}: split {split!r}: a slice cannot be streamed; a remote source with "
                          "max_rows is streamed, so name the whole split (e.g. 'train') and let max_rows "
                          "draw the sample")
    try:
        if is_url(dataset):
            _train_only(dataset, split, "the files at a URL have")
            files, builder = url_files(dataset)
            # fsspec reads in blocks of 5 MiB by default: a smaller block wastes less per shard opened
            block = {"block_size": _HTTP_BLOCK}
            return datasets.load_dataset(builder, data_files=files, split=split, streaming=True,
                                         storage_options={"http": block, "https": block})
        return datasets.load_dataset(dataset, config, split=split, streaming=True)
    except SourceError:
        raise
    except Exception as e:  # datasets raises a zoo of types; keep the name and the cause
        raise SourceError(f"{dataset} (split {split!r}): cannot stream: {_cause(e)}") from e


def url_files(url: str) -> tuple[list[str], str]:
    """The data files a URL names and the one builder that reads them: one file, or the files of a
    folder that the URL's last part matches (a glob such as `shard-*.jsonl.gz`; nothing after a final
    `/`: every file of a supported type), listed from the folder's HTML index page (as
    `python -m http.server` and most static servers serve it), in name order."""
    import fsspec  # fsspec takes a tenth of a second to import: only for a URL

    _use_http_files()
    parts = urllib.parse.urlsplit(url)
    folder, _, name = parts.path.rpartition("/")
    if name and not any(c in name for c in "*?["):
        kind = _file_type(PurePosixPath(urllib.parse.unquote(name)))
        if kind not in _BUILDERS:
            folder_hint = "; for the files of a folder, end the URL with '/'" if not kind else ""
            raise SourceError(f"{url}: unsupported file type {kind!r}; {_SUPPORTED}{folder_hint}")
        return [url], _BUILDERS[kind]
    index = urllib.parse.urlunsplit(parts._replace(path=folder + "/", query="", fragment=""))
    try:  # fsspec lists the links of the index page, as full URLs of the folder's files and subfolders
        links = fsspec.filesystem(parts.scheme, use_listings_cache=False,
                                  client_kwargs={"trust_env": True}).ls(index, detail=False)
    except Exception as e:  # FileNotFoundError (HTTP 404) or one of aiohttp's errors
        reason = "HTTP 404, not found" if isinstance(e, FileNotFoundError) else str(e) or type(e).__name__
        raise SourceError(f"{url}: cannot list the folder {index}: {reason}") from e
    names = {urllib.parse.unquote(link[len(index):]) for link in links if link.startswith(index)
             and link != index and not any(c in link[len(index):] for c in "/?#")}  # no subfolder, sort link
    if name:
        matched = sorted(n for n in names if fnmatch.fnmatchcase(n, urllib.parse.unquote(name)))
    else:
        matched = sorted(n for n in names if _file_type(PurePosixPath(n)) in _BUILDERS)
    if not matched:
        raise SourceError(f"{url}: no file {'matches this pattern' if name else 'of a supported type'} in the "
                          f"folder's index page {index}")
    builder = _one_builder(url, [PurePosixPath(n) for n in matched])
    return [index + urllib.parse.quote(n) for n in matched], builder


def _file_type(path: Path | PurePosixPath) -> str:
    """The suffix that says how to read a file: '.jsonl', or '.jsonl.gz' when compressed."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSIONS:
        return suffixes[-2] + suffixes[-1]
    return path.suffix.lower()


def _matching_files(pattern: str) -> tuple[list[Path], str]:
    """The files a glob pattern matches, sorted by name so that shards keep their order, and the one
    builder that reads them all."""
    files = sorted((Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)),
                   key=str)
    if not files:
        where = "" if Path(pattern).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
        raise SourceError(f"{pattern}: no file matches this pattern{where}")
    return files, _one_builder(pattern, files)


def _one_builder(pattern: str, files: list[Path] | list[PurePosixPath]) -> str:
    """The one builder that reads all the files a pattern matched, or why there is none."""
    by_type: dict[str, list] = {}
    for file in files:
        by_type.setdefault(_file_type(file), []).append(file)
    builders = {_BUILDERS.get(kind) for kind in by_type}
    if len(builders) > 1 or None in builders and len(by_type) > 1:  # .jsonl with .jsonl.gz is one builder
        kinds = "; ".join(f"{kind}: {len(group)} ({group[0]}{', ...' if len(group) > 1 else ''})"
                          for kind, group in sorted(by_type.items()))
        raise SourceError(f"{pattern}: the matching files mix file types ({kinds}); "
                          "make the pattern match files of one type, such as '*.parquet'")
    kind, group = next(iter(by_type.items()))
    if None in builders:
        raise SourceError(f"{pattern}: unsupported file type {kind!r} ({group[0]}); {_SUPPORTED}")
    return builders.pop()


def _use_http_files() -> None:
    """Let datasets read http(s) URLs with fsspec's HTTP file system (on aiohttp), but asking whether
    a file exists by HEAD: see `_http_file_system`."""
    import fsspec  # fsspec takes a tenth of a second to import: only for a URL

    for protocol in ("http", "https"):
        fsspec.register_implementation(protocol, _http_file_system(), clobber=True)


@functools.cache
def _http_file_system() -> type:
    """fsspec's HTTP file system, whose `exists` sends a HEAD request instead of a GET: datasets asks
    it of every data file named before reading any, and a GET makes the server send each file whole,
    which a stream that reads a few shards must not cost. Made on first use, as fsspec and aiohttp
    are imported only for a URL."""
    from fsspec.implementations.http import HTTPFileSystem

    class HeadHTTPFileSystem(HTTPFileSystem):
        async def _exists(self, path: str, strict: bool = False, **kwargs: Any) -> bool:
            session = await self.set_session()
            options = {"allow_redirects": True, **self.kwargs, **kwargs}
            async with session.head(self.encode_url(path), **options) as response:
                status = response.status
                if strict and status not in (405, 501):
                    self._raise_not_found_for_status(response, path)
            if status in (405, 501):  # a server that does not answer HEAD: ask by GET, as fsspec does
                return await super()._exists(path, strict=strict, **kwargs)
            return status < 400  # connection errors are raised: the message says why, not "not found"

    return HeadHTTPFileSystem


def _open_bytes(path: Path) -> BinaryIO:
    """The bytes of a file as datasets reads them: decompressed when its name ends in a compression suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        reader = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # the bare reader cannot iterate lines
    return path.open("rb")


def _decompress_errors() -> tuple[type[BaseException], ...]:
    """What reading a corrupt or truncated compressed file raises, by format."""
    return (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def _cause(e: BaseException) -> str:
    """The message of an exception, with that of its root cause where datasets hides it behind
    "An error occurred while generating the dataset"."""
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = str(e) or type(e).__name__
    if type(e).__name__ == "DatasetGenerationError" and root is not e and str(root):
        text += f" ({type(root).__name__}: {root})"
    return text


def _row_count(builder: str, data_files: str | list[str], noun: str = "the file has") -> str:
    import datasets  # datasets takes seconds to import: only when a source is read

    try:
        n = len(datasets.load_dataset(builder, data_files=data_files, split="train"))
    except Exception:  # noqa: BLE001 - only a hint inside another error's message
        return ""
    return f"{noun} {n} row{'' if n == 1 else 's'}; "


def _not_utf8(path: Path) -> str | None:
    """Every line of a text file that is not UTF-8 ("line N: ..."), or None. A fast pass over the
    whole file first; the line-by-line pass runs only when it found something, and for JSON Lines
    it also names the lines that are not one JSON object, so one run reports every bad line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_bytes(path) as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
        return None
    except UnicodeDecodeError:
        pass
    found = _bad_lines(path, json_lines=_file_type(path).split(".")[1] == "jsonl")
    return _describe(*found) if found[1] else f"not UTF-8 text; {_UTF8_HINT}"


Problem = tuple[str, str | None]  # what is wrong where ("line 3: ..."), and how to fix it


def _line_problem(n: int, raw: bytes, json_lines: bool) -> Problem | None:
    """What is wrong with line `n` of a text file: not UTF-8, or (JSON Lines) not one JSON object
    of text pyarrow can hold; None when nothing is."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)", _UTF8_HINT
    if not json_lines:
        return None
    line = line.rstrip("\r\n")
    line = line.removeprefix("\ufeff") if n == 1 else line
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:  # "Invalid control character at": the position follows
        return f"line {n}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})", _JSONL_HINT
    if not isinstance(row, dict):
        return f"line {n}: a JSON {type(row).__name__}, not an object with one field per column", None
    if "\\ud" in line.lower():  # an escaped UTF-16 surrogate: Python accepts half a pair, pyarrow does not
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return (f"line {n}: a string holds half of a UTF-16 surrogate pair (an escape \\ud800-\\udfff "
                    "without its other half), which is not text"), None
    return None


def _bad_lines(path: Path, json_lines: bool) -> tuple[list[Problem], int]:
    """The first BAD_LINES_SHOWN bad lines of a text file (`_line_problem`), and how many there are."""
    shown, total = [], 0
    with _open_bytes(path) as f:
        for n, raw in enumerate(f, 1):
            problem = _line_problem(n, raw, json_lines)
            if problem:
                total += 1
                if len(shown) < BAD_LINES_SHOWN:
                    shown.append(problem)
    return shown, total


def _describe(shown: list[Problem], total: int, unit: str = "line") -> str:
    """One bad line as one sentence (what, where, how to fix it); several as a count and the fixes,
    then one line each, and how many more were not listed."""
    hints = list(dict.fromkeys(hint for _, hint in shown if hint))
    if total == 1:
        return "; ".join([shown[0][0], *hints])
    listed = "".join(f"\n  {what}" for what, _ in shown)
    rest = total - len(shown)
    more = f"\n  and {rest} more bad {unit}{'s' if rest > 1 else ''} (the first {len(shown)} are listed)" if rest else ""
    return f"{total} bad {unit}s{''.join(f'; {h}' for h in hints)}:{listed}{more}"


def _diagnose_file(path: Path, builder: str) -> str | None:
    """Why a local JSON, JSON Lines or CSV file (already known to be UTF-8) does not load, naming
    every bad line (up to BAD_LINES_SHOWN, then a count): a line that is not JSON or not an object,
    or no rows at all. None: none of these."""
    if builder not in _TEXT_BUILDERS:
        return None
    with _open_bytes(path) as f:
        if not any(raw.strip() for raw in f):
            return _EMPTY
    if builder == "csv":
        return None
    if _file_type(path).split(".")[1] == "json":  # one JSON document, or JSON Lines under a .json name
        try:
            with _open_bytes(path) as f:
                document = json.loads(f.read().decode("utf-8-sig"))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # past a syntax error a document cannot be read on: one error
                return f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg.removesuffix(' at')}"
        else:
            items = document if isinstance(document, list) else [document]
            bad = [(f"item {i} is a JSON {type(item).__name__}, not an object with one field per column", None)
                   for i, item in enumerate(items) if not isinstance(item, dict)]
            return _describe(bad[:BAD_LINES_SHOWN], len(bad), "item") if bad else None
    shown, total = _bad_lines(path, json_lines=True)
    return _describe(shown, total) if total else None
