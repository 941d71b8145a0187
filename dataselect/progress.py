"""Progress bars, in one place so that every stage honours the CLI's --quiet the same way."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(**kwargs) -> tqdm:
    """A progress bar with rate and ETA, off when the CLI runs quiet (TQDM_DISABLE=1)."""
    return tqdm(disable=os.environ.get("TQDM_DISABLE") == "1", **kwargs)
