"""Groups for a source without task labels: spherical k-means on its examples' gradient directions.

A clustering is only useful if another machine finds the same one. Lloyd's algorithm from one
random start often lands in a poor local optimum, and a float32 k-means from one start can find
different clusters on two CPUs, whose rounding differs.
So: float64 throughout, many seeded k-means++ starts on a bounded sample, the start with the
highest objective kept (ties broken by start order, not by float noise), a final Lloyd pass on
every row, and clusters numbered by size so their names do not depend on the start that found
them. The final pass streams the stored sketches in blocks, each made unit float64 on the fly,
so a source of millions of rows never has a float64 copy in memory. Each row's margin (cosine
to its centre minus cosine to the next) says how close it sits to a boundary: only rows with a
margin near 0 can move when the sketches change by float noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Seeded k-means++ starts: even if only one start in six found the best clustering, all 32 would
# miss it 0.3% of the time.
STARTS = 32
SAMPLE = 20_000  # rows the starts run on; the winner is then refined on every row
NEAR_BOUNDARY = 1e-3  # a margin below this could flip under another machine's float rounding
_TIE = 1e-9  # relative objective difference treated as a tie (the earlier start wins)


@dataclass(frozen=True)
class Clusters:
    labels: np.ndarray  # per row, 0 = the largest cluster
    margins: np.ndarray  # per row, cos(own centre) − cos(nearest other centre)

    def summary(self) -> dict:
        sizes = np.bincount(self.labels).tolist()
        return {"sizes": sizes, "near_boundary": int((self.margins < NEAR_BOUNDARY).sum()),
                "min_margin": float(self.margins.min()) if len(self.margins) else None}


Prepare = Callable[[np.ndarray], np.ndarray]  # raw rows → unit float64 rows


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1 in float64 (zero rows stay zero)."""
    b = np.asarray(x, dtype=np.float64)
    return b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-300)


def spherical_kmeans(x: np.ndarray, k: int, seed: int, prepare: Prepare = unit_rows,
                     block: int = 65536) -> Clusters:
    """Cluster the rows of `x` (in memory or memory-mapped) into k groups by the cosine of their
    `prepare`d forms; deterministic for a given x, k and seed, whatever `block`."""
    k = min(k, len(x))
    if k <= 1:
        return Clusters(np.zeros(len(x), dtype=np.int64), np.full(len(x), np.inf))
    rng = np.random.default_rng(seed)
    sample = prepare(x if len(x) <= SAMPLE else x[np.sort(rng.choice(len(x), SAMPLE, replace=False))])
    best, best_score = None, -np.inf
    for start in range(STARTS):
        centres = lloyd(sample, kmeans_plus_plus(sample, k, np.random.default_rng([seed, start])))
        score = objective(sample, centres)
        if best is None or score > best_score + _TIE * abs(best_score):
            best, best_score = centres, score
    blocks = [slice(i, min(i + block, len(x))) for i in range(0, len(x), block)]
    rows_at = (lambda rows: sample[rows]) if len(x) <= SAMPLE else (lambda rows: prepare(x[rows]))
    centres = lloyd_streamed(len(x), best, rows_at, blocks)
    labels, margins = np.empty(len(x), dtype=np.int64), np.empty(len(x))
    for rows in blocks:
        sims = cosines_row_by_row(rows_at(rows), centres)
        labels[rows] = sims.argmax(1)
        top2 = np.sort(sims, axis=1)[:, -2:]
        margins[rows] = top2[:, 1] - top2[:, 0]
    return Clusters(by_size(labels, k), margins)


def cosines_row_by_row(unit: np.ndarray, centres: np.ndarray, chunk_bytes: int = 1 << 26) -> np.ndarray:
    """Each row's cosine to each centre, summed in the same order for every row. A matrix product
    is not: BLAS kernels treat rows at a block's edge differently (OpenBLAS's SkylakeX kernel moved
    margins by a rounding error when the blocks changed), so the final labels and margins would
    depend on `block`."""
    out = np.empty((len(unit), len(centres)))
    step = max(1, chunk_bytes // (8 * centres.size))
    for i in range(0, len(unit), step):
        out[i:i + step] = (unit[i:i + step, None, :] * centres[None]).sum(-1)
    return out


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k starting centres, each drawn with probability ∝ its squared distance (2 − 2cos) to the nearest."""
    centres = [x[rng.integers(len(x))]]
    distance = 1.0 - x @ centres[0]
    for _ in range(1, k):
        weights = distance.clip(0)
        total = weights.sum()
        pick = rng.choice(len(x), p=weights / total) if total > 0 else rng.integers(len(x))
        centres.append(x[pick])
        distance = np.minimum(distance, 1.0 - x @ x[pick])
    return np.array(centres)


def lloyd(x: np.ndarray, centres: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Assign to the nearest centre by cosine, move each centre to its rows' mean direction, until
    no row moves. An emptied cluster keeps its centre."""
    return lloyd_streamed(len(x), centres, lambda rows: x[rows], [slice(0, len(x))], iterations)


def lloyd_streamed(n: int, centres: np.ndarray, rows_at: Callable[[slice], np.ndarray], blocks: list[slice],
                   iterations: int = 100) -> np.ndarray:
    """Lloyd's iterations over n unit rows read block by block (`rows_at`); the rows are summed in
    row order, so the centres are the same, bit for bit, whatever the blocks."""
    centres, labels = centres.copy(), None
    for _ in range(iterations):
        new, sums = np.empty(n, dtype=np.int64), np.zeros_like(centres)
        for rows in blocks:
            unit = rows_at(rows)
            new[rows] = (unit @ centres.T).argmax(1)
            np.add.at(sums, new[rows], unit)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        norms = np.linalg.norm(sums, axis=1)
        moved = norms > 0
        centres[moved] = sums[moved] / norms[moved, None]
    return centres


def objective(x: np.ndarray, centres: np.ndarray) -> float:
    """Summed cosine of each row to its nearest centre (higher is a tighter clustering)."""
    return float((x @ centres.T).max(1).sum())


def by_size(labels: np.ndarray, k: int) -> np.ndarray:
    """Renumber clusters largest first (ties: the one whose first row comes first)."""
    sizes = np.bincount(labels, minlength=k)
    first = np.array([np.flatnonzero(labels == c)[0] if sizes[c] else len(labels) for c in range(k)])
    order = sorted(range(k), key=lambda c: (-sizes[c], first[c]))
    rename = np.empty(k, dtype=np.int64)
    rename[order] = np.arange(k)
    return rename[labels]


# What a cluster is, for a reader: a k-means cluster has a number, not a name.
WORDS = 8  # distinctive words per cluster
EXAMPLES = 3  # example prompts per cluster
EXAMPLE_CHARS = 160  # an example prompt is cut to this many characters
LABEL_VALUES = 3  # the most frequent values of each label column, per cluster
WORD_ROWS = 50_000  # distinctive words are counted over at most this many rows of a source, evenly spaced
Z_DISTINCT = 1.96  # a distinctive word is over-represented beyond chance at this z
_WORD = r"[^\W\d_]{2,}"  # a word: two or more letters (digits and punctuation say little of a topic)


def describe(labels: np.ndarray, margins: np.ndarray, prompts: list[str], texts: list[str],
             row_labels: list[list[dict] | None] | None = None) -> list[dict]:
    """Per cluster, what a reader needs to tell it from the others: its size; the values of the
    source's label columns (`row_labels`: each row's [{column, value}], from a column the format
    does not read) most frequent in it, or {} where the source has none; its distinctive words
    (`distinctive_words` of `texts`, each row's prompt and response, against the rest of the
    source; over WORD_ROWS rows evenly spaced, for a source of millions); and its most typical
    prompts (the rows with the largest margin, surest of their cluster), each shown once, cut to
    EXAMPLE_CHARS."""
    k = int(labels.max()) + 1 if len(labels) else 0
    counted = np.arange(0, len(texts), max(1, -(-len(texts) // WORD_ROWS)))
    words = distinctive_words([texts[i] for i in counted], labels[counted], k)
    out = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        examples: list[str] = []
        for i in members[np.lexsort((members, -margins[members]))]:  # surest first; ties: the earlier row
            if len(examples) == EXAMPLES:
                break
            if _cut(prompts[i]) not in examples:  # a prompt repeated in the source is shown once
                examples.append(_cut(prompts[i]))
        out.append({"cluster": f"c{c}", "size": int(len(members)),
                    "labels": _label_counts([row_labels[i] for i in members]) if row_labels is not None else {},
                    "words": words[c], "examples": examples})
    return out


def distinctive_words(texts: list[str], labels: np.ndarray, k: int, top: int = WORDS) -> list[list[str]]:
    """Per cluster, the `top` words most over-represented in its rows against the rest of the source:
    the log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi and Quinn 2008), its
    z-score ranking them, over the number of rows a word occurs in (a word repeated in one long row
    counts once). The prior, each word's share of the source, scaled to one pseudo-row per word on
    average, keeps a word seen in a row or two from topping the list. A word must occur in two rows
    of the cluster and be over-represented beyond chance (z > 1.96), so a cluster that nothing sets
    apart lists no words rather than the noise; with one cluster, its most frequent words."""
    import polars as pl

    if not len(texts) or k == 0:
        return [[] for _ in range(k)]
    found = (pl.DataFrame({"cluster": labels.astype(np.int64), "text": texts})
             .with_row_index("row")
             .select("row", "cluster", word=pl.col("text").str.to_lowercase().str.extract_all(_WORD))
             .explode("word").drop_nulls("word").unique(["row", "word"])
             .group_by("word", "cluster").len())
    if found.is_empty():
        return [[] for _ in range(k)]
    vocab = found["word"].unique().sort()
    index = {w: i for i, w in enumerate(vocab.to_list())}
    counts = np.zeros((len(vocab), k))
    counts[[index[w] for w in found["word"]], found["cluster"].to_numpy()] = found["len"].to_numpy()
    total = counts.sum(1)
    prior = total / total.sum() * len(vocab)
    out = []
    for c in range(k):
        inside, rest = counts[:, c], total - counts[:, c]
        if rest.sum() == 0:
            score = inside
        else:
            n_in, n_rest, a0 = inside.sum(), rest.sum(), prior.sum()
            delta = (np.log((inside + prior) / (n_in + a0 - inside - prior))
                     - np.log((rest + prior) / (n_rest + a0 - rest - prior)))
            score = delta / np.sqrt(1 / (inside + prior) + 1 / (rest + prior))
        eligible = np.flatnonzero((inside >= 2) & (score > (0 if rest.sum() == 0 else Z_DISTINCT)))
        ranked = eligible[np.lexsort((eligible, -score[eligible]))]  # ties: the alphabetically first
        out.append([vocab[int(i)] for i in ranked[:top]])
    return out


def _label_counts(rows: list[list[dict] | None]) -> dict[str, dict[str, int]]:
    """Per label column, its LABEL_VALUES most frequent values among `rows`, with their rows."""
    tally: dict[str, dict[str, int]] = {}
    for pairs in rows:
        for pair in pairs or ():
            column = tally.setdefault(pair["column"], {})
            column[pair["value"]] = column.get(pair["value"], 0) + 1
    return {column: dict(sorted(values.items(), key=lambda item: (-item[1], item[0]))[:LABEL_VALUES])
            for column, values in tally.items()}


def _cut(text: str) -> str:
    """A prompt on one line, cut to EXAMPLE_CHARS."""
    flat = " ".join(text.split())
    return flat if len(flat) <= EXAMPLE_CHARS else flat[: EXAMPLE_CHARS - 1] + "…"
