"""Files that readers see whole or not at all: atomic writes, canonical JSON, folder swaps.

Every atomic write of the library goes through :func:`atomic_write`: the content is written to a temporary file on
the target's file system, synced, and moved to its name by one ``os.replace``, so a reader (or a run that resumes
after a kill) finds the old file or the whole new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "json_bytes", "replace_dir"]


def _new_temporary(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty file ``<prefix><random><suffix>`` in ``folder`` that no one else has, with the permissions
    ``open(..., "w")`` would give (``tempfile.mkstemp`` gives 0600, which would make every atomic write private)."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {str(folder)!r} after 100 tries.")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(
    path: str | os.PathLike, *, suffix: str = ".tmp", temp_dir: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces ``path`` at once.

    For writers that take a file name (``torch.save``, ``np.savez``, matplotlib's ``savefig``, ``open``). When the
    block ends normally the file is synced to disk and moved to ``path`` with ``os.replace``; when it raises, the
    temporary file is removed and ``path`` (missing or old) is left as it was. The temporary file is hidden,
    ``.<name>.<random><suffix>``, and is created empty before the block.

    Args:
        path: the file to write; its folder is created.
        suffix: the temporary file's ending. A writer that picks its format from the name needs its own:
            ``np.savez`` appends ``.npz`` to any other name (pass ``suffix=".tmp.npz"``), ``savefig`` wants the
            image type (or ``format=``).
        temp_dir: the folder of the temporary file, on the same file system as ``path`` (default ``path``'s
            folder); :class:`car_med.export.files.ExportFiles` keeps an export's partial files apart this way.

    Example::

        with atomic_write(best) as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    folder = path.parent if temp_dir is None else Path(temp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(folder, f".{path.name}.", suffix)
    try:
        yield tmp
        _fsync(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that readers see either the old content or the full new content, never a partial one."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(payload)


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
