"""The docs render every benchmark figure from a results file; nothing is typed in by hand."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"


@functools.cache
def hook():
    """docs/hooks/results.py, as mkdocs loads it."""
    spec = importlib.util.spec_from_file_location("results_hook", DOCS / "hooks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# Regions written by a generator, not by hand (each checked current by its own test): the recipe
# reference (`python docs/hooks/recipe_reference.py --write`; tests/test_recipe.py).
GENERATED = {"<!-- recipe-reference -->": "<!-- /recipe-reference -->"}


def prose_lines(text: str):
    """The lines of a markdown text outside fenced code blocks and generated regions."""
    fenced, generated_until = False, None
    for line in text.splitlines():
        if generated_until:
            generated_until = None if line.strip() == generated_until else generated_until
        elif line.strip() in GENERATED:
            generated_until = GENERATED[line.strip()]
        elif line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_no_table_in_the_docs_is_typed_by_hand(page):
    typed = [line for line in prose_lines((DOCS / page).read_text()) if line.lstrip().startswith("|")]
    assert not typed, f"docs/{page} has a table typed by hand; render it from a results file instead: {typed[0]}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_results_marker_names_a_results_file_that_renders(page):
    text = (DOCS / page).read_text()
    rendered = hook().render(text)
    assert "<!-- results:" not in rendered and "<!-- value:" not in rendered and "<!-- plot:" not in rendered


def test_a_marker_for_a_missing_results_file_fails():
    with pytest.raises(hook().MissingResult, match="no results file"):
        hook().render("<!-- results: no-such-run table -->")


def test_the_results_page_shows_every_selection_table_with_its_command():
    text = (DOCS / "results.md").read_text()
    assert len(text.splitlines()) <= 300
    names = re.findall(r"<!--\s*results:\s*(\S+)", text)
    assert names, "the Results page renders no table"
    rendered = hook().render(text)
    for name in set(names):
        assert f"python -m benchmarks" in rendered and f"benchmarks/results/{name}.json" in rendered


def test_the_readme_is_a_landing_page():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 150
    assert "make demo" in text and "make test" in text
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date stamp belongs in the research log"
    assert not re.search(r"EPYC|Xeon|\d+-core|\bthreads\b", text), "the machine belongs in the results files"


def test_the_readme_results_table_is_generated_from_the_results_files():
    text = README.read_text()
    assert hook().readme_with_table(text) == text, "run `python docs/hooks/results.py --readme`"


def test_the_method_page_is_short():
    assert len((DOCS / "method.md").read_text().splitlines()) <= 150
