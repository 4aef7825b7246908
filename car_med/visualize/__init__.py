"""Figures a person would rather look at than read (matplotlib, Agg backend, files only)."""

from __future__ import annotations

import os
import tempfile

__all__ = ["isolate_matplotlib_config"]


def isolate_matplotlib_config() -> None:
    """Point matplotlib's config and cache at a temp folder unless the user chose one.

    Importing matplotlib creates ``~/.config/matplotlib`` and a font cache; car-med writes nothing under
    ``~``. Call this before the first matplotlib import.
    """
    if "MPLCONFIGDIR" not in os.environ:
        folder = os.path.join(tempfile.gettempdir(), f"car-med-mplconfig-{os.getuid()}")
        os.makedirs(folder, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = folder
    os.environ.setdefault("MPLBACKEND", "Agg")
