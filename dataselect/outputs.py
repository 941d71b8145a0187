"""What every reader of a finished output folder shares: the manifest and its table cells.

export writes the manifest; push, report and the CLI read it through `read_manifest`, so a folder
that dataselect did not write is refused the same way everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST
from .errors import UserError


class OutputError(UserError, RuntimeError):
    """The folder holds no dataselect output."""


def read_manifest(output_dir: Path) -> dict:
    """The folder's manifest, or OutputError: only dataselect outputs are reported on or pushed."""
    path = Path(output_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(f"{output_dir} is not a dataselect output folder (no readable {MANIFEST}: {err}); "
                          "run `dataselect build` first and use its output.path") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != "dataselect":
        raise OutputError(f"{path} was not written by dataselect")
    return manifest


def text(value: Any, digits: int = 3) -> str:
    """A value as a table shows it: numbers shortened, booleans as yes/no, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def cell(value: Any, digits: int = 3) -> str:
    """A markdown table cell: `text`, without a pipe or newline that would break the table."""
    return text(value, digits).replace("|", "\\|").replace("\n", " ")
