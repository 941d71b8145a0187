"""mkdocs hook: the Python API page's stage modules, listed from `dataselect.pipeline.STAGES`.

A page that holds the marker `<!-- stage-modules -->` gets, in its place, one mkdocstrings block
(`::: dataselect.<module>`) per stage, in pipeline order, so a stage that is added, renamed or
moved to another module appears on the page without editing it. mkdocstrings renders the blocks
afterwards, when the page's markdown is converted.
"""

from __future__ import annotations

from dataselect.pipeline import STAGES

MARKER = "<!-- stage-modules -->"


def stage_blocks() -> str:
    modules = dict.fromkeys(stage.run.__module__ for stage in STAGES)  # in order, each once
    return "\n".join(f"::: {module}\n" for module in modules)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, stage_blocks()) if MARKER in markdown else markdown
