"""Near-duplicate rows within and across sources, and source rows that copy the target's splits.

Why: a mixture that repeats itself spends its budget twice on the same row, and a source row that
copies a target validation or test row makes the estimates (validation) or any evaluation on the
test split look better than they are (contamination). Both are reported in the manifest, never
acted on: no row's selection changes because of them.

How, in vectorised steps:

1. Each usable row's text (every non-system turn; prompt and response for a table without
   `messages`) is normalised: lowercased, split into words and punctuation marks. Rows with the
   same normalised text are exact duplicates, found by grouping on it: always, whatever step 3
   returns. The later steps work on the distinct texts only.
2. A distinct text becomes the set of its hashed word `NGRAM`-grams (word hashes from
   `zlib.crc32`/`zlib.adler32`, combined with splitmix64: the same on every machine and run; a
   text shorter than `NGRAM` words is one shingle). A seeded signed-hash projection of the set to
   `DIM` dimensions, L2-normalised, approximates the cosine of two sets, which is at least their
   Jaccard similarity.
3. A FAISS inner-product index (exact `IndexFlatIP`; an IVF index, trained on a seeded sample,
   above `FLAT_MAX` texts) returns each text's `NEIGHBOURS` nearest texts; those above
   `CANDIDATE_COSINE` are candidates, confirmed by the exact Jaccard similarity of the two sets
   (≥ `JACCARD`).

Pairs are a spanning set, not every pair, so a text copied 10,000 times gives 10,000 pairs rather
than 50 million: within a source every copy is paired with that source's first copy; across
sources each source's first copy with the first copy overall; two near-duplicate texts by the
first row of each in each source. A source row found to copy a target split is paired with the
closest row of that split (one pair per split), so the contaminated rows are exactly the source
rows of the `target_*` pairs.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    import faiss

NGRAM = 3  # words per shingle
JACCARD = 0.8  # the least Jaccard similarity of two rows' shingle sets that makes them near-duplicates
DIM = 256  # dimensions of the projected sets the index searches
CANDIDATE_COSINE = 0.5  # projected cosine a pair needs to be checked; a Jaccard of 0.8 means a cosine ≥ 0.8
NEIGHBOURS = 16  # nearest texts looked at per text
FLAT_MAX = 100_000  # above this many texts an IVF index replaces the exact one
NPROBE = 16  # IVF cells searched per query
SEED = 0
KINDS = ("within_source", "across_sources", "target_validation", "target_test")
SPLITS = {"validation": "target_validation", "test": "target_test"}
PAIR_SCHEMA = {"id_a": pl.String, "id_b": pl.String, "source_a": pl.String, "source_b": pl.String,
               "kind": pl.String, "jaccard": pl.Float64}
_TOKEN = r"\w+|[^\w\s]"
Sets = tuple[np.ndarray, np.ndarray, np.ndarray]  # each text's shingles: (start, length) into one flat array
_MASK = (1 << 64) - 1


def find(examples: pl.DataFrame, jaccard: float = JACCARD) -> pl.DataFrame:
    """Near-duplicate pairs of `examples` (the ingested table): id_a, id_b, source_a, source_b,
    kind (one of KINDS) and the pair's Jaccard similarity; sorted by kind, then input order.

    Source rows are those of role "source"; the target's are those of role "validation" and
    "test"; rejected rows (status other than "ok") are left out, as they never reach a mixture.
    """
    rows = _rows(examples)
    texts = rows.unique("key", keep="first", maintain_order=True).select("key", "tokens").with_row_index("t")
    rows = rows.join(texts.select("key", "t"), on="key").sort("pos").drop("tokens")
    start, length, shingles = _shingle_sets(texts["tokens"])
    vectors = _project(start, length, shingles, texts.height)
    sets = (start, length, shingles)

    pool = rows.filter(pl.col("role") == "source")
    units = pool.group_by("t", "source").agg(rep=pl.col("pos").min())  # first row of a text in a source
    parts = [_exact_pool_pairs(pool, units), _near_pool_pairs(pool, units, vectors, sets, jaccard)]
    for role, kind in SPLITS.items():
        split = rows.filter(pl.col("role") == role)
        if split.height and pool.height:
            parts.append(_contamination(pool, split, kind, vectors, sets, jaccard))
    pairs = pl.concat([p.cast({"a": pl.UInt32, "b": pl.UInt32, "jaccard": pl.Float64}) for p in parts])
    side = rows.select("pos", "id", "source")
    order = {kind: i for i, kind in enumerate(KINDS)}
    return (pairs.join(side.rename({"pos": "a", "id": "id_a", "source": "source_a"}), on="a")
            .join(side.rename({"pos": "b", "id": "id_b", "source": "source_b"}), on="b")
            .with_columns(order=pl.col("kind").replace_strict(order, return_dtype=pl.Int8))
            .sort("order", "a", "b").select(list(PAIR_SCHEMA)).cast(PAIR_SCHEMA))


def summary(pairs: pl.DataFrame, selected: Iterable[str], examples: int = 20, ids: int = 1000) -> dict:
    """The manifest's `duplicates` section: pairs per kind, source rows involved, example pairs
    (a few of each kind), and which selected rows copy a target split (first `ids` ids listed)."""
    selected = pl.Series("id", list(selected), dtype=pl.String)
    pool = pl.concat([pairs.filter(~pl.col("kind").is_in(list(SPLITS.values())))["id_b"], pairs["id_a"]]).unique()
    counts = dict(zip(*pairs["kind"].value_counts().to_dict(as_series=False).values()))
    contaminated, picked = {}, []
    for kind in KINDS:
        part = pairs.filter(pl.col("kind") == kind)
        picked.append(part.head(-(-examples // len(KINDS))))
        if kind in SPLITS.values():
            rows = part["id_a"].unique()
            chosen = rows.filter(rows.is_in(selected.implode())).sort()
            contaminated[kind] = {"source_rows": rows.len(), "selected_rows": chosen.len(),
                                  "selected_ids": chosen.head(ids).to_list()}
    shown = pl.concat(picked).head(examples).with_columns(pl.col("jaccard").round(4))
    return {
        "about": (f"Source rows whose word {NGRAM}-gram sets have Jaccard similarity >= {JACCARD} with another "
                  "source row (within_source, across_sources) or with a row of the target's validation or test "
                  "split (target_validation, target_test: contamination). Pairs link each copy to a first "
                  "copy, not every copy to every other. Reported only: no row's selection was changed."),
        "jaccard_threshold": JACCARD, "ngram": NGRAM,
        "pairs": {kind: counts.get(kind, 0) for kind in KINDS},
        "source_rows_involved": pool.len(),
        "contaminated": contaminated,
        "examples": shown.to_dicts(),
    }


def _rows(examples: pl.DataFrame) -> pl.DataFrame:
    """The usable rows of the pool and the target: position, id, source, role, tokens, key."""
    if "messages" in examples.columns:
        turns = pl.col("messages").list.eval(
            pl.element().filter(pl.element().struct.field("role") != "system").struct.field("content"))
        text = turns.list.join("\n")
    else:
        text = pl.concat_str(pl.col("prompt"), pl.col("response"), separator="\n")
    keep = pl.col("role").is_in(["source", *SPLITS])
    if "status" in examples.columns:
        keep &= pl.col("status") == "ok"
    tokens = text.fill_null("").str.to_lowercase().str.extract_all(_TOKEN)
    return (examples.with_row_index("pos").filter(keep)
            .select("pos", "id", "source", "role", tokens=tokens)
            .with_columns(key=pl.col("tokens").list.join(" ")))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit spreads to every output bit (uint64, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _shingle_sets(tokens: pl.Series) -> Sets:
    """Each text's sorted, distinct n-gram hashes, as (start, length) into one flat uint64 array."""
    n = tokens.len()
    lens = tokens.list.len().to_numpy().astype(np.int64)
    words = tokens.explode().drop_nulls()
    vocab = words.unique(maintain_order=True)
    codes = [(zlib.crc32(w.encode()) << 32) | zlib.adler32(w.encode()) for w in vocab.to_list()]
    hashed = words.replace_strict(vocab, pl.Series(codes, dtype=pl.UInt64), return_dtype=pl.UInt64).to_numpy()
    text = np.repeat(np.arange(n), lens)
    offset = np.arange(len(hashed)) - np.repeat(np.cumsum(lens) - lens, lens)
    size = lens[text]
    first = np.flatnonzero((offset + NGRAM <= size) | ((offset == 0) & (size < NGRAM)))
    shingle = np.full(len(first), np.uint64(NGRAM))
    for k in range(NGRAM):
        inside = offset[first] + k < size[first]
        word = hashed[np.minimum(first + k, max(len(hashed) - 1, 0))] if len(hashed) else np.zeros(0, np.uint64)
        shingle = _mix(shingle * np.uint64(0x9E3779B97F4A7C15) + np.where(inside, word, np.uint64(_MASK)))
    owner = text[first]
    order = np.lexsort((shingle, owner))
    owner, shingle = owner[order], shingle[order]
    fresh = np.ones(len(owner), bool)
    fresh[1:] = (owner[1:] != owner[:-1]) | (shingle[1:] != shingle[:-1])
    owner, shingle = owner[fresh], shingle[fresh]
    length = np.bincount(owner, minlength=n).astype(np.int64)
    return np.cumsum(length) - length, length, shingle


def _project(start: np.ndarray, length: np.ndarray, shingles: np.ndarray, n: int,
             block: int = 65_536) -> np.ndarray:
    """Each set as a DIM-dimensional unit vector: a seeded signed-hash (count sketch) projection."""
    out = np.zeros((n, DIM), dtype=np.float32)
    h = _mix(shingles ^ np.uint64(0xD1B54A32D192ED03 ^ SEED))
    bucket = (h % np.uint64(DIM)).astype(np.int64)
    sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
    owner = np.repeat(np.arange(n), length)
    for lo in range(0, n, block):  # in blocks of texts: the float64 counts of all texts at once can be large
        hi = min(n, lo + block)
        part = slice(start[lo], start[hi - 1] + length[hi - 1])
        cells = (owner[part] - lo) * DIM + bucket[part]
        out[lo:hi] = np.bincount(cells, weights=sign[part], minlength=(hi - lo) * DIM).reshape(hi - lo, DIM)
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-30)


def _neighbours(base: np.ndarray, queries: np.ndarray, vectors: np.ndarray, length: np.ndarray, jaccard: float,
                k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Candidate (query text, base text) pairs: among each query's k nearest base texts, those
    whose projected cosine reaches CANDIDATE_COSINE.

    Up to FLAT_MAX base texts the search is exact (`IndexFlatIP`) and only over base texts of a
    size that can reach `jaccard` (J ≤ smaller/larger set size): queries go in blocks sorted by
    size, each against the slice of size-sorted base texts it can match, which skips most of the
    work without missing a pair. Above FLAT_MAX, one IVF index (seeded training sample, fixed
    nprobe), so the same input still gives the same candidates.
    """
    import faiss  # faiss takes a while to import: only when an index is built

    base, queries = base[length[base] > 0], queries[length[queries] > 0]
    if len(base) == 0 or len(queries) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    base = base[np.argsort(length[base], kind="stable")]
    queries = queries[np.argsort(length[queries], kind="stable")]
    sizes = length[base]
    ivf = _ivf(vectors[base]) if len(base) > FLAT_MAX else None
    found_q, found_b = [], []
    for lo in range(0, len(queries), block):
        q = queries[lo : lo + block]
        first, last = 0, len(base)
        index = ivf
        if index is None:
            first = int(np.searchsorted(sizes, jaccard * length[q[0]] * (1 - 1e-9), side="left"))
            last = int(np.searchsorted(sizes, length[q[-1]] / jaccard * (1 + 1e-9), side="right"))
            if last <= first:
                continue
            index = faiss.IndexFlatIP(DIM)
            index.add(vectors[base[first:last]])
        sims, idx = index.search(vectors[q], min(k, last - first))
        i, j = np.nonzero((sims >= CANDIDATE_COSINE) & (idx >= 0))
        found_q.append(q[i])
        found_b.append(base[first + idx[i, j]])
    if not found_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_q), np.concatenate(found_b)


def _ivf(base: np.ndarray) -> faiss.IndexIVFFlat:
    """An inverted-file inner-product index over `base`: spherical k-means cells trained on a
    seeded sample, NPROBE cells searched per query."""
    import faiss  # faiss takes a while to import: only when an index is built

    lists = int(2 * np.sqrt(len(base)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.spherical = SEED, 10, True
    sample = np.sort(np.random.default_rng(SEED).choice(len(base), min(len(base), 40 * lists), replace=False))
    index.train(base[sample])
    index.nprobe = NPROBE
    index.add(base)
    return index


def _jaccard(a: np.ndarray, b: np.ndarray, sets: Sets, budget: int = 4_000_000) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of texts a[i] and b[i]: the shared shingles
    are the matches of a join on (pair, shingle), in batches of about `budget` shingles."""
    start, length, shingles = sets
    out = np.zeros(len(a))
    total = np.cumsum(length[a] + length[b])
    lo = 0
    while lo < len(a):
        done = int(total[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(total, done + budget, side="right")))
        sides = [pl.DataFrame({"pair": np.repeat(np.arange(hi - lo), length[t[lo:hi]]),
                               "s": shingles[_spans(start[t[lo:hi]], length[t[lo:hi]])]}) for t in (a, b)]
        common = sides[0].join(sides[1], on=["pair", "s"]).group_by("pair").len()
        inter = np.zeros(hi - lo)
        inter[common["pair"].to_numpy()] = common["len"].to_numpy()
        out[lo:hi] = inter / (length[a[lo:hi]] + length[b[lo:hi]] - inter).clip(1)
        lo = hi
    return out


def _spans(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The indices start[i] .. start[i] + length[i] - 1 of every i, concatenated."""
    return np.repeat(start - (np.cumsum(length) - length), length) + np.arange(int(length.sum()))


def _confirmed(a: np.ndarray, b: np.ndarray, sets: Sets, jaccard: float) -> pl.DataFrame:
    """The candidate text pairs whose sets reach `jaccard` (checked on sizes first: J ≤ min/max)."""
    length = sets[1]
    small, large = np.minimum(length[a], length[b]), np.maximum(length[a], length[b])
    keep = (small > 0) & (small >= jaccard * large)
    a, b = a[keep], b[keep]
    score = _jaccard(a, b, sets)
    keep = score >= jaccard
    return pl.DataFrame({"ta": a[keep], "tb": b[keep], "jaccard": score[keep]},
                        schema={"ta": pl.UInt32, "tb": pl.UInt32, "jaccard": pl.Float64})


def _exact_pool_pairs(pool: pl.DataFrame, units: pl.DataFrame) -> pl.DataFrame:
    """Rows with the same text: each copy to its source's first copy, each source's first copy
    to the first copy overall."""
    within = (pool.join(units, on=["t", "source"]).filter(pl.col("pos") != pl.col("rep"))
              .select(a="rep", b="pos", kind=pl.lit("within_source"), jaccard=pl.lit(1.0)))
    first = units.group_by("t").agg(first=pl.col("rep").min())
    across = (units.join(first, on="t").filter(pl.col("rep") != pl.col("first"))
              .select(a="first", b="rep", kind=pl.lit("across_sources"), jaccard=pl.lit(1.0)))
    return pl.concat([within, across])


def _near_pool_pairs(pool: pl.DataFrame, units: pl.DataFrame, vectors: np.ndarray, sets: Sets,
                     jaccard: float) -> pl.DataFrame:
    """Distinct source texts that are near-duplicates: the first row of each, per pair of sources."""
    texts = pool["t"].unique().sort().to_numpy().astype(np.int64)
    q, j = _neighbours(texts, texts, vectors, sets[1], jaccard, NEIGHBOURS + 1)
    a, b = np.minimum(q, j), np.maximum(q, j)
    edges = np.unique(np.stack([a, b], 1)[a != b], axis=0).reshape(-1, 2)
    edges = _confirmed(edges[:, 0], edges[:, 1], sets, jaccard)
    side = units.select(pl.col("t").cast(pl.UInt32), "source", "rep")
    joined = (edges.join(side.rename({"t": "ta", "rep": "ra", "source": "sa"}), on="ta")
              .join(side.rename({"t": "tb", "rep": "rb", "source": "sb"}), on="tb"))
    return joined.select(a=pl.min_horizontal("ra", "rb"), b=pl.max_horizontal("ra", "rb"),
                         kind=pl.when(pl.col("sa") == pl.col("sb")).then(pl.lit("within_source"))
                         .otherwise(pl.lit("across_sources")), jaccard="jaccard")


def _contamination(pool: pl.DataFrame, split: pl.DataFrame, kind: str, vectors: np.ndarray, sets: Sets,
                   jaccard: float) -> pl.DataFrame:
    """Every source row whose text copies a row of the split: paired with its closest row there."""
    targets = split.group_by("t").agg(first=pl.col("pos").min()).sort("t")
    texts = pool["t"].unique().sort().to_numpy().astype(np.int64)
    target_texts = targets["t"].to_numpy().astype(np.int64)
    q, j = _neighbours(target_texts, texts, vectors, sets[1], jaccard, NEIGHBOURS)
    near = _confirmed(q, j, sets, jaccard)
    exact = pl.DataFrame({"ta": np.intersect1d(texts, target_texts)}, schema={"ta": pl.UInt32}).with_columns(
        tb=pl.col("ta"), jaccard=pl.lit(1.0))
    matches = (pl.concat([exact, near]).join(targets.rename({"t": "tb"}).cast({"tb": pl.UInt32}), on="tb")
               .sort("ta", pl.col("jaccard"), "first", descending=[False, True, False])
               .unique("ta", keep="first", maintain_order=True))
    return (pool.select("pos", ta=pl.col("t").cast(pl.UInt32)).join(matches, on="ta")
            .select(a="pos", b="first", kind=pl.lit(kind), jaccard="jaccard"))
