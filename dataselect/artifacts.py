"""A run folder's files: where each stage's outputs live, with their readers and writers.

Every file name of a run is written here and nowhere else, so a stage finds another's outputs by
asking for them (`estimates.assignments()`), never by building a path. A stage writes into an
unfinished folder that the pipeline renames into place when it finishes, so each stage's files are
a small class over a folder: the pipeline hands a stage the finished ones it reads
(`Run.output`), and the stage wraps the folder it is given (`Estimates(out).write(...)`).
`FineTune` is the folder any fine-tune writes: meta-init's θ* and its snapshots, and the real
fine-tunes of verify and the benchmarks.

Imports nothing from dataselect, so every module (the recipe included) can use it; numpy and
polars are imported when a file is read, so that importing the recipe (and `dataselect --help`)
stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

_RECORD = "stage.json"
_EXAMPLES, _DUPLICATES = "examples.parquet", "duplicates.parquet"
_CLUSTERS, _CLUSTER_SUMMARY = "clusters.npy", "clusters.json"
_SKETCH_SETTINGS = "sketch_settings.json"
_COUNTS = ("examples", "merged_from_shards", "clusters")  # sketch_settings.json's keys that are not store settings
_SUBSETS, _LOSS, _GROUPS = "subsets.npy", "loss.npy", "groups.json"
_ASSIGNMENTS, _GROUP_GRADIENTS, _GROUP_PRODUCTS = "assignments.parquet", "group_gradients.parquet", "group_products.npy"
_SELECTION = "groups.parquet"
_CANDIDATES, _MIXTURE = "candidates.parquet", "mixture.json"
_RESULTS, _MEMBERSHIPS, _SUMMARY = "results.parquet", "memberships.npy", "summary.json"

# The output folder's files beside the dataset: export writes them, push uploads them, and every
# reader of an output opens its manifest (`outputs.read_manifest`).
MANIFEST, ROWS, USAGE = "manifest.json", "rows.parquet", "USAGE.md"


def _read_parquet(path: Path) -> pl.DataFrame:
    import polars as pl

    return pl.read_parquet(path)


def _load(path: Path) -> np.ndarray:
    import numpy as np

    return np.load(path, allow_pickle=False)


def _save(path: Path, array: np.ndarray) -> None:
    import numpy as np

    np.save(path, array, allow_pickle=False)


def write_record(folder: Path, record: dict) -> None:
    """A stage's record (its key, seconds and summary), written last into its unfinished folder."""
    (folder / _RECORD).write_text(json.dumps(record, indent=2))


def key_file(folder: Path) -> Path:
    """Names the stage key an unfinished folder was started for, so only the same run resumes it."""
    return folder / "stage.key"


@dataclass(frozen=True)
class StageOutput:
    """A folder one stage wrote; when the pipeline ran it, its record (key, seconds, summary) is inside."""

    folder: Path

    def summary(self) -> dict:
        """The summary the stage returned (for the manifest's account of every stage)."""
        return self._record()["summary"]

    def stage(self) -> str:
        """The name of the stage that wrote this folder."""
        return self._record()["stage"]

    def _record(self) -> dict:
        return json.loads((self.folder / _RECORD).read_text())


@dataclass(frozen=True)
class FineTune(StageOutput):
    """A fine-tune's folder: the trained parameters, snapshots along the way, the checkpoint a
    killed run resumes from, the training losses."""

    @property
    def theta(self) -> Path:
        """The trained parameters (θ* for meta-init), written last: its presence means finished."""
        return self.folder / "theta.safetensors"

    def snapshot(self, fraction: float, steps: int) -> Path:
        """The trainable parameters at `fraction` of the steps (0: the start, 1: θ itself)."""
        step = round(fraction * steps)
        return self.theta if step >= steps else self.folder / f"snapshot-{step:07d}.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.safetensors"

    def write_losses(self, losses: list[float]) -> None:
        (self.folder / "losses.json").write_text(json.dumps(losses))


@dataclass(frozen=True)
class Ingested(StageOutput):
    """The ingest stage's folder: every input row as a canonical example (accepted or rejected),
    the near-duplicate pairs among them, and, for `model.tiny`, the base model and tokenizer
    built from the recipe's text."""

    @property
    def base(self) -> Path:
        """A `save_pretrained` folder holding the tiny model and its tokenizer."""
        return self.folder / "base"

    def examples(self) -> pl.DataFrame:
        return _read_parquet(self.folder / _EXAMPLES)

    def write_examples(self, examples: pl.DataFrame) -> None:
        examples.write_parquet(self.folder / _EXAMPLES)

    def duplicates(self) -> pl.DataFrame:
        """Near-duplicate and contaminated pairs among the examples (`duplicates.find`)."""
        return _read_parquet(self.folder / _DUPLICATES)

    def write_duplicates(self, pairs: pl.DataFrame) -> None:
        pairs.write_parquet(self.folder / _DUPLICATES)


@dataclass(frozen=True)
class Sketches(StageOutput):
    """The sketch stage's folder: one store (store.py's format) per source and one for the
    target's validation split, the clusters of clustered sources, shard jobs' chunks until they
    are merged, and `sketch_settings.json`: the settings every store carries, with the rows
    sketched per store."""

    def source_store(self, source: str) -> Path:
        return self.folder / "sources" / source

    @property
    def target_store(self) -> Path:
        return self.folder / "target" / "validation"

    @property
    def shards(self) -> Path:
        return self.folder / "shards"

    def clusters(self, source: str) -> np.ndarray | None:
        """Each row's cluster in a source grouped by `clusters`; None until it is clustered."""
        path = self.source_store(source) / _CLUSTERS
        return _load(path) if path.exists() else None

    def write_clusters(self, source: str, labels: np.ndarray, summary: dict) -> None:
        """Each row's cluster, and how the clustering came out (sizes, rows near a boundary)."""
        (self.source_store(source) / _CLUSTER_SUMMARY).write_text(json.dumps(summary, indent=2))
        _save(self.source_store(source) / _CLUSTERS, labels)  # last: marks it done

    def cluster_summaries(self) -> dict:
        """Per clustered source: the summary written beside its clusters."""
        return {p.parent.name: json.loads(p.read_text())
                for p in sorted((self.folder / "sources").glob(f"*/{_CLUSTER_SUMMARY}"))}

    def settings(self) -> dict:
        """The settings the stage ran with; every store it wrote must carry them."""
        written = json.loads((self.folder / _SKETCH_SETTINGS).read_text())
        return {k: v for k, v in written.items() if k not in _COUNTS}

    def write_settings(self, settings: dict, examples: dict, merged_from_shards: bool, clusters: dict) -> dict:
        """The settings, the rows (and target tokens) sketched per store, whether shards made them,
        and per clustered source how its clustering came out; returned as the stage's summary."""
        written = {**settings, "examples": examples, "merged_from_shards": merged_from_shards, "clusters": clusters}
        (self.folder / _SKETCH_SETTINGS).write_text(json.dumps(written, indent=2))
        return written


@dataclass(frozen=True)
class Estimates(StageOutput):
    """The estimate stage's folder: random subsets of groups with their estimated target loss,
    each source example's group, per group its sums (alignment with the target's gradient,
    tokens, ...) and between groups the inner products of their summed gradients."""

    def read(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(groups, membership of each subset: subsets × groups, each subset's estimated loss)."""
        return (json.loads((self.folder / _GROUPS).read_text()), _load(self.folder / _SUBSETS),
                _load(self.folder / _LOSS))

    def assignments(self) -> pl.DataFrame:
        """One row per sketched source example: id, group."""
        return _read_parquet(self.folder / _ASSIGNMENTS)

    def group_gradients(self) -> pl.DataFrame:
        """Per group: its sums over examples (alignment with the target's gradient, tokens, count,
        squared sketch lengths, squared tokens), its step scale, its own effect and that effect's
        95% interval, with its two parts (the noise over the group's examples, and over the
        target's validation examples)."""
        return _read_parquet(self.folder / _GROUP_GRADIENTS)

    def group_products(self) -> np.ndarray:
        """2 × groups × groups: ⟨Σ_g g_j, Σ_h g_j⟩ and ⟨Σ_g T_j g_j, Σ_h g_j⟩."""
        return _load(self.folder / _GROUP_PRODUCTS)

    def write(self, groups: list[str], subsets: np.ndarray, loss: np.ndarray, assignments: pl.DataFrame,
              group_gradients: pl.DataFrame, group_products: np.ndarray) -> None:
        _save(self.folder / _SUBSETS, subsets)
        _save(self.folder / _LOSS, loss)
        assignments.write_parquet(self.folder / _ASSIGNMENTS)
        (self.folder / _GROUPS).write_text(json.dumps(groups))
        group_gradients.write_parquet(self.folder / _GROUP_GRADIENTS)
        _save(self.folder / _GROUP_PRODUCTS, group_products)


@dataclass(frozen=True)
class Selection(StageOutput):
    """The select stage's folder: per group its score, interval, rank, decision and reason."""

    def read(self) -> pl.DataFrame:
        return _read_parquet(self.folder / _SELECTION)

    def write(self, groups: pl.DataFrame) -> None:
        groups.write_parquet(self.folder / _SELECTION)


@dataclass(frozen=True)
class Confirmation(StageOutput):
    """The confirm stage's folder: every candidate mixture with its estimate, what its fine-tunes
    measured and cost, and why it won or lost; and the chosen mixture, as each group's repeats."""

    def candidates(self) -> pl.DataFrame:
        return _read_parquet(self.folder / _CANDIDATES)

    def mixture(self) -> dict[str, int]:
        """Group -> how many times its rows are in the mixture (groups left out are not named)."""
        return json.loads((self.folder / _MIXTURE).read_text())

    def write(self, candidates: pl.DataFrame, mixture: dict[str, int]) -> None:
        candidates.write_parquet(self.folder / _CANDIDATES)
        (self.folder / _MIXTURE).write_text(json.dumps(mixture, indent=2, sort_keys=True))


@dataclass(frozen=True)
class Verification:
    """What `dataselect verify` writes: per subset its estimate and true loss, each subset's
    groups, the summary, the report and its plot (its fine-tunes are the run's `finetunes`)."""

    folder: Path

    @property
    def report(self) -> Path:
        return self.folder / "report.md"

    @property
    def scatter(self) -> Path:
        return self.folder / "scatter.png"

    @property
    def results_file(self) -> Path:
        return self.folder / _RESULTS

    @property
    def summary_file(self) -> Path:
        return self.folder / _SUMMARY

    def results(self) -> pl.DataFrame | None:
        """One row per verified subset; None when verify has not run."""
        path = self.folder / _RESULTS
        return _read_parquet(path) if path.exists() else None

    def memberships(self) -> np.ndarray | None:
        """Each verified subset's groups (rows: results' subsets; columns: the estimate stage's
        groups); None when the folder holds none."""
        path = self.folder / _MEMBERSHIPS
        return _load(path) if path.exists() else None

    def summary(self) -> dict:
        return json.loads((self.folder / _SUMMARY).read_text())

    def write_results(self, results: pl.DataFrame, memberships: np.ndarray) -> None:
        results.write_parquet(self.folder / _RESULTS)
        _save(self.folder / _MEMBERSHIPS, memberships)

    def write_summary(self, summary: dict) -> None:
        (self.folder / _SUMMARY).write_text(json.dumps(summary, indent=2))


# The one link from a stage's name to the class of what it writes.
OUTPUTS: dict[str, type[StageOutput]] = {"ingest": Ingested, "meta_init": FineTune, "sketch": Sketches,
                                         "estimate": Estimates, "select": Selection, "confirm": Confirmation}


@dataclass(frozen=True)
class Run:
    """A run folder: one folder per finished stage (`.<stage>.tmp` while it runs), the demo data
    ingest generates, and the lock that keeps two runs out of it."""

    root: Path

    @classmethod
    def named(cls, name: str, workdir: str | Path | None = None) -> Run:
        """A recipe's run folder: its workdir, else runs/<name> under the working directory."""
        return cls(Path(workdir) if workdir else Path("runs") / name)

    def stage_dir(self, stage: str) -> Path:
        """A stage's finished folder (or another tool's folder beside them, e.g. a benchmark's)."""
        return self.root / stage

    def unfinished_dir(self, stage: str) -> Path:
        """Where a stage writes until it finishes and the pipeline renames it to `stage_dir`."""
        return self.root / f".{stage}.tmp"

    def record(self, stage: str) -> dict | None:
        """A stage's record (key, seconds, summary); None until the stage has finished."""
        path = self.stage_dir(stage) / _RECORD
        return json.loads(path.read_text()) if path.exists() else None

    def summary(self, stage: str) -> dict:
        """A finished stage's summary, as the stage returned it."""
        return self.record(stage)["summary"]

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def finetunes(self) -> Path:
        """Real fine-tunes (`trainer.finetuned`), each in a folder named by everything it depends
        on: the confirm stage and verify share them, and a rerun reuses them."""
        return self.root / "finetunes"

    @property
    def demo_data(self) -> Path:
        """Where `demo:` datasets are generated."""
        return self.root / "demo_data"

    def output(self, stage: str) -> StageOutput:
        """A finished stage's folder, typed: what the pipeline hands each stage that reads it."""
        return OUTPUTS[stage](self.stage_dir(stage))

    @property
    def ingested(self) -> Ingested:
        return self.output("ingest")

    @property
    def meta_init(self) -> FineTune:
        """θ* and the snapshots along meta-init's path."""
        return self.output("meta_init")

    @property
    def sketches(self) -> Sketches:
        return self.output("sketch")

    @property
    def estimates(self) -> Estimates:
        return self.output("estimate")

    @property
    def selection(self) -> Selection:
        return self.output("select")

    @property
    def confirmation(self) -> Confirmation:
        return self.output("confirm")

    @property
    def verification(self) -> Verification:
        return Verification(self.stage_dir("verify"))

