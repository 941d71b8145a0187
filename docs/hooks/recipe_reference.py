"""The recipe reference, generated from the pydantic models in `dataselect.recipe`: a table with
one row per key path of a recipe (`sources[].group_by`, `select.threshold_on`, ...), its type, its
default and its meaning, the `description` of the model's field.

It is committed in `docs/recipes.md`, between `<!-- recipe-reference -->` and
`<!-- /recipe-reference -->`, so it reads where people look (the repository, an editor) and not
only on the built site: `python docs/hooks/recipe_reference.py --write` rewrites it there after a
recipe model changes, and `tests/test_recipe.py` fails while it is out of date.

As an mkdocs hook it renders the same table into the page as it is built (a bare marker, without
its closing one, is replaced too), so the site cannot drift from the models either; a field
without a description fails a strict build (and is a warning otherwise).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from dataselect.recipe import Recipe

MARKER = "<!-- recipe-reference -->"
END = "<!-- /recipe-reference -->"
GENERATED = ("<!-- generated from dataselect/recipe.py by `python docs/hooks/recipe_reference.py --write`; "
             "edit the Field descriptions there, not this table -->")
PAGE = Path(__file__).resolve().parents[1] / "recipes.md"
log = logging.getLogger("mkdocs.plugins.recipe_reference")

_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


class Row:
    """One key path: its type, default and description, and the (model, field name) pairs it documents."""

    def __init__(self, path: str, type: str, default: str, description: str,
                 fields: list[tuple[type[BaseModel], str]]):
        self.path, self.type, self.default, self.description, self.fields = path, type, default, description, fields


def recipe_models(model: type[BaseModel] = Recipe) -> list[type[BaseModel]]:
    """Every model a recipe is made of: `model` and those nested in its fields, first seen first."""
    found = [model]
    for info in model.model_fields.values():
        for nested in _models_in(info.annotation):
            found += [m for m in recipe_models(nested) if m not in found]
    return found


def reference_rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[Row]:
    """One row per key path under `model`, in the models' field order; a key path that two models of a
    union share (`format.id`) is one row."""
    rows: dict[str, Row] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        _add(rows, Row(path, _type_of(info), _default_of(info), (info.description or "").strip(), [(model, name)]))
        annotation = info.annotation
        below = f"{path}[]." if _is_list_of_models(annotation) else f"{path}."
        for nested in _models_in(annotation):
            for row in reference_rows(nested, below):
                _add(rows, row)
    return list(rows.values())


def reference_markdown(rows: list[Row] | None = None) -> str:
    rows = reference_rows() if rows is None else rows
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in rows:
        cells = [f"`{row.path}`", row.type, row.default, row.description or "*(no description)*"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def with_reference(markdown: str, rows: list[Row] | None = None) -> str:
    """`markdown` with the region between MARKER and END (or a bare MARKER) holding the current
    table, markers kept: what `--write` commits."""
    start, stop = _region(markdown)
    return f"{markdown[:start]}{MARKER}\n{GENERATED}\n\n{reference_markdown(rows)}\n{END}{markdown[stop:]}"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    rows = reference_rows()
    bare = [f"`{row.path}` ({', '.join(f'{m.__name__}.{name}' for m, name in row.fields)})"
            for row in rows if not row.description]
    if bare:
        message = f"recipe reference: no description in dataselect/recipe.py for {', '.join(bare)}"
        if config is not None and config.get("strict"):
            from mkdocs.exceptions import PluginError

            # an error, not a warning: `mkdocs build --strict -q` drops warnings before counting them
            raise PluginError(message)
        log.warning(message)
    start, stop = _region(markdown)  # the committed table is replaced, not repeated
    return markdown[:start] + reference_markdown(rows) + markdown[stop:]


def _region(markdown: str) -> tuple[int, int]:
    """Where the reference is: from MARKER to the end of END, or the bare MARKER alone."""
    start = markdown.find(MARKER)
    if start < 0:
        raise ValueError(f"no {MARKER} in the page")
    end = markdown.find(END, start)
    return start, start + len(MARKER) if end < 0 else end + len(END)


def _add(rows: dict[str, Row], row: Row) -> None:
    seen = rows.get(row.path)
    if seen is None:
        rows[row.path] = row
        return
    seen.fields += row.fields
    for attr in ("type", "default", "description"):
        a, b = getattr(seen, attr), getattr(row, attr)
        if b and b != a:
            setattr(seen, attr, f"{a}; or {b}" if a else b)


def _members(annotation: Any) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_list_of_models(annotation: Any) -> bool:
    return any(typing.get_origin(m) is list and any(_is_model(a) for a in typing.get_args(m))
               for m in _members(annotation))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    found = []
    for member in _members(annotation):
        if _is_model(member):
            found.append(member)
        elif typing.get_origin(member) is list:
            found += [m for arg in typing.get_args(member) for m in _models_in(arg)]
    return found


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return f"`{choices[0]}`" if len(choices) == 1 else "one of " + ", ".join(f"`{c}`" for c in choices)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if _is_model(item):
            return "list of mappings (keys below)"
        if typing.get_origin(item) is Literal:
            return "list, each " + _type_name(item)
        return f"list of {_type_name(item)}s"
    if _is_model(annotation):
        return "mapping (keys below)"
    members = _members(annotation)
    if len(members) > 1:
        names = list(dict.fromkeys(_type_name(m) for m in members if m is not type(None)))  # one "mapping" for many
        return ", or ".join(names + (["null"] if type(None) in members else []))
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _type_of(info) -> str:
    text = _type_name(info.annotation)
    limits = []
    for meta in info.metadata:
        limits += [f"{sign} {getattr(meta, attr)}" for attr, sign in _BOUNDS if getattr(meta, attr, None) is not None]
        if getattr(meta, "min_length", None) is not None:
            limits.append(f"at least {meta.min_length}")
        if getattr(meta, "pattern", None) is not None:
            limits.append(f"matching `{meta.pattern}`")
    return text + (f" ({', '.join(limits)})" if limits else "")


def _default_of(info) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "the defaults below"
    dumped = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6)
    return f"`{dumped.removesuffix(chr(10)).removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    """A table cell: one line, with `|` escaped outside code spans (inside them it does not split)."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    return "".join(p if p.startswith("`") else p.replace("|", r"\|") for p in parts)


def main(argv: list[str] | None = None) -> int:
    """`--write`: rewrite the reference in docs/recipes.md; `--check`: exit 1 while it is out of date."""
    parser = argparse.ArgumentParser(description="The recipe reference in docs/recipes.md, from dataselect/recipe.py.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the table in docs/recipes.md")
    action.add_argument("--check", action="store_true", help="exit 1 if the committed table is out of date")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    current = with_reference(text)
    if args.check:
        if current != text:
            print(f"{PAGE} is out of date: run `python docs/hooks/recipe_reference.py --write`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(current)
    print(f"wrote the recipe reference in {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
