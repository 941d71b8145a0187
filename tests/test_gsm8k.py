"""The shipped GSM8K CoT recipe end to end on ../shared/data/gsm8k, through the CLI, with the
tiny model: the recipe's defaults read the Hub, and `--set` points every dataset at local files.
Sizes are cut down so it finishes in about a minute; benchmarks/bench_selection.py runs it larger."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dataselect.cli import main

from .conftest import DEMO, SHARED

GSM8K = SHARED / "gsm8k"


@pytest.mark.slow
@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="../shared/data/gsm8k not present")
def test_gsm8k_cot_recipe_builds_end_to_end_on_the_shared_files(tmp_path):
    sets = [f"sources.0.dataset={GSM8K}/train.jsonl", "sources.0.config=null", "sources.0.split=train[:120]",
            *[f"sources.{i}.dataset={GSM8K}/example_model_solutions.jsonl" for i in range(1, 5)],
            *[f"sources.{i}.max_rows=40" for i in range(1, 5)],
            f"target.dataset={GSM8K}/train.jsonl", "target.config=null",
            "target.validation.size=16", "target.test.size=16", "model.tiny.hidden_size=64", "model.tiny.vocab_size=512",
            "meta_init.epochs=1", "sketch.max_length=160", "sketch.dim=256", "estimate.subsets=100", "select.confirm=0.5",
            f"workdir={tmp_path / 'run'}", f"output.path={tmp_path / 'out'}"]
    args = ["build", "-r", str(DEMO.parent / "gsm8k_cot.yaml"), "--json", *(f"--set={s}" for s in sets)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.output[result.output.index("{"):])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"human", "gptj_finetuned", "gptj_verifier", "gpt3_finetuned", "gpt3_verifier"}
    groups = {g["group"] for g in manifest["groups"]}
    assert {"gptj_finetuned/True", "gptj_finetuned/False", "human/c0"} <= groups  # correctness split, clusters
    accounted = sum(v["rows"] for v in manifest["sources"].values())
    assert accounted == 120 + 4 * 40
    assert summaries["export"]["rows"] == sum(v["selected"] for v in manifest["sources"].values()) > 0
