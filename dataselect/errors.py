"""The errors a user can fix (a recipe, a source, a model, an output folder), which the CLI prints
without a traceback.

Every such error derives from `UserError`, so the CLI catches them all while importing none of the
modules that raise them. Each is defined where it is raised (`SourceError` in `sources`, ...),
except `RecipeError`: the pipeline raises it too, and reading the pipeline's stage table must not
load pydantic.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave dataselect; the message names the file, key or path at fault."""


class RecipeError(UserError, ValueError):
    """A recipe that cannot be read or validated; the message names the file and key."""
