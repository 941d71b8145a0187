import re
import typing

import pytest
from pydantic import BaseModel

from dataselect.recipe import Recipe, RecipeError, load_recipe, validate_recipe

from .conftest import DEMO


def test_demo_recipe_validates():
    recipe = load_recipe(DEMO)
    assert recipe.model.tiny is not None and recipe.model.lora is None
    assert [s.name for s in recipe.sources][:2] == ["lexicon", "lexicon_cot"]
    assert recipe.target.validation.split == "validation"


def test_unknown_key_is_named_with_its_path(tmp_path):
    text = DEMO.read_text().replace("group_by: task}", "group_by: task, fromat: x}", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert "bad.yaml" in str(e.value)
    assert "sources.0.fromat: unknown key" in str(e.value)


def test_overrides_set_nested_values_and_parse_yaml():
    recipe = load_recipe(DEMO, ["estimate.subsets=200", "sources.1.max_rows=50", "select.min_score=null",
                                "model.tiny.hidden_size=32"])
    assert recipe.estimate.subsets == 200
    assert recipe.sources[1].max_rows == 50
    assert recipe.model.tiny.hidden_size == 32


@pytest.mark.parametrize("override, message", [
    ("sources.9.name=x", "no list item '9'"),
    ("estimate", "not key.path=value"),
    ("estimate.subsets=3", "estimate.subsets"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, [override])


def test_model_needs_exactly_one_base():
    raw = {"name": "x", "model": {"base": "a/b", "tiny": {}}, "sources": [{"name": "s", "dataset": "d.jsonl",
           "format": "messages"}], "target": {"dataset": "t.jsonl", "format": "messages",
           "validation": {"split": "train"}}, "output": {"path": "o"}}
    with pytest.raises(RecipeError, match="exactly one of model.base"):
        validate_recipe(raw)


def test_group_by_and_clusters_are_exclusive():
    raw = {"name": "x", "model": {"base": "a/b"}, "sources": [{"name": "s", "dataset": "d.jsonl",
           "format": "messages", "group_by": "task", "clusters": 4}], "target": {"dataset": "t.jsonl",
           "format": "messages", "validation": {"split": "train"}}, "output": {"path": "o"}}
    with pytest.raises(RecipeError, match="exclusive"):
        validate_recipe(raw)


def test_fingerprint_follows_settings():
    a, b = load_recipe(DEMO), load_recipe(DEMO, ["select.keep_fraction=0.3"])
    assert a.fingerprint("sketch", "estimate") == b.fingerprint("sketch", "estimate")
    assert a.fingerprint("select") != b.fingerprint("select")


def test_every_shipped_recipe_validates():
    recipes = sorted(DEMO.parent.glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.sources and recipe.target.validation
    assert {p.stem for p in recipes} >= {"demo", "gsm8k_cot", "flan_cot"}


def test_hub_recipes_name_hub_datasets_and_take_local_overrides():
    flan = load_recipe(DEMO.parent / "flan_cot.yaml")
    assert all("/" in s.dataset and not s.dataset.startswith((".", "/")) for s in flan.sources)
    assert flan.model.base == "HuggingFaceTB/SmolLM2-135M-Instruct" and flan.model.lora is not None
    assert flan.output.private and not flan.model.trust_remote_code
    gsm8k = load_recipe(DEMO.parent / "gsm8k_cot.yaml", [
        "target.dataset=../shared/data/gsm8k/train.jsonl", "target.config=null",
        "model.tiny=null", "model.base=HuggingFaceTB/SmolLM2-135M-Instruct",
        "model.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}"])
    assert gsm8k.target.dataset.endswith("train.jsonl") and gsm8k.target.config is None
    assert gsm8k.model.tiny is None and gsm8k.model.lora.r == 8
    assert gsm8k.target.answer and load_recipe(DEMO).target.answer


def test_the_sketch_path_defaults_by_model_kind_and_keys_meta_init_as_resolved():
    from dataselect.pipeline import stage_keys
    from dataselect.recipe import PRETRAINED_PATH, SCRATCH_PATH

    tiny = load_recipe(DEMO)
    assert tiny.sketch.path is None and tiny.sketch_path == list(SCRATCH_PATH)
    same = load_recipe(DEMO, [f"sketch.path={list(SCRATCH_PATH)}"])
    other = load_recipe(DEMO, [f"sketch.path={list(PRETRAINED_PATH)}"])
    assert stage_keys(same)["meta_init"] == stage_keys(tiny)["meta_init"]
    assert stage_keys(other)["meta_init"] != stage_keys(tiny)["meta_init"]
    assert stage_keys(other)["ingest"] == stage_keys(tiny)["ingest"]
    pretrained = load_recipe(DEMO, ["model={base: some/model}"])
    assert pretrained.sketch_path == list(PRETRAINED_PATH)
    for bad in ("[]", "[0.5, 0.1]", "[0.1, 1.5]", "[0.2, 0.2]"):
        with pytest.raises(RecipeError, match="sketch.path: .*increasing list of fractions"):
            load_recipe(DEMO, [f"sketch.path={bad}"])


def _recipe_reference_hook():
    """docs/hooks/recipe_reference.py, the mkdocs hook that writes the recipe reference."""
    import importlib.util
    import sys

    from .conftest import ROOT

    name = "dataselect_docs_recipe_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "hooks" / "recipe_reference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def test_recipe_reference_documents_every_field_of_every_recipe_model():
    hook = _recipe_reference_hook()
    rows = hook.reference_rows()
    documented = {(model, name): row for row in rows for model, name in row.fields}
    models = hook.recipe_models()
    assert {m.__name__ for m in models} >= {"Recipe", "Model", "TinyModel", "Lora", "Source", "Fields", "Messages",
                                            "Target", "Split", "Sketch", "Select", "Output"}
    markdown = hook.on_page_markdown(f"before\n\n{hook.MARKER}\n\nafter", None, None, None)
    assert hook.MARKER not in markdown and markdown.startswith("before") and markdown.rstrip().endswith("after")
    missing = []
    for model in models:
        for name, info in model.model_fields.items():
            row = documented.get((model, name))
            if row is None or not (info.description or "").strip() or f"| `{row.path}` |" not in markdown:
                missing.append(f"{model.__name__}.{name}")
    assert not missing, f"recipe fields with no description in the generated reference: {missing}"
    paths = [row.path for row in rows]
    assert len(paths) == len(set(paths))
    assert {"sources[].group_by", "select.threshold_on", "sketch.path", "output.format", "target.validation.size",
            "sources[].format.prompt"} <= set(paths)
    by_path = {row.path: row for row in rows}
    assert by_path["name"].default == "required" and by_path["select.training"].default == "`epochs`"
    assert by_path["select.threshold_on"].default == "`null`" and "by `training`" in by_path["select.threshold_on"].description
    assert "`low_end`" in by_path["select.threshold_on"].type and "`cut_prompt`" in by_path["sketch.overlong"].type


def test_the_committed_recipe_reference_is_current():
    """docs/recipes.md holds the reference where people read it; it must say what recipe.py says,
    and the built site renders that table once, in the same place."""
    hook = _recipe_reference_hook()
    text = hook.PAGE.read_text()
    assert text.count(hook.MARKER) == 1 and text.count(hook.END) == 1 and hook.GENERATED in text
    assert hook.with_reference(text) == text, "run `python docs/hooks/recipe_reference.py --write`"
    assert "| `model.tiny.vocab_size` |" in text and "dataselect[gguf]" in text
    rendered = hook.on_page_markdown(text, None, None, None)
    assert rendered.count("| key | type | default | meaning |") == 1 and hook.MARKER not in rendered


def test_the_help_points_at_the_recipe_reference():
    from click.testing import CliRunner

    from dataselect.cli import main

    from .conftest import ROOT

    help_text = " ".join(CliRunner().invoke(main, ["build", "--help"]).output.split())
    assert "docs/recipes.md, 'Recipe reference'" in help_text
    assert "\n## Recipe reference\n" in (ROOT / "docs" / "recipes.md").read_text()


def test_the_keep_rule_follows_how_the_mixture_will_be_trained():
    """At a number of epochs a smaller mixture also trains less, and keeping only what confidently
    helps measured best; at a fixed number of steps its few groups repeat, and dropping only what
    confidently hurts did. An explicit `threshold_on` wins over either."""
    assert load_recipe(DEMO).select.side == "low_end"
    assert load_recipe(DEMO, ["select.training=steps"]).select.side == "high_end"
    assert load_recipe(DEMO, ["select.training=steps", "select.threshold_on=estimate"]).select.side == "estimate"
    with pytest.raises(RecipeError, match="select.training"):
        load_recipe(DEMO, ["select.training=tokens"])


# What a measured result looks like in prose: a figure to two or more decimals, a benchmark's or a
# rank correlation's name, a date, a tally of runs or targets, a loss in nats. A Field description
# renders into the recipe reference; it says what a setting does and links to the docs for evidence,
# so it cannot go stale when a benchmark is rerun. Code spans (`[0.5, 0.75, 1]`) are values a user
# writes, not results, and are left out.
MEASURED = re.compile(r"\d\.\d{2,}|\b(?:T0|GSM8K|MMLU|Spearman|Kendall)\b|\b(?:19|20)\d\d-\d\d\b"
                      r"|\b\d+ (?:out )?of \d+\b|\b\d+ seeds\b|\bnats\b")


def _field_descriptions(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, str]:
    """Every field's description under `model`, by key path (a nested model's fields under its key)."""
    found = {}
    for name, info in model.model_fields.items():
        found[f"{prefix}{name}"] = info.description or ""
        pending = [info.annotation]
        while pending:
            annotation = pending.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found |= _field_descriptions(annotation, f"{prefix}{name}.")
            else:
                pending += typing.get_args(annotation)
    return found


def test_field_descriptions_quote_no_measured_figures():
    descriptions = _field_descriptions()
    assert {"select.threshold_on", "select.keep_fraction", "sources.max_rows", "model.tiny.layers"} <= set(descriptions)
    prose = {path: re.sub(r"`[^`]*`", "`…`", text) for path, text in descriptions.items()}
    quoted = {path: MEASURED.findall(text) for path, text in prose.items() if MEASURED.search(text)}
    assert not quoted, f"descriptions quoting measured results (link the docs instead): {quoted}"


def test_the_figure_pattern_catches_what_a_result_looks_like():
    """Each line once stood in a description; the settings' own numbers must pass."""
    results = ["T0: `low_end` 0.87 nats worse than all sources", "lower than all sources on 6 of 6 targets",
               "GSM8K: every half cost", "Spearman 0.81 with the truth", "measured on 2026-12-02", "(T0, 6 seeds)",
               "the default's 2.944 against all sources' 3.113"]
    for line in results:
        assert MEASURED.search(line), line
    settings = ["Holm's step-down at 2.5% one-sided", "at most 3·max(1000, max_rows) rows", "a .gguf file",
                "width of the tiny Llama (its MLP is twice as wide)", "train[:5000]", "fractions such as 0.5"]
    assert not [line for line in settings if MEASURED.search(line)]
