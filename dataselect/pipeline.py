"""The pipeline: the stages of `STAGES`, run in order, each a folder.

A stage writes into a temporary folder under the run directory and is renamed into place when it
finishes (a stage killed half-way finds its folder again and resumes what it can, e.g. sketch
chunks), with a `stage.json` holding the hash of every recipe setting it (and the stages before
it) depends on. A later build reuses a stage whose hash still matches and reruns it otherwise, so
editing a setting reruns only the stage that reads it and the stages after it.

The executor knows stages only through their `Stage` entry: the recipe settings and the earlier
stages' outputs they read (it hands those outputs in, typed: a stage never looks for another's
folder), whether they can be split into shard jobs, and how a finished one checks it is still
current. An entry names its functions as `module:function` in dataselect, imported when the stage
runs, so reading the table (the CLI builds its commands from it) loads no torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .artifacts import Run, StageOutput, key_file, write_record
from .errors import RecipeError

if TYPE_CHECKING:  # pydantic and torch.distributed: loaded by a run, not by reading the stage table
    from .recipe import Recipe
    from .shards import Shard

log = logging.getLogger(__name__)


def _function(reference: str) -> Callable:
    module, name = reference.split(":")
    return getattr(importlib.import_module(f"dataselect.{module}"), name)


@dataclass(frozen=True)
class Stage:
    name: str
    settings: tuple[str, ...]  # recipe settings this stage reads
    reads: tuple[str, ...]  # earlier stages whose outputs it receives, in its parameters' order
    runs: str  # "module:function": (recipe, its unfinished folder, *the outputs it reads) -> its summary
    about: str
    # Part of the stage's key: bump it when the stage's output format or meaning changes, so that it
    # and the stages after it rerun (and say why in CHANGELOG.md).
    version: str = "3"
    # "module:function" computing one shard of N of the stage into its unfinished folder, as an
    # independent job: (recipe, folder, shard, *the outputs it reads) -> summary; the stage's own
    # function then merges the shards. None: the stage runs in one process.
    shards: str | None = None
    # "module:function" saying whether a finished stage (its stage.json record given) still stands,
    # beyond its key matching: for a stage whose output lives outside the run directory. None: the
    # key is enough.
    checks: str | None = None

    @property
    def run(self) -> Callable[..., dict]:
        return _function(self.runs)

    @property
    def shard(self) -> Callable[..., dict] | None:
        return _function(self.shards) if self.shards else None

    @property
    def current(self) -> Callable[[Recipe, dict], bool] | None:
        return _function(self.checks) if self.checks else None


STAGES = (
    Stage("ingest", ("seed", "model", "sources", "target.name", "target.dataset", "target.config", "target.format",
                     "target.validation", "target.test", "sketch.max_length", "sketch.overlong"), (), "ingest:stage",
          "read sources and target, map rows to examples, tokenize, count rejections", version="7"),
    Stage("meta_init", ("meta_init", "sketch_path"), ("ingest",), "meta_init:stage",
          "fine-tune the base model once on all sources together (θ*), keeping points of its path"),
    Stage("sketch", ("sketch",), ("ingest", "meta_init"), "sketch:stage",
          "per-example loss gradients at points of meta-init's path, randomly projected; cluster sources",
          shards="sketch:sketch_shard", version="6"),
    Stage("estimate", ("estimate",), ("ingest", "sketch"), "estimate:stage",
          "first-order target loss after fine-tuning on random subsets of groups", version="7"),
    Stage("select", ("select",), ("ingest", "meta_init", "sketch", "estimate"), "select:stage",
          "score each group from the subset estimates and apply the keep-rules", version="6"),
    Stage("confirm", ("select",), ("ingest", "meta_init", "sketch", "estimate", "select"), "confirm:stage",
          "fine-tune the candidate mixtures the scores propose, as the mixture will be trained; keep the best",
          version="3"),
    Stage("export", ("output",), ("ingest", "meta_init", "sketch", "estimate", "select", "confirm"), "export:stage",
          "write the mixture as a Hugging Face dataset with a manifest", checks="export:is_current", version="5"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Each stage's hash chains the one before it, so a change invalidates everything downstream."""
    keys, previous = {}, ""
    for stage in STAGES:
        chained = f"{previous}:{recipe.fingerprint(*stage.settings)}:{stage.version}"
        previous = keys[stage.name] = hashlib.sha256(chained.encode()).hexdigest()[:16]
    return keys


def is_finished(recipe: Recipe, stage: str, key: str) -> bool:
    """Whether `stage` finished for this key, and (where the stage checks it) still stands."""
    record = recipe.run.record(stage)
    if record is None or record.get("key") != key:
        return False
    current = STAGE_BY_NAME[stage].current
    return current is None or current(recipe, record)


def inputs(recipe: Recipe, stage: Stage) -> list[StageOutput]:
    """The finished outputs `stage` reads, in the order of its `reads`."""
    return [recipe.run.output(name) for name in stage.reads]


def sharded_stage() -> Stage:
    """The one stage that can be split into shard jobs (`--shard`, or ranks under a launcher)."""
    (stage,) = (s for s in STAGES if s.shards is not None)
    return stage


def run(recipe: Recipe, until: str = STAGE_NAMES[-1], force: bool = False) -> dict[str, dict]:
    """Run every stage up to `until`, reusing finished ones unless `force`; return their summaries.

    Under torchrun / accelerate launch (WORLD_SIZE > 1), rank 0 runs the stages before the sharded
    one, every rank computes its shard, rank 0 merges and goes on; the other ranks return `{}`.
    """
    if until not in STAGE_NAMES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGE_NAMES)}")
    from .shards import Shard

    shard = Shard.from_env()
    if shard.count > 1 and STAGE_NAMES.index(until) >= STAGE_NAMES.index(sharded_stage().name):
        return _run_distributed(recipe, until, force, shard)
    return _run_stages(recipe, until, force)


def _run_distributed(recipe: Recipe, until: str, force: bool, shard: Shard) -> dict[str, dict]:
    from .shards import barrier, init_process_group

    init_process_group()
    sharded = sharded_stage()
    if shard.index == 0:
        _run_stages(recipe, _stage_before(sharded).name, force)
    barrier()
    keys = stage_keys(recipe)
    if force or not is_finished(recipe, sharded.name, keys[sharded.name]):
        run_shard(recipe, shard)
    barrier()
    return _run_stages(recipe, until, False) if shard.index == 0 else {}


def _stage_before(stage: Stage) -> Stage:
    return STAGES[STAGES.index(stage) - 1]


def run_shard(recipe: Recipe, shard: Shard) -> dict:
    """Compute one shard of N of the sharded stage into its unfinished folder (`--shard i/N`, one
    job each); a later build, or that stage's command without --shard, merges the shards once all
    N finished."""
    keys = stage_keys(recipe)
    sharded = sharded_stage()
    before = _stage_before(sharded)
    for stage in STAGES[: STAGES.index(sharded)]:
        if not is_finished(recipe, stage.name, keys[stage.name]):
            raise RecipeError(f"{sharded.name} --shard needs a finished {stage.name} stage for this recipe: run "
                              f"`dataselect {before.name.replace('_', '-')}` once (one job) before the shard jobs")
    with run_lock(recipe.run_dir, shared=True):
        tmp = _stage_folder(recipe, sharded.name, keys[sharded.name], shared=True)
        assert sharded.shard is not None
        return sharded.shard(recipe, tmp, shard, *inputs(recipe, sharded))


@contextlib.contextmanager
def run_lock(run_dir: Path, shared: bool = False) -> Iterator[None]:
    """Keep two runs from writing one run directory (shard jobs share it with each other). The
    operating system drops the lock when its process dies, even by SIGKILL: no stale locks."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(Run(run_dir).lock, "a+") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError(f"{run_dir} is in use by another dataselect run; wait for it to finish or set "
                              "another workdir") from None
        yield


def _run_stages(recipe: Recipe, until: str, force: bool) -> dict[str, dict]:
    with run_lock(recipe.run_dir):
        return _run_stages_locked(recipe, until, force)


def _run_stages_locked(recipe: Recipe, until: str, force: bool) -> dict[str, dict]:
    keys = stage_keys(recipe)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for stage in STAGES[: STAGE_NAMES.index(until) + 1]:
        if not force and is_finished(recipe, stage.name, keys[stage.name]):
            log.info("%s: reusing finished stage in %s", stage.name, recipe.run.stage_dir(stage.name))
            summaries[stage.name] = recipe.run.summary(stage.name)
            continue
        summaries[stage.name] = _run_stage(recipe, stage, keys[stage.name])
    return summaries


def _stage_folder(recipe: Recipe, name: str, key: str, shared: bool = False) -> Path:
    """The unfinished stage's folder: resumed when it was started for the same key, else fresh.
    `shared`: several shard jobs may arrive at once, so a matching folder is never removed."""
    tmp = recipe.run.unfinished_dir(name)
    marker = key_file(tmp)
    if marker.exists() and marker.read_text() == key:
        log.info("%s: resuming the unfinished run in %s", name, tmp)
        return tmp
    if not shared or marker.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    return tmp


def _run_stage(recipe: Recipe, stage: Stage, key: str) -> dict:
    log.info("%s: %s", stage.name, stage.about)
    done = recipe.run.stage_dir(stage.name)
    tmp = _stage_folder(recipe, stage.name, key)
    start = time.perf_counter()
    summary = stage.run(recipe, tmp, *inputs(recipe, stage))
    record = {"stage": stage.name, "key": key, "seconds": round(time.perf_counter() - start, 2), "summary": summary}
    write_record(tmp, record)
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)
    log.info("%s: done in %.1f s", stage.name, record["seconds"])
    return summary
