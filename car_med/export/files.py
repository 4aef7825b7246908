"""Writing export files safely: sanitised path parts, atomic writes, deterministic NIfTI and no-op rewrites.

Every file of an export reaches its final name by ``os.replace`` of a finished temporary file
(:func:`car_med.files.atomic_write`), so a reader (or a viewer opened mid-export) sees the old file or the whole new
one. Temporary files live in ``<export dir>/.incomplete/``, never beside the final files; a killed export can leave
only that folder, which the next export removes.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from car_med.files import atomic_write

__all__ = [
    "INCOMPLETE_DIR",
    "ExportFiles",
    "file_sha256",
    "nifti_bytes",
    "safe_path_part",
]

INCOMPLETE_DIR = ".incomplete"
"""Folder of an export's temporary files; absent once an export finished."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_PART = 120


def safe_path_part(value: Any, what: str) -> str:
    """``value`` as one path component: runs of characters other than letters, digits, ``.``, ``_`` and
    ``-`` become ``_``; leading and trailing dots and underscores are dropped (no hidden files, no ``..``); at
    most 120 characters.

    Raises:
        ValueError: nothing usable is left (names ``what``).
    """
    text = _UNSAFE.sub("_", str(value)).strip("._")[:_MAX_PART].rstrip("._")
    if not text:
        raise ValueError(f"{what} {value!r} gives an empty folder name after sanitising.")
    return text


def nifti_header(shape: Sequence[int], dtype: np.dtype, affine: np.ndarray) -> nib.Nifti1Header:
    """A NIfTI-1 header in mm with the affine as both qform and sform, code 1 (scanner), so every viewer
    (3D Slicer, ITK-SNAP, SimpleITK, nibabel) puts the voxels in the same scanner frame."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(tuple(int(s) for s in shape))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    return header


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A ``.nii.gz`` file's bytes; gzip without a timestamp, so the same array gives the same bytes."""
    image = nib.Nifti1Image(np.asarray(array), affine, header=nifti_header(array.shape, array.dtype, affine))
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ExportFiles:
    """Atomic writers rooted at one export folder.

    Args:
        root: the export folder (created).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging = self.root / INCOMPLETE_DIR

    def clear_staging(self) -> bool:
        """Remove what a killed export left in the staging folder; True if there was something."""
        if self.staging.exists():
            shutil.rmtree(self.staging)
            return True
        return False

    def finish(self) -> None:
        """Drop the (empty) staging folder at the end of an export."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def write_bytes(self, path: Path, payload: bytes) -> Path:
        """Write ``payload`` to ``path`` (under the root) atomically."""
        return self.write_chunks(path, (payload,))

    def write_chunks(self, path: Path, chunks: Iterable[bytes]) -> Path:
        """Write a stream of byte chunks to ``path`` atomically (for files too large to hold in memory)."""
        with atomic_write(path, temp_dir=self.staging) as tmp, open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
        return path

    def write_if_changed(self, path: Path, payload: bytes) -> bool:
        """Write ``payload`` unless ``path`` already holds exactly these bytes; True if written."""
        if path.is_file() and path.read_bytes() == payload:
            return False
        self.write_bytes(path, payload)
        return True

    def write_nifti(self, path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
        return self.write_bytes(path, nifti_bytes(array, affine))

    def write_sparse_nifti(
        self,
        path: Path,
        shape: Sequence[int],
        dtype: np.dtype,
        affine: np.ndarray,
        planes: dict[tuple[int, int], tuple[tuple[slice, slice], np.ndarray]],
    ) -> Path:
        """Stream a mostly-empty 3D/4D volume ``(X, Y, Z[, N])`` to ``.nii.gz`` without holding it in memory.

        Args:
            path: the file.
            shape: ``(X, Y, Z)`` or ``(X, Y, Z, N)``.
            dtype: voxel type.
            affine: the volume's affine.
            planes: ``{(z, n): ((x slice, y slice), values)}``, the only non-zero parts: ``values`` fill that
                window of plane ``z`` of volume ``n`` (``n`` is 0 for a 3D volume).
        """
        dtype = np.dtype(dtype)
        header = nifti_header(shape, dtype, affine)
        header.set_data_offset(352)
        x, y = int(shape[0]), int(shape[1])
        depth = int(shape[2])
        volumes = int(shape[3]) if len(shape) == 4 else 1

        def chunks() -> Iterator[bytes]:
            buffer = io.BytesIO()
            with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as stream:
                # nibabel has no streaming writer for a volume built plane by plane; the layout is simple:
                # a 348-byte header, 4 bytes of extension flag, then the voxels in Fortran order (x fastest)
                stream.write(header.binaryblock)
                stream.write(b"\x00" * 4)
                empty = np.zeros((x, y), dtype=dtype)
                for n in range(volumes):
                    for z in range(depth):
                        plane = planes.get((z, n))
                        if plane is None:
                            stream.write(empty.tobytes(order="F"))
                            continue
                        filled = empty.copy()
                        window, values = plane
                        filled[window] = values.astype(dtype)
                        stream.write(filled.tobytes(order="F"))
                        if buffer.tell() > 1 << 22:
                            yield buffer.getvalue()
                            buffer.seek(0)
                            buffer.truncate()
                    if buffer.tell() > 1 << 22:
                        yield buffer.getvalue()
                        buffer.seek(0)
                        buffer.truncate()
            yield buffer.getvalue()

        return self.write_chunks(path, chunks())
