"""mkdocs hook: the stages, listed from `dataselect.pipeline.STAGES`, so the docs cannot drift from it.

- `<!-- stage-modules -->` (the Python API page): one mkdocstrings block (`::: dataselect.<module>`)
  per stage, in pipeline order; mkdocstrings renders them when the page is converted.
- `<!-- stage-table -->` (the Architecture page): one row per stage: its module, the stages whose
  outputs it reads, what it does (its `about`) and what it writes (the first sentence of its
  output folder's class in `dataselect.artifacts`).
"""

from __future__ import annotations

from dataselect.artifacts import OUTPUTS
from dataselect.pipeline import STAGES

MARKER = "<!-- stage-modules -->"
TABLE = "<!-- stage-table -->"


def stage_blocks() -> str:
    modules = dict.fromkeys(stage.runs.split(":")[0] for stage in STAGES)  # in order, each once
    return "\n".join(f"::: dataselect.{module}\n" for module in modules)


def _first_sentence(text: str | None) -> str:
    words = " ".join((text or "").split())
    return words.split(". ")[0].rstrip(".") + "." if words else ""


def stage_table() -> str:
    lines = ["| stage | module | reads | what it does | what it writes |", "|---|---|---|---|---|"]
    for stage in STAGES:
        output = OUTPUTS.get(stage.name)
        writes = _first_sentence(output.__doc__) if output else "the output folder (see the guide)."
        reads = ", ".join(stage.reads) or "the recipe's sources and target"
        lines.append(f"| {stage.name} | `{stage.runs.split(':')[0]}` | {reads} | {stage.about} | {writes} |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, stage_blocks())
    if TABLE in markdown:
        markdown = markdown.replace(TABLE, stage_table())
    return markdown
