"""The recipe: one YAML file that names everything a build depends on.

Every section is a strict pydantic model, so a misspelled key fails with its full path
(`sources.1.fromat`) instead of being ignored. Stages hash the sections they read to decide
whether a finished stage can be reused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .artifacts import Run
from .errors import RecipeError
from .selectors import METHOD_NAMES, SELECTORS


Training = Literal["epochs", "steps"]  # how a mixture is trained: passes over its rows, or a fixed count of steps
KeepSide = Literal["low_end", "estimate", "high_end"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModel(Strict):
    """A small causal LM built from a config, with a tokenizer trained on the recipe's own text."""

    hidden_size: int = Field(64, description="width of the tiny Llama (its MLP is twice as wide)")
    layers: int = Field(2, description="number of transformer layers")
    heads: int = Field(4, description="attention heads per layer")
    vocab_size: int = Field(384, description="size of the BPE vocabulary trained on the sources' text")


class Lora(Strict):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, description="LoRA scaling (`lora_alpha`)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA adapters' input")
    target_modules: list[str] = Field(["q_proj", "v_proj"],
                                      description="the linear layers that get adapters (names as PEFT takes them)")


class Model(Strict):
    """`base` is a Hub id, a local model folder, or a `.gguf` file; `tiny` builds one from scratch."""

    base: str | None = Field(None, description="a Hub id, a local model folder, or a `.gguf` file (read with the "
                                               "`gguf` package: `pip install 'dataselect[gguf]'`); set exactly "
                                               "one of `base` and `tiny`")
    gguf_file: str | None = Field(None, description="the GGUF file to load from inside the Hub repo or folder "
                                                    "that `base` names")
    revision: str | None = Field(None, description="the Hub revision of `base`, passed to `from_pretrained`")
    tiny: TinyModel | None = Field(None, description=(
        "instead of `base`: build a small Llama of this size at ingest, initialised at random from `seed`, with "
        "a BPE tokenizer trained on the recipe's own text (sources and the target's validation split), and "
        "train it from scratch at meta-init; nothing is downloaded. The demo uses it; it shows the pipeline "
        "working, not which data suits a pretrained model"))
    lora: Lora | None = Field(None, description="train LoRA adapters (null: full fine-tuning); the sketched "
                                                "parameters are exactly the trained ones")
    trust_remote_code: bool = Field(False, description="passed to `from_pretrained`; remote code stays off "
                                                       "unless set")

    @model_validator(mode="after")
    def _one_base(self) -> "Model":
        if (self.base is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.base (Hub id, folder or .gguf) and model.tiny")
        return self


class MetaInit(Strict):
    """Multitask fine-tuning on all sources together, giving the point θ* where gradients are taken."""

    epochs: float = Field(1.0, gt=0, description="passes over the sources (may be fractional)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate of AdamW, with linear warm-up and decay; "
                                              "the loss is on response tokens only")
    batch_size: int = Field(8, ge=1, description="examples per step")
    weight_decay: float = Field(0.0, description="AdamW's weight decay")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up")
    max_examples_per_source: int | None = Field(None, ge=1, description="cap each source at a seeded sample of "
                                                                        "this many rows (null: all rows)")


class Fields(Strict):
    """Column names for prompt/response shaped rows."""

    prompt: str = Field(description="the column holding the prompt")
    response: str = Field(description="the column holding the response")
    system: str | None = Field(None, description="a column holding a system prompt")
    id: str | None = Field(None, description="a column holding each row's id (null: its row number)")


class Messages(Strict):
    """Chat rows: a list of {role, content}; the last assistant turn is the response."""

    messages: str = Field("messages", description="the column holding the list of {role, content} turns")
    id: str | None = Field(None, description="a column holding each row's id (null: its row number)")


Format = Literal["messages"] | Fields | Messages


class Source(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$",
                      description="the source's name, unique among the sources and not the target's; "
                                  "its rows' ids and groups (`<name>/<value>`) start with it")
    dataset: str = Field(description=(
        "a Hub id, a `.json`/`.jsonl`/`.parquet`/`.csv` file (the text ones also compressed: `.jsonl.gz`, "
        "`.zst`, `.bz2`, `.xz`), a glob of such files (`data/shard-*.parquet`, read in name order), a folder "
        "of such files, a `save_to_disk` folder, an `http(s)://` URL of such a file, of a glob of them or of a "
        "folder ending in `/` (listed from the folder's index page), or `demo:<name>` (generated by dataselect)"))
    config: str | None = Field(None, description="the Hub dataset's configuration (subset) name")
    split: str = Field("train", description="the split to read; may be a slice (`train[:5000]`), also for a "
                                            "local file or glob")
    format: Format = Field(description=(
        "`messages` (a `messages` column of role/content turns; the last assistant turn is the response), "
        "`{messages: column, id: column}`, or `{prompt: column, response: column, system: column, id: column}`; "
        "a column may be a dotted path into nested fields (`6b_finetuning.solution`)"))
    group_by: str | None = Field(None, description=(
        "a column whose values split the source into groups (e.g. FLAN's task name); a row where it is "
        "null or blank is rejected. With neither `group_by` nor `clusters` the source is one group"))
    clusters: int | None = Field(None, ge=2, description=(
        "split the source into this many groups by spherical k-means (FAISS) on its sketches; "
        "exclusive with `group_by`"))
    max_rows: int | None = Field(None, ge=1, description=(
        "keep a seeded random sample of this many rows (seeded by `seed` and the source's name, so a rerun "
        "keeps the same rows; in file order), stratified by `group_by` when set (each group its proportional "
        "share, at least one row while the budget allows). A Hub dataset or URL is then streamed, unsliced: at "
        "most `3·max(1000, max_rows)` rows are read, not the whole split (see [sampling and streaming]"
        "(#sampling-and-streaming)). For the first N rows, slice the split instead: `split: train[:N]`"))

    @model_validator(mode="after")
    def _one_grouping(self) -> "Source":
        if self.group_by and self.clusters:
            raise ValueError("group_by and clusters are exclusive: a source is grouped one way")
        return self


class Split(Strict):
    split: str = Field(description="the split to read (a slice such as `train[:500]` works too)")
    size: int | None = Field(None, ge=1, description="take a seeded sample of this many rows (null: all rows)")


class Target(Strict):
    name: str = Field("target", description="the target's name in the examples table; not a source's name")
    dataset: str = Field(description="where the target is read from, in any form `sources[].dataset` takes")
    config: str | None = Field(None, description="the Hub dataset's configuration (subset) name")
    format: Format = Field(description="the rows' shape, as for `sources[].format`")
    validation: Split = Field(description="the split the selection aims at: selection uses only this one")
    test: Split | None = Field(None, description="a split that is read and counted for later reporting, "
                                                 "never used to select")
    answer: str | None = Field(None, description=(
        "a regex whose last match (group 1 if it has one) is the answer, for exact-match accuracy of greedy "
        "generations in `verify` and the benchmarks (e.g. `.+`: the whole response; `####\\s*(\\S+)`: what "
        "follows `####`); null: the target defines no answer"))

    @field_validator("answer")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
        return pattern


PRETRAINED_PATH = (0.0, 0.1, 0.5)
SCRATCH_PATH = (0.5, 0.75, 1.0)


class Sketch(Strict):
    path: list[float] | None = Field(None, description=(
        "where gradients are taken: an increasing list of fractions of meta-init's steps (0: the base model, "
        "1: θ*), each point projected to `dim` dimensions and weighted by the learning rate spent near it "
        "(see [the method](method.md)). Null: `[0, 0.1, 0.5]`, from the base, for a pretrained `model.base`; "
        "`[0.5, 0.75, 1]`, from half-way, for `model.tiny` built from scratch (its gradients carry nothing "
        "about the pool's tasks before meta-init has taught it them)"))
    dim: int = Field(256, ge=8, description="the projection's dimension, per point of `path`")
    max_length: int = Field(256, ge=8, description="the token limit of a row (prompt and response)")
    batch_size: int = Field(8, ge=1, description="rows per gradient batch")
    modules: list[str] = Field([], description=(
        "glob patterns of the linear layers whose weights are sketched; empty: the LoRA adapters, or every "
        "linear layer not tied to the input embeddings"))
    chunk_size: int = Field(1024, ge=1, description="rows written (and resumable) at a time")
    overlong: Literal["truncate", "reject", "cut_prompt"] = Field("truncate", description=(
        "rows longer than `max_length` tokens: cut at the end and counted as truncated (`truncate`), rejected "
        "with a reason (`reject`), or cut in the middle of the prompt so the response stays whole "
        "(`cut_prompt`: extractive QA and summaries whose passage is longer than the context); with the first "
        "two a prompt that fills the limit is rejected"))

    @field_validator("path")
    @classmethod
    def _fractions(cls, path: list[float] | None) -> list[float] | None:
        if path is not None and (not path or any(not 0 <= f <= 1 for f in path) or path != sorted(set(path))):
            raise ValueError("a non-empty, increasing list of fractions of meta-init's steps, each in [0, 1]")
        return path


class Estimate(Strict):
    subsets: int = Field(1000, ge=10, description="how many random subsets of groups are estimated")
    subset_fraction: float = Field(0.5, gt=0, lt=1, description="the fraction of the groups in each subset")


class StepBudget(Strict):
    steps: int = Field(ge=1, description="a budget of fine-tune steps, over all the confirm stage's fine-tunes")


class Select(Strict):
    method: Literal[METHOD_NAMES] = Field("group_effect", description=(
        "how groups are scored (the selectors of `dataselect/selectors.py`): "
        + "; ".join(f"`{s.name}`: {s.about}" for s in SELECTORS.values())))
    keep_fraction: float = Field(1.0, gt=0, le=1, description=(
        "groups are ranked best score first; keep at most this top fraction of them (a budget; `min_score` "
        "still applies within it). Whether a budget helps depends on the target: check one with "
        "`dataselect verify` (evidence: [Results](results.md))"))
    min_score: float | None = Field(0.0, description=(
        "keep only the groups whose score clears this, compared as `threshold_on` says; null: no threshold"))
    training: Training = Field("epochs", description=(
        "how the mixture will be trained: `epochs`, a number of passes over its rows, so a smaller mixture takes "
        "fewer steps (what TRL, Axolotl, LLaMA-Factory and open-instruct do when given epochs); `steps`, a fixed "
        "number of steps whatever its size. It sets the default `threshold_on`, since which keep rule works best "
        "differs between the two (evidence: [Results](results.md))"))
    threshold_on: KeepSide | None = Field(None, description=(
        "what `min_score` is compared with, where the method gives a 95% interval: its low end (keep only "
        "groups confidently above `min_score`), the estimate itself, or its high end (drop only groups "
        "confidently below). Confidence is over all the groups at once (Holm's step-down at 2.5% one-sided, "
        "the level of one group's 95% interval), so among dozens of neutral groups none is dropped by "
        "chance. null: by `training`. For `epochs`, `low_end`: keep only what confidently helps, since a "
        "smaller mixture is then trained for fewer steps, not repeated. For `steps`, `high_end`: drop only what "
        "confidently hurts, since at a fixed number of steps a few groups repeated many times lose to many "
        "(evidence: [Results](results.md))"))
    max_examples: int | None = Field(None, ge=1, description=(
        "an example budget: skip a group that would take the mixture past it"))
    max_tokens: int | None = Field(None, ge=1, description=(
        "a token budget: skip a group that would take the mixture past it"))
    confirm: float | StepBudget = Field(2.0, description=(
        "what the confirm stage may spend on real fine-tunes to choose among the candidate mixtures that the "
        "scores propose (the confidently helpful groups, all but the confidently harmful, top fractions, "
        "repeats, all sources): a number of full fine-tunes of the pool (meta-init's steps), or `{steps: N}`. "
        "Each candidate is trained as `training` says and scored on the validation split; the lowest loss "
        "wins. 0: no fine-tune, the keep rule's mixture as the estimates chose it (evidence: "
        "[Results](results.md))"))

    @field_validator("confirm")
    @classmethod
    def _confirm_not_negative(cls, value: float | StepBudget) -> float | StepBudget:
        if isinstance(value, float) and value < 0:
            raise ValueError("a number of full fine-tunes, 0 or more")
        return value

    def confirm_budget(self, full_steps: int) -> float:
        """`confirm` as a number of full fine-tunes of the pool, whose training takes `full_steps`."""
        return self.confirm.steps / max(full_steps, 1) if isinstance(self.confirm, StepBudget) else self.confirm

    @property
    def side(self) -> KeepSide:
        """`threshold_on`, or where it is unset, the keep rule that suits `training`."""
        return self.threshold_on or ("low_end" if self.training == "epochs" else "high_end")


class Output(Strict):
    path: Path = Field(description=("the folder the mixture is written to; an earlier dataselect mixture there "
                                    "that differs from the new one is moved to `<path>.previous`"))
    format: Literal["messages", "prompt_completion", "text"] = Field("messages", description=(
        "`messages`: [{role, content}]; `prompt_completion`: two strings (TRL's prompt-completion); "
        "`text`: the whole conversation rendered with the model's chat template"))
    files: list[Literal["jsonl", "parquet"]] = Field(["parquet"], description=(
        "the file types written: `parquet` (Hub-style shards), `jsonl`"))
    provenance: bool = Field(True, description="source, group, id and score columns beside the text")
    validation: bool = Field(False, description="also write the target's validation split, in the same format")
    push_to_hub: str | None = Field(None, description=(
        "a dataset repo id; `dataselect push` and `build` upload the mixture there"))
    private: bool = Field(True, description=("create the `push_to_hub` repo private; an existing public repo "
                                             "is then refused and nothing is uploaded"))
    overwrite: bool = Field(False, description=(
        "replace an `output.path` that holds something other than a dataselect output"))


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$",
                      description="the run's name; its work folder is `runs/<name>` unless `workdir` is set")
    seed: int = Field(0, description=(
        "seeds model init, meta-init order, projection, subsets, clustering, validation sampling"))
    workdir: Path | None = Field(None, description=(
        "the run folder, where finished stages are kept and reused; null: `runs/<name>`"))
    model: Model = Field(description="the base model: one of `base` and `tiny`, optionally with `lora`")
    meta_init: MetaInit = Field(MetaInit(), description=(
        "multitask fine-tuning on all sources together, giving the point θ* where gradients are taken"))
    sources: list[Source] = Field(min_length=1, description="the data sources to choose from, each split into groups")
    target: Target = Field(description="the data the mixture should help")
    sketch: Sketch = Field(Sketch(), description="the per-example gradient sketches")
    estimate: Estimate = Field(Estimate(), description="the estimates over random subsets of groups")
    select: Select = Field(Select(), description="how groups are scored and which are kept")
    output: Output = Field(description="where and how the mixture is written")

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[Source]) -> list[Source]:
        names = [s.name for s in sources]
        for name in dict.fromkeys(names):
            where = [str(i) for i, n in enumerate(names) if n == name]
            if len(where) > 1:
                raise ValueError(f"source names must be unique; {name!r} names sources {', '.join(where)}")
        return sources

    @model_validator(mode="after")
    def _unique_names(self) -> "Recipe":
        names = [s.name for s in self.sources]
        if self.target.name in names:
            raise ValueError(f"target.name {self.target.name!r} is also a source name")
        return self

    @property
    def sketch_path(self) -> list[float]:
        """The points of meta-init's path where gradients are taken (sketch.path, or its default)."""
        if self.sketch.path is not None:
            return list(self.sketch.path)
        return list(SCRATCH_PATH if self.model.tiny is not None else PRETRAINED_PATH)

    @property
    def run(self) -> Run:
        """The run folder, which knows where every stage's files are."""
        return Run.named(self.name, self.workdir)

    @property
    def run_dir(self) -> Path:
        return self.run.root

    def fingerprint(self, *paths: str) -> str:
        """A short hash of the named settings (`sketch` or `sketch.max_length`), to tell whether a
        finished stage still applies."""
        data = {}
        for path in paths:
            value: Any = self
            for part in path.split("."):
                value = getattr(value, part)
            data[path] = _jsonable(value)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class _RecipeLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {e}"
    problem = getattr(e, "problem", None) or "syntax error"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    text = f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        text += f" ({context})"
    return text


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe with a safe YAML loader, apply `key.path=value` overrides, validate strictly."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder, not a recipe file") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}, line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    try:
        raw = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: no python/* tags
    except yaml.YAMLError as e:
        raise RecipeError(_yaml_error(path, e)) from None
    if raw is None:
        raise RecipeError(f"{path}: the recipe is empty")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}, line 1: a recipe is a mapping of sections (name:, model:, sources:, ...), "
                          f"got a {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, path)
    return validate_recipe(raw, f"{path} (with --set {' '.join(overrides)})" if overrides else path)


def validate_recipe(raw: dict, origin: str | Path = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [f"{origin}: invalid recipe"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg}")
        raise RecipeError("\n".join(lines)) from None


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried ("Fields", "literal['messages']"); users never wrote it
    return isinstance(part, str) and (part in {"Fields", "Messages"} or part.startswith("literal["))


def apply_override(raw: dict, item: str, origin: str | Path = "<recipe>") -> None:
    """Set `a.b.0.c=value` in the raw recipe; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise RecipeError(f"{origin}: override {item!r} is not key.path=value")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise RecipeError(f"{origin}: override {item!r}: the key path {key!r} has an empty part")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), origin)
    last = parts[-1]
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"{origin}: override {item!r}: the value is not valid YAML: "
                          f"{getattr(e, 'problem', None) or e}") from None
    if isinstance(node, list):
        node[_index(node, last, key, origin)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise RecipeError(f"{origin}: override path {'.'.join(parts[:-1])} goes through a value, not a section")


def _child(node: Any, part: str, where: str, origin: str | Path) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where, origin)]
    if not isinstance(node, dict):
        raise RecipeError(f"{origin}: override path {where} goes through a value, not a section")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str, origin: str | Path) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"{origin}: override path {where}: no list item {part!r}")
    return int(part)
