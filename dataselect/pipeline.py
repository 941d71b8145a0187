"""The pipeline: sources → model → sketch → estimate → select → export, each stage a folder.

A stage writes into a temporary folder under the run directory and is renamed into place when it
finishes (a stage killed half-way finds its folder again and resumes what it can, e.g. sketch
chunks), with a `stage.json` holding the hash of every recipe setting it (and the stages before
it) depends on. A later build reuses a stage whose hash still matches and reruns it otherwise, so
editing `select.keep_fraction` reruns only selection and export.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import estimate, export, model, select, sketch, sources
from .artifacts import Run, key_file, write_record
from .outputs import MANIFEST
from .recipe import Recipe, RecipeError
from .shards import Shard, barrier, init_process_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    settings: tuple[str, ...]  # recipe settings this stage reads
    run: Callable[[Recipe, Path], dict]
    about: str
    version: str = "3"  # bump when this stage's output format or meaning changes: it and later stages rerun


STAGES = (
    Stage("ingest", ("seed", "model", "sources", "target.name", "target.dataset", "target.config", "target.format",
                     "target.validation", "target.test", "sketch.max_length", "sketch.overlong"), sources.stage,
          "read sources and target, map rows to examples, tokenize, count rejections"),
    Stage("meta_init", ("meta_init", "sketch_path"), model.stage,
          "fine-tune the base model once on all sources together (θ*), keeping points of its path"),
    Stage("sketch", ("sketch",), sketch.stage,
          "per-example loss gradients at points of meta-init's path, randomly projected; cluster sources",
          version="4"),
    Stage("estimate", ("estimate",), estimate.stage,
          "first-order target loss after fine-tuning on random subsets of groups", version="4"),
    Stage("select", ("select",), select.stage,
          "score each group from the subset estimates and apply the keep-rules", version="4"),
    Stage("export", ("output",), export.stage,
          "write the mixture as a Hugging Face dataset with a manifest"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Each stage's hash chains the one before it, so a change invalidates everything downstream."""
    keys, previous = {}, ""
    for stage in STAGES:
        chained = f"{previous}:{recipe.fingerprint(*stage.settings)}:{stage.version}"
        previous = keys[stage.name] = hashlib.sha256(chained.encode()).hexdigest()[:16]
    return keys


def is_finished(recipe: Recipe, stage: str, key: str) -> bool:
    record = recipe.run.record(stage)
    if record is None or record.get("key") != key:
        return False
    if stage == "export":  # the mixture lives outside the run dir: is it still the one we wrote?
        manifest = Path(recipe.output.path) / MANIFEST
        written = record["summary"]["fingerprint"]
        return manifest.exists() and json.loads(manifest.read_text())["mixture"]["fingerprint"] == written
    return True


def run(recipe: Recipe, until: str = "export", force: bool = False) -> dict[str, dict]:
    """Run every stage up to `until`, reusing finished ones unless `force`; return their summaries.

    Under torchrun / accelerate launch (WORLD_SIZE > 1), rank 0 runs the stages before sketching,
    every rank sketches its shard, rank 0 merges and goes on; the other ranks return `{}`.
    """
    if until not in STAGE_NAMES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGE_NAMES)}")
    shard = Shard.from_env()
    if shard.count > 1 and STAGE_NAMES.index(until) >= STAGE_NAMES.index("sketch"):
        return _run_distributed(recipe, until, force, shard)
    return _run_stages(recipe, until, force)


def _run_distributed(recipe: Recipe, until: str, force: bool, shard: Shard) -> dict[str, dict]:
    init_process_group()
    if shard.index == 0:
        _run_stages(recipe, "meta_init", force)
    barrier()
    keys = stage_keys(recipe)
    if force or not is_finished(recipe, "sketch", keys["sketch"]):
        run_shard(recipe, shard)
    barrier()
    return _run_stages(recipe, until, False) if shard.index == 0 else {}


def run_shard(recipe: Recipe, shard: Shard) -> dict:
    """Sketch one shard of N into the unfinished sketch stage's folder (`--shard i/N`, one job
    each); a later `build` or `sketch` without --shard merges the shards once all N finished."""
    keys = stage_keys(recipe)
    for name in ("ingest", "meta_init"):
        if not is_finished(recipe, name, keys[name]):
            raise RecipeError(f"sketch --shard needs a finished {name} stage for this recipe: run "
                              "`dataselect meta-init` once (one job) before the shard jobs")
    with run_lock(recipe.run_dir, shared=True):
        tmp = _stage_folder(recipe, "sketch", keys["sketch"], shared=True)
        return sketch.sketch_shard(recipe, tmp, shard)


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
    summary = stage.run(recipe, tmp)
    record = {"stage": stage.name, "key": key, "seconds": round(time.perf_counter() - start, 2), "summary": summary}
    write_record(tmp, record)
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)
    log.info("%s: done in %.1f s", stage.name, record["seconds"])
    return summary
