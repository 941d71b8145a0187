"""The mixture in each output format loads the way the user's stack loads it: datasets and TRL."""

from __future__ import annotations

import json

import datasets
import pytest

from dataselect import export
from dataselect.examples import usable
from dataselect.pipeline import STAGE_BY_NAME, inputs
from dataselect.tokens import load_tokenizer

TEXT_COLUMNS = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"], "text": ["text"]}


def _export(recipe, tmp_path, fmt, *, provenance=True, validation=True, files=("parquet", "jsonl")):
    out = recipe.output.model_copy(update={"path": tmp_path / fmt, "format": fmt, "provenance": provenance,
                                           "validation": validation, "files": list(files)})
    changed = recipe.model_copy(update={"output": out})
    export.stage(changed, tmp_path / "stage", *inputs(changed, STAGE_BY_NAME["export"]))
    return changed


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "text"])
def test_each_format_loads_with_datasets_and_trains_a_step_in_trl(demo_build, tmp_path, fmt):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    recipe, _, manifest = demo_build
    changed = _export(recipe, tmp_path, fmt)
    path = changed.output.path
    expected = TEXT_COLUMNS[fmt] + ["source", "group", "id", "score"]
    on_disk = datasets.load_from_disk(str(path))
    assert set(on_disk) == {"train", "validation"} and on_disk["train"].column_names == expected
    parquet = datasets.load_dataset("parquet", data_files={"train": str(path / "data/train-*.parquet"),
                                                           "validation": str(path / "data/validation-*.parquet")})
    jsonl = datasets.load_dataset("json", data_files=str(path / "data/train.jsonl"), split="train")
    assert parquet["train"].num_rows == jsonl.num_rows == manifest["mixture"]["rows"]
    assert parquet["train"].column_names == jsonl.column_names == expected
    validation = usable(recipe.run.ingested.examples(), "validation")  # every accepted validation row, once
    assert parquet["validation"].num_rows == validation.height > 0
    assert sorted(parquet["validation"]["id"]) == sorted(validation["id"])
    assert set(parquet["validation"]["source"]) == {recipe.target.name}

    # The call USAGE.md shows: SFTTrainer on the mixture with provenance columns removed.
    tokenizer = load_tokenizer(recipe, recipe.run.ingested)
    model = AutoModelForCausalLM.from_pretrained(recipe.run.ingested.base)
    train = parquet["train"].remove_columns(["source", "group", "id", "score"])
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                     max_length=64, use_cpu=True, save_strategy="no",
                     **({"dataset_text_field": "text"} if fmt == "text" else {}))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, args=args)
    loss = trainer.train().training_loss
    assert loss > 0 and "input_ids" in trainer.train_dataset.column_names
    usage = (path / "USAGE.md").read_text()
    assert "SFTTrainer" in usage and "`select.training: epochs`" in usage


def test_text_format_renders_the_chat_template_and_prompt_completion_splits_the_turns(demo_build, tmp_path):
    recipe, _, _ = demo_build
    messages = datasets.load_from_disk(str(_export(recipe, tmp_path, "messages").output.path))["train"][0]
    text = datasets.load_from_disk(str(_export(recipe, tmp_path, "text").output.path))["train"][0]
    pc = datasets.load_from_disk(str(_export(recipe, tmp_path, "prompt_completion").output.path))["train"][0]
    assert text["text"] == load_tokenizer(recipe, recipe.run.ingested).apply_chat_template(messages["messages"], tokenize=False)
    assert pc["prompt"] == messages["messages"][0]["content"] and pc["completion"] == messages["messages"][-1]["content"]
    assert messages["id"] == text["id"] == pc["id"]


def test_provenance_can_be_dropped_and_files_chosen(demo_build, tmp_path):
    recipe, _, _ = demo_build
    path = _export(recipe, tmp_path, "messages", provenance=False, validation=False, files=["jsonl"]).output.path
    assert sorted(p.name for p in (path / "data").iterdir()) == ["train.jsonl"]
    row = json.loads((path / "data/train.jsonl").read_text().splitlines()[0])
    assert list(row) == ["messages"]
    assert list(datasets.load_from_disk(str(path))) == ["train"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["mixture"]["files"] == ["data/train.jsonl"] and "torch" in manifest["versions"]
