"""Files that readers see whole or not at all: atomic writes, canonical JSON, folder swaps."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "json_bytes", "replace_dir"]


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that readers see either the old content or the full new content, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_bytes(payload: Any) -> bytes:
    """Canonical JSON: sorted keys, fixed indentation, trailing newline, so equal content gives equal bytes."""
    return (json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write canonical JSON atomically (see :func:`json_bytes`)."""
    atomic_write_bytes(path, json_bytes(payload))


def replace_dir(staging: Path, final: Path) -> None:
    """Move a finished staging folder into place, replacing a stale folder of the same name."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
