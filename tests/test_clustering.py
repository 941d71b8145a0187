"""Clustering of unlabeled sources: the same clusters under float noise and row order, named by size."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dataselect.clustering import NEAR_BOUNDARY, spherical_kmeans, unit_rows
from dataselect.recipe import Select
from dataselect.report import report
from dataselect.select import stability


def planted(seed: int = 0, sizes=(120, 80, 50), d: int = 64, spread: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Rows around three directions, noisy enough that one Lloyd start often lands in a poor optimum."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d))
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return unit_rows(centres[truth] + spread * rng.normal(size=(len(truth), d))), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_planted_clusters_named_largest_first():
    x, truth = planted()
    found = spherical_kmeans(x, 3, seed=0)
    assert same_partition(found.labels, truth)
    assert np.bincount(found.labels).tolist() == [120, 80, 50]  # c0 is the largest
    assert found.summary()["sizes"] == [120, 80, 50]


def test_float_noise_does_not_move_rows():
    """What another CPU's rounding does to the sketches: a relative change of 1e-6."""
    x, _ = planted()
    noisy = unit_rows(x * (1 + 1e-6 * np.random.default_rng(1).normal(size=x.shape)))
    a, b = spherical_kmeans(x, 3, seed=0), spherical_kmeans(noisy.astype(np.float32), 3, seed=0)
    assert np.array_equal(a.labels, b.labels)


def test_row_order_does_not_change_the_clusters():
    x, _ = planted()
    order = np.random.default_rng(2).permutation(len(x))
    a, b = spherical_kmeans(x, 3, seed=0), spherical_kmeans(x[order], 3, seed=0)
    assert np.array_equal(a.labels[order], b.labels)  # same rows together, same names (sizes differ)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_seed_finds_the_planted_clusters(seed):
    """Six clusters of unequal size: with one start, 3 of these 4 seeds miss them (checked with
    STARTS = 1); the many starts make the seed not matter."""
    x, truth = planted(sizes=(60, 50, 40, 30, 20, 10), spread=1.5)
    assert same_partition(spherical_kmeans(x, 6, seed=seed).labels, truth)


def test_margins_flag_rows_between_clusters():
    """A row's margin is its cosine to its own cluster's centre (the mean direction of the cluster's
    rows, where Lloyd's iterations end) minus its cosine to the nearest other centre: positive,
    since every row sits with its nearest centre, and small for a row between two clusters."""
    x, _ = planted()
    rows = np.vstack([x, unit_rows(x[:1] + x[-1:])])  # the last: halfway between the first and last cluster
    found = spherical_kmeans(rows, 3, seed=0)
    centres = unit_rows(np.stack([rows[found.labels == c].sum(0) for c in range(3)]))
    cosines = rows @ centres.T
    own = cosines[np.arange(len(rows)), found.labels]
    other = np.where(np.arange(3) == found.labels[:, None], -np.inf, cosines).max(1)
    np.testing.assert_allclose(found.margins, own - other, atol=1e-9)
    assert (own - other).min() > 0  # each row's label is its nearest centre
    assert found.margins[-1] < np.quantile(found.margins, 0.05)
    assert found.summary()["near_boundary"] == int((found.margins < NEAR_BOUNDARY).sum())


def _scored(ci: float) -> pl.DataFrame:
    return pl.DataFrame({"group": ["a", "b", "c", "d"], "score": [2.0, 1.0, 0.05, -2.0], "ci95": [ci] * 4,
                         "examples": [10] * 4, "tokens": [100] * 4})


def test_stability_names_the_close_calls():
    rules = Select(method="group_effect", keep_fraction=1.0, min_score=0.0, threshold_on="estimate")
    steady = stability(_scored(0.5), rules, {"a", "b", "c"}, seed=0)
    assert list(steady["close_calls"]) == ["c"]  # 0.05 ± 0.5 straddles 0; the others never move
    assert 0.3 < steady["close_calls"]["c"] < 0.7
    assert 0.6 < steady["mean_overlap"] < 1.0
    assert stability(_scored(1e-6), rules, {"a", "b", "c"}, seed=0)["mean_overlap"] == 1.0


def test_no_stability_without_intervals():
    rules = Select(method="random", keep_fraction=0.5, min_score=None)
    assert stability(_scored(0.5).with_columns(ci95=pl.lit(None, pl.Float64)), rules, {"a"}, seed=0) is None


def test_streaming_the_rows_in_blocks_gives_the_same_clusters(tmp_path):
    """A source too large to hold in float64 is read from its memory-mapped sketches block by block;
    the blocks change nothing, bit for bit."""
    import dataselect.clustering as clustering

    x, truth = planted(sizes=(300, 200, 120))
    np.save(tmp_path / "x.npy", (x * 3).astype(np.float32))  # stored sketches are neither unit nor float64
    stored = np.load(tmp_path / "x.npy", mmap_mode="r")
    original = clustering.SAMPLE
    clustering.SAMPLE = 100  # so the final pass runs over more rows than the starts saw
    try:
        whole = spherical_kmeans(stored, 3, seed=0, block=len(x))
        blocks = spherical_kmeans(stored, 3, seed=0, block=37)
    finally:
        clustering.SAMPLE = original
    assert same_partition(whole.labels, truth)
    assert np.array_equal(whole.labels, blocks.labels) and np.array_equal(whole.margins, blocks.margins)


# --- what a cluster holds, in words -----------------------------------------------------------

FAMILIES = (["zebra", "giraffe", "savanna"], ["piano", "violin", "melody"], ["quark", "photon", "neutrino"])
TOPICS = ("animals", "music", "physics")
FILLER = "the of and to is what tell me about please which one".split()


def planted_texts(truth: np.ndarray, seed: int = 0) -> list[str]:
    """Each row: words every cluster shares, three of them in every row (more frequent in every
    cluster than its own words, so that counting alone would pick them), and one word of its own
    cluster's family."""
    import random

    rng = random.Random(seed)
    return [" ".join(FILLER[:3] + rng.sample(FILLER[3:], 3) + [rng.choice(FAMILIES[t])]) for t in truth.tolist()]


def test_each_cluster_is_described_by_its_size_planted_words_labels_and_typical_prompts():
    from dataselect.clustering import EXAMPLES, describe

    x, truth = planted()
    found = spherical_kmeans(x, 3, seed=0)  # c0 is truth 0 (120 rows), c1 truth 1, c2 truth 2
    texts = planted_texts(truth)
    topics = [TOPICS[t] for t in truth.tolist()]
    for i in np.flatnonzero(truth == 0)[:5]:  # five of the animals rows labelled otherwise
        topics[i] = "music"
    row_labels = [[{"column": "topic", "value": t}] for t in topics]
    described = describe(found.labels, found.margins, texts, texts, row_labels)
    assert [d["cluster"] for d in described] == ["c0", "c1", "c2"]
    assert [d["size"] for d in described] == [120, 80, 50]
    assert [d["labels"] for d in described] == [{"topic": {"animals": 115, "music": 5}}, {"topic": {"music": 80}},
                                                {"topic": {"physics": 50}}]
    for c, d in enumerate(described):
        assert sorted(d["words"]) == sorted(FAMILIES[c]), d["words"]  # its own words, not the shared ones
        members = np.flatnonzero(found.labels == c)
        surest = members[np.argsort(-found.margins[members], kind="stable")][:EXAMPLES]
        assert d["examples"] == [texts[i] for i in surest]


def test_a_cluster_description_without_labels_or_distinct_words_says_so():
    from dataselect.clustering import EXAMPLE_CHARS, describe

    labels = np.array([0, 0, 0, 1, 1, 1])
    texts = ["the same few words here " * 20] * 6  # nothing sets one cluster apart
    described = describe(labels, np.zeros(6), texts, texts)
    assert [d["labels"] for d in described] == [{}, {}]
    assert [d["words"] for d in described] == [[], []]
    assert [len(d["examples"]) for d in described] == [1, 1]  # one prompt repeated: shown once
    assert all(len(e) == EXAMPLE_CHARS and e.endswith("…") for d in described for e in d["examples"])


@pytest.fixture(scope="module")
def clustered_build(tmp_path_factory):
    """A tiny build of two clustered sources: `mixed`, whose rows come from three planted families
    and carry a `topic` label column (and a `uid`, an id, which is no label), and `plain`, with no
    column besides its prompt and response. Returns (input rows by id, output folder, manifest)."""
    import json
    import random

    from dataselect import build, load_recipe

    from .conftest import write_jsonl, write_small_recipe

    tmp = tmp_path_factory.mktemp("clustered")
    rng = random.Random(0)
    mixed = [{"uid": f"m{i}", "q": " ".join(rng.sample(FILLER, 4) + rng.sample(FAMILIES[i % 3], 2)),
              "a": " ".join(rng.sample(FAMILIES[i % 3], 2)), "topic": TOPICS[i % 3]} for i in range(90)]
    plain = [{"q": f"say {w} twice", "a": f"{w} {w}"} for w in (FILLER * 6)[:60]]
    qa = {"prompt": "q", "response": "a"}
    sources = [{"name": "mixed", "dataset": str(write_jsonl(tmp / "mixed.jsonl", mixed)), "clusters": 3,
                "format": {**qa, "id": "uid"}},
               {"name": "plain", "dataset": str(write_jsonl(tmp / "plain.jsonl", plain)), "clusters": 2, "format": qa}]
    target = write_jsonl(tmp / "t.jsonl", [{"q": f"tell me about {w}", "a": w} for w in (FILLER * 3)[:30]])
    recipe = load_recipe(write_small_recipe(tmp, "clustered", sources, target, qa, max_length=32),
                         ["select.method=all", "select.confirm=0"])
    build(recipe)
    by_id = {f"mixed/{r['uid']}": r for r in mixed} | {f"plain/{i}": r for i, r in enumerate(plain)}
    return by_id, recipe.output.path, json.loads((recipe.output.path / "manifest.json").read_text())


@pytest.mark.slow
def test_every_cluster_of_a_build_is_described_by_its_own_rows(clustered_build):
    """In the manifest: per cluster its size, label counts that add up to it, distinctive words that
    its rows hold, and example prompts that are its rows' prompts; `uid` is not a label column."""
    by_id, out, manifest = clustered_build
    found = manifest["stages"]["sketch"]["clusters"]
    rows = pl.read_parquet(out / "rows.parquet")
    assert found["mixed"]["label_columns"] == ["topic"] and found["plain"]["label_columns"] == []
    for source, summary in found.items():
        described = summary["descriptions"]
        assert [d["size"] for d in described] == summary["sizes"]
        for d in described:
            members = [by_id[i] for i in rows.filter(pl.col("group") == f"{source}/{d['cluster']}")["id"]]
            assert len(members) == d["size"] > 0
            assert sum(d["labels"].get("topic", {}).values()) == (d["size"] if source == "mixed" else 0)
            assert 0 < len(d["examples"]) <= 3 and set(d["examples"]) <= {m["q"] for m in members}
            words = " ".join(m["q"] + " " + m["a"] for m in members).split()
            assert set(d["words"]) <= set(words)


@pytest.mark.slow
def test_the_report_describes_each_cluster(clustered_build):
    _, out, manifest = clustered_build
    report(out)
    summary = (out / "report" / "summary.md").read_text()
    section = summary.split("## Clusters\n", 1)[1].split("\n## ", 1)[0]
    assert "mixed: topic" in section and "plain: none" in section
    for source, found in manifest["stages"]["sketch"]["clusters"].items():
        for d in found["descriptions"]:
            [line] = [line for line in section.splitlines() if line.startswith(f"| {source}/{d['cluster']} |")]
            assert f"| {d['size']} |" in line and all(w in line for w in d["words"])
            assert all(e in line for e in d["examples"])
    assert "<h2>Clusters</h2>" in (out / "report" / "index.html").read_text()


def test_words_of_a_large_source_are_counted_on_evenly_spaced_rows_and_sizes_on_all(monkeypatch):
    import dataselect.clustering as clustering

    x, truth = planted()
    found = spherical_kmeans(x, 3, seed=0)
    texts = planted_texts(truth)
    monkeypatch.setattr(clustering, "WORD_ROWS", 100)  # 250 rows: every third one is counted
    described = clustering.describe(found.labels, found.margins, texts, texts)
    assert [d["size"] for d in described] == [120, 80, 50]
    for c, d in enumerate(described):
        assert d["words"] and set(d["words"]) <= set(FAMILIES[c])
