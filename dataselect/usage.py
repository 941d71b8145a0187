"""How the user's training stack reads a mixture: snippets written next to it as USAGE.md.

Only the `datasets` and TRL calls are exercised by the tests (tests/test_export.py); the
Axolotl, LLaMA-Factory and open-instruct entries follow those projects' documented dataset
options for the same columns.
"""

from __future__ import annotations

import json
from pathlib import Path

from .recipe import Output, Select


def usage_markdown(path: Path, spec: Output, columns: list[str], files: list[str], rules: Select) -> str:
    """Snippets for the mixture at `path` in its format, naming its real files and columns, and
    the training it was chosen for, since the keep rule that suits a mixture depends on it."""
    parquet = [f for f in files if f.endswith(".parquet") and f.startswith("data/train")]
    jsonl = [f for f in files if f.endswith(".jsonl") and f.startswith("data/train")]
    data_file = f"{path}/{'data/train-*.parquet' if parquet else jsonl[0]}" if files else None
    builder = "parquet" if parquet else "json"
    provenance = [c for c in ("source", "group", "id", "score") if c in columns]
    drop = f".remove_columns({provenance!r})" if provenance else ""
    sections = [
        "# Using this mixture", "",
        f"Format `{spec.format}`; columns {', '.join(f'`{c}`' for c in columns)}. "
        + (f"Provenance columns ({', '.join(provenance)}) say where each row came from; drop them before "
           "training (or export with `--set output.provenance=false`)." if provenance else ""), "",
        _trained_for(rules), "",
        "## datasets", "", "```python", "from datasets import load_dataset, load_from_disk", "",
        f'mixture = load_from_disk("{path}")["train"]  # a DatasetDict: train'
        + (", validation" if spec.validation else ""),
    ]
    if data_file:
        sections.append(f'mixture = load_dataset("{builder}", data_files="{data_file}", split="train")')
    sections += ["```", "", "## TRL (SFTTrainer)", "", "```python", "from trl import SFTConfig, SFTTrainer", "",
                 f"trainer = SFTTrainer(model=model_id, train_dataset=mixture{drop},",
                 "                     args=SFTConfig(output_dir=\"sft\"" + _trl_args(spec.format) + "))",
                 "trainer.train()", "```", ""]
    if data_file:
        train_files = [f"{path}/{f}" for f in parquet or jsonl]
        sections += ["## Axolotl", "", "```yaml", "datasets:", f"  - path: {path}/data", f"    ds_type: {builder}",
                     f"    data_files: {json.dumps(train_files)}", *_axolotl_type(spec.format), "```", "",
                     "## LLaMA-Factory (`data/dataset_info.json` entry)", "", "```json",
                     json.dumps({"dataselect_mixture": _llama_factory(spec.format, train_files)}, indent=2), "```", ""]
    if spec.format == "messages" and jsonl:
        sections += ["## open-instruct", "", "```bash",
                     f"accelerate launch open_instruct/finetune.py --dataset_mixer_list {path}/{jsonl[0]} 1.0 ...",
                     "```", "open-instruct reads the `messages` column.", ""]
    return "\n".join(sections)


def _trained_for(rules: Select) -> str:
    weights = (" Rows of a group that the mixture repeats appear that many times in the files (the manifest gives "
               "each group's `repeats` and `share`): train on the files as they are.")
    if rules.training == "epochs":
        return ("Chosen to be trained for a number of epochs over these rows (`select.training: epochs`). To train "
                "for a fixed number of steps whatever the mixture's size, rebuild with `--set select.training=steps`: "
                "a few groups repeated many times select worse there." + weights)
    return ("Chosen to be trained for a fixed number of steps (`select.training: steps`). To train for a number of "
            "epochs over it, rebuild with `--set select.training=epochs`." + weights)


def _trl_args(fmt: str) -> str:
    # A text mixture is already rendered with a chat template: plain language modelling.
    return ", dataset_text_field=\"text\"" if fmt == "text" else ""


def _axolotl_type(fmt: str) -> list[str]:
    if fmt == "messages":
        return ["    type: chat_template", "    field_messages: messages",
                "    message_property_mappings: {role: role, content: content}"]
    if fmt == "text":
        return ["    type: completion", "    field: text"]
    return ["    type:", "      field_instruction: prompt", "      field_output: completion",
            '      format: "{instruction}"', '      no_input_format: "{instruction}"']


def _llama_factory(fmt: str, files: list[str]) -> dict:
    file_name = files[0] if len(files) == 1 else str(Path(files[0]).parent)  # a folder: every file in it
    if fmt == "messages":
        return {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
    if fmt == "text":  # pre-training style stage (`stage: pt`)
        return {"file_name": file_name, "columns": {"prompt": "text"}}
    return {"file_name": file_name, "formatting": "alpaca", "columns": {"prompt": "prompt", "response": "completion"}}
