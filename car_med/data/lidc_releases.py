"""Convert the public LIDC-IDRI 2D crop releases into the datalist form read by :mod:`car_med.data.lidc`.

Two releases are supported (see ``docs/lidc_releases.md``):

- the DeepMind PNG crops (LIDC v2, Kohl et al. / HPU-Net; the CAR paper's LIDC numbers):
  ``<split>/images/LIDC-IDRI-XXXX/z<z>_c<k>.png`` and ``<split>/gt/LIDC-IDRI-XXXX/z<z>_c<k>_l<j>.png``;
- the Prob. U-Net/PHiSeg pickle (LIDC v1, 15,096 slices): a dict keyed ``<patient>_<slice>`` with values
  ``{"image", "masks", "series_uid"}`` and no split.

Both are written as one NIfTI per image and per reader mask plus a ``datalist.json``, so training reads
small files and never holds a release in memory. The NIfTIs follow the DICOM preprocessing's convention
(:func:`car_med.ct.nifti.write_crop_nifti`, ``docs/lidc.md``): the array is indexed ``(i, j, k) = (column, row,
slice)``, shape ``(W, H, 1)`` for an ``(H, W)`` crop, so one loader returns the same layout for all three
sources. Command line::

    python -m car_med.data.lidc_releases png SRC --output-dir OUT
    python -m car_med.data.lidc_releases pickle SRC.pickle --output-dir OUT [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from car_med.ct.geometry import LPS_TO_RAS
from car_med.ct.nifti import write_crop_nifti
from car_med.data.splits import split_patients

__all__ = [
    "PngName",
    "convert_pickle_release",
    "convert_png_release",
    "load_release_pickle",
    "main",
    "parse_png_name",
    "pickle_affine",
    "png_affine",
    "split_patients",
]

logger = logging.getLogger(__name__)

NUM_READERS = 4
PNG_SPLITS = {"train": "training", "val": "validation", "test": "test"}
PNG_PIXEL_MM = 0.5
"""DeepMind resampled every scan to 0.5 mm x 0.5 mm in-plane before cropping (HPU-Net README)."""


def png_affine(z: float) -> np.ndarray:
    """The RAS affine of a PNG-release crop stored as ``(i, j, k) = (column, row, 0)``.

    As for the DICOM crops of an axial scan (``docs/lidc.md``): column ``i`` steps 0.5 mm along the DICOM
    row direction (LPS +x, RAS -x), row ``j`` 0.5 mm along the column direction (LPS +y, RAS -y), and the
    slice sits at RAS z = ``z`` (LPS z = RAS z). The release keeps neither the in-plane origin nor the slice
    spacing, so the origin is 0 in-plane and the third column is 1 mm.
    """
    affine_lps = np.diag([PNG_PIXEL_MM, PNG_PIXEL_MM, 1.0, 1.0])
    affine_lps[2, 3] = float(z)
    return LPS_TO_RAS @ affine_lps


def pickle_affine() -> np.ndarray:
    """The affine of a pickle-release crop stored as ``(i, j, k) = (column, row, 0)``.

    The pickle keeps no geometry: 1 mm "pixels" at the origin, but with the same axis sense as the DICOM
    and PNG crops (column -> RAS -x, row -> RAS -y, i.e. orientation LPS), so orientation-aware transforms
    treat all sources alike.
    """
    return LPS_TO_RAS.copy()


# A signed decimal with any number of decimals (and an exponent, in case a z was written with repr()).
_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_PNG_NAME = re.compile(rf"z(?P<z>{_FLOAT})_c(?P<crop>\d+)(?:_l(?P<reader>\d+))?")
_PATIENT_KEY = re.compile(r"(?P<patient>[^_]+)_(?P<slice>.+)")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class PngName:
    """The fields of one DeepMind release file name.

    Attributes:
        image_stem: the image's stem, ``z<z>_c<k>``; an image and its masks share it.
        z: the slice position in mm, parsed as a signed float.
        crop: the crop number within the slice (``c<k>``): several lesions can share a slice.
        reader: the reader slot of a mask (``l<j>``), ``None`` for an image.
    """

    image_stem: str
    z: float
    crop: int
    reader: int | None


def parse_png_name(name: str | os.PathLike) -> PngName:
    """Parse a DeepMind release file name such as ``z-123.5_c0.png`` or ``z105.0_c1_l3.png``.

    The ``z`` is everything between the leading ``z`` and ``_c``: a float with an optional sign and any
    number of decimals (``z-123.5``, ``z+7.25``, ``z7.25``, ``z105``). The HPU-Net README writes the scheme
    as ``z-<imageZposition>``, but the release's names for scans with negative z (most of LIDC) read
    ``z-105.0``, so the ``-`` is the sign; a doubled sign (``z--105.0``) is rejected rather than guessed.

    Raises:
        ValueError: the name does not follow the release's naming scheme.
    """
    path = Path(name)
    if path.suffix.lower() != ".png" or not (match := _PNG_NAME.fullmatch(path.stem)):
        raise ValueError(
            f"{os.fspath(name)!r} is not a DeepMind LIDC release file name; expected 'z<z>_c<k>.png' (image) or "
            "'z<z>_c<k>_l<j>.png' (mask), with <z> a signed float such as -123.5."
        )
    reader = match["reader"]
    return PngName(
        image_stem=f"z{match['z']}_c{match['crop']}",
        z=float(match["z"]),
        crop=int(match["crop"]),
        reader=None if reader is None else int(reader),
    )


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        array = np.asarray(image)
    if mode == "L":
        return array
    if mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
        # cv2-based writers may store grey crops as three equal channels.
        return np.ascontiguousarray(array[..., 0])
    raise ValueError(
        f"{str(path)!r}: expected an 8-bit greyscale PNG (mode 'L', or RGB with equal channels), got mode {mode!r}."
    )


def _read_mask_png(path: Path) -> np.ndarray:
    mask = _read_png(path)
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 255}:
        raise ValueError(f"{str(path)!r}: release masks must hold only 0 and 255, found values {values[:8].tolist()}.")
    return (mask == 255).astype(np.uint8)


def _write_datalist(output_dir: Path, splits: Mapping[str, list], header: Mapping[str, Any]) -> Path:
    content = dict(header)
    for key in ("training", "validation", "test"):
        content[f"num{key[0].upper()}{key[1:]}"] = len(splits.get(key, []))
    for key in ("training", "validation", "test"):
        content[key] = splits.get(key, [])
    path = output_dir / "datalist.json"
    path.write_text(json.dumps(content, indent=1))
    return path


def _prepare_output(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    output_dir = Path(output_dir)
    if (output_dir / "datalist.json").exists() and not overwrite:
        raise FileExistsError(
            f"{str(output_dir / 'datalist.json')!r} exists; pass overwrite=True (--overwrite) to replace it."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _find_png_split_dir(src: Path, split: str) -> Path | None:
    # The tarballs unpack to <split>/{images,gt}; the CAR code expects them under lidc_crops_<split>/<split>.
    for candidate in (src / split, src / f"lidc_crops_{split}" / split):
        if (candidate / "images").is_dir():
            return candidate
    return None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _collect_png_patient(images_dir: Path, gt_dir: Path) -> list[tuple[PngName, Path, list[Path]]]:
    images: dict[str, tuple[PngName, Path]] = {}
    for path in _visible(images_dir):
        name = parse_png_name(path.name)
        if name.reader is not None:
            raise ValueError(f"{str(path)!r}: a mask file name in the images folder.")
        images[name.image_stem] = (name, path)
    masks: dict[str, dict[int, Path]] = {}
    if gt_dir.is_dir():
        for path in _visible(gt_dir):
            name = parse_png_name(path.name)
            if name.reader is None:
                raise ValueError(f"{str(path)!r}: an image file name in the gt folder (masks end in _l<j>.png).")
            if name.image_stem not in images:
                expected = images_dir / f"{name.image_stem}.png"
                raise ValueError(f"{str(path)!r}: mask without an image; expected {str(expected)!r}.")
            masks.setdefault(name.image_stem, {})[name.reader] = path
    crops = []
    for stem, (name, path) in images.items():
        readers = masks.get(stem, {})
        # The README numbers readers 1..4; the files we know use l0..l3. Accept either, never a mix.
        if set(readers) not in ({0, 1, 2, 3}, {1, 2, 3, 4}):
            raise ValueError(
                f"{str(path)!r}: expected {NUM_READERS} masks {stem}_l0..l3.png in {str(gt_dir)!r}, "
                f"found readers {sorted(readers)}."
            )
        crops.append((name, path, [readers[k] for k in sorted(readers)]))
    return sorted(crops, key=lambda crop: (crop[0].z, crop[0].crop))


def _progress(items: list, progress: bool, desc: str, unit: str) -> Iterable:
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit)


def _write_crop(
    output_dir: Path,
    rel_dir: tuple[str, str],
    stem: str,
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    affine: np.ndarray,
) -> dict[str, Any]:
    """Write one crop's image and reader masks as NIfTI; return the item's ``image`` and ``label`` paths.

    ``rel_dir`` is ``(split folder, patient folder)``: the image goes to ``<split>/images/<patient>/<stem>.nii.gz``,
    reader ``k``'s mask to ``<split>/labels/<patient>/<stem>_l<k>.nii.gz``, both relative to ``output_dir``.
    """
    split_folder, patient_folder = rel_dir
    rel_image = Path(split_folder, "images", patient_folder, f"{stem}.nii.gz")
    rel_labels = [Path(split_folder, "labels", patient_folder, f"{stem}_l{k}.nii.gz") for k in range(NUM_READERS)]
    write_crop_nifti(output_dir / rel_image, image, affine, xform_code=2)
    for rel, mask in zip(rel_labels, masks):
        write_crop_nifti(output_dir / rel, mask, affine, xform_code=2)
    return {"image": rel_image.as_posix(), "label": [rel.as_posix() for rel in rel_labels]}


def _release_item(
    files: Mapping[str, Any],
    *,
    patient_id: str,
    series_uid: str,
    slice_z: float | None,
    release_fields: Mapping[str, Any],
    intensity: str,
) -> dict[str, Any]:
    """A datalist item of a release crop: every reader slot present (a release cannot tell a missing reader from an
    empty mask), no nodule or annotation ids; ``release_fields`` follow ``slice_z`` (the key order is the file's)."""
    return {
        **files,
        "patient_id": patient_id,
        "series_uid": series_uid,
        "nodule_id": "",
        "annotation_ids": [],
        "slice_z": slice_z,
        **release_fields,
        "num_annotators": NUM_READERS,
        "annotator_present": [True] * NUM_READERS,
        "intensity": intensity,
    }


def _png_split_dirs(src: Path) -> dict[str, Path | None]:
    found = {split: _find_png_split_dir(src, split) for split in PNG_SPLITS}
    if not any(found.values()):
        raise ValueError(f"{str(src)!r}: no split folder with an 'images' subfolder; expected {sorted(PNG_SPLITS)}.")
    return found


def _png_patients(images_root: Path, gt_root: Path) -> list[Path]:
    """The patient folders of one split; refuses stray files and masks of a patient without images."""
    patients = [p for p in _visible(images_root) if p.is_dir()]
    stray = [p for p in _visible(images_root) if not p.is_dir()]
    if stray:
        raise ValueError(f"{str(stray[0])!r}: expected only patient folders in {str(images_root)!r}.")
    if gt_root.is_dir():
        orphans = sorted({p.name for p in _visible(gt_root)} - {p.name for p in patients})
        if orphans:
            raise ValueError(f"{str(gt_root / orphans[0])!r}: masks for a patient with no images folder.")
    return patients


def _read_png_crop(image_path: Path, mask_paths: Sequence[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    image = _read_png(image_path)
    masks = [_read_mask_png(p) for p in mask_paths]
    for mask_path, mask in zip(mask_paths, masks):
        if mask.shape != image.shape:
            raise ValueError(f"{str(mask_path)!r}: mask shape {mask.shape} differs from image shape {image.shape}.")
    return image, masks


def _convert_png_patient(src: Path, output_dir: Path, split: str, patient_dir: Path, gt_dir: Path) -> list[dict]:
    """Write the crops of one patient folder of the PNG release; return their datalist items, sorted by z."""
    patient = patient_dir.name
    items = []
    for name, image_path, mask_paths in _collect_png_patient(patient_dir, gt_dir):
        image, masks = _read_png_crop(image_path, mask_paths)
        files = _write_crop(output_dir, (split, patient), name.image_stem, image, masks, png_affine(name.z))
        item = _release_item(
            files,
            patient_id=patient,
            series_uid="",
            slice_z=name.z,
            release_fields={"crop_index": name.crop},
            intensity="uint8",
        )
        item["source"] = image_path.relative_to(src).as_posix()
        items.append(item)
    return items


_PNG_HEADER = {
    "name": "LIDC-IDRI 2D crops, DeepMind PNG release",
    "description": "Kohl et al. 180x180 crops at 0.5 mm (HPU-Net release); compare with SPEC 4 'LIDC v2' only.",
    "lidc_version": "v2",
    "release": "deepmind_png",
    "tensorImageSize": "2D",
}


def convert_png_release(
    src: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert the DeepMind PNG release (LIDC v2) into NIfTI files and a ``datalist.json``.

    ``src`` holds ``train``, ``val`` and ``test`` folders, each with ``images/<patient>/z<z>_c<k>.png`` and
    ``gt/<patient>/z<z>_c<k>_l<j>.png`` (``j`` in 0..3); ``lidc_crops_<split>/<split>`` is found too. The
    release's split is kept (train -> ``training``, val -> ``validation``, test -> ``test``).

    Written: ``OUT/<split>/images/<patient>/<stem>.nii.gz`` (uint8, as in the PNG),
    ``OUT/<split>/labels/<patient>/<stem>_l<j>.nii.gz`` (uint8 {0, 1}, from 0/255) and ``OUT/datalist.json``.
    Each item has ``intensity: "uint8"``, ``slice_z`` from the name, ``crop_index``, ``source`` (the image
    PNG, relative to ``src``), an empty ``series_uid``/``nodule_id``/``annotation_ids`` (the release has
    none), and all four slots present: the release cannot tell a missing reader from an empty mask. The
    affine has 0.5 mm pixels and the slice z, but the in-plane origin is unknown, so exports from these
    crops are not in the scanner frame. Arrays are stored ``(column, row, 1)`` with the affine of
    :func:`png_affine`, as the DICOM preprocessing stores its crops.

    Raises:
        ValueError: a file name, mask count, mask value or shape does not match the release format; the
            message names the file.
    """
    src = Path(src)
    found = _png_split_dirs(src)
    output_dir = _prepare_output(output_dir, overwrite)
    splits: dict[str, list] = {}
    for split, split_dir in found.items():
        key = PNG_SPLITS[split]
        splits[key] = []
        if split_dir is None:
            logger.warning("%s: no %r split found; datalist split %r is empty.", src, split, key)
            continue
        gt_root = split_dir / "gt"
        patients = _png_patients(split_dir / "images", gt_root)
        for patient_dir in _progress(patients, progress, desc=f"png {split}", unit="patient"):
            splits[key] += _convert_png_patient(src, output_dir, split, patient_dir, gt_root / patient_dir.name)
    return _write_datalist(output_dir, splits, _PNG_HEADER)


class _ReleaseUnpickler(pickle.Unpickler):
    # The release holds only dicts, lists, strings and numpy arrays: refuse any other global, since
    # unpickling an arbitrary global can run arbitrary code.
    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }

    def __init__(self, file: Any, source: str, trusted: bool, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self.source = source
        self.trusted = trusted

    def find_class(self, module: str, name: str) -> Any:
        if not self.trusted and (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"{self.source!r}: refusing to load global '{module}.{name}'; the LIDC release pickle holds only "
                "dicts, strings and numpy arrays. Pass trusted=True (--trusted) only for a file you trust."
            )
        return super().find_class(module, name)


def load_release_pickle(path: str | os.PathLike, *, trusted: bool = False, encoding: str = "latin1") -> dict:
    """Load the Prob. U-Net/PHiSeg LIDC pickle.

    The file is unpickled straight from a buffered file object, so its bytes are read object by object
    (one 64 KiB array at a time), never as one multi-GB buffer; the older loaders concatenated 2 GB chunks
    into a ``bytearray`` first and needed the file size twice over. Peak memory is the unpickled dict:
    about the file size for a protocol 3+ pickle (measured 1.02x), about twice the array bytes for a
    protocol-2 pickle, whose arrays pass through latin-1 strings (measured 1.76x the file size).

    Args:
        path: the ``.pickle`` file.
        trusted: allow any global; by default only numpy array reconstruction is allowed.
        encoding: how to decode Python 2 strings (``latin1`` also decodes numpy arrays from Python 2).
    """
    with open(path, "rb") as file:
        return _ReleaseUnpickler(file, os.fspath(path), trusted, encoding).load()


def _pickle_image(key: str, value: Any) -> tuple[np.ndarray, str]:
    image = np.asarray(value)
    if image.ndim != 2:
        raise ValueError(f"pickle key {key!r} field 'image': expected a 2D array, got shape {image.shape}.")
    if image.dtype == np.uint8:
        return image, "uint8"
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
            raise ValueError(
                f"pickle key {key!r} field 'image': expected floats in [0, 1], got range "
                f"[{np.nanmin(image)}, {np.nanmax(image)}] (non-finite values: {int((~np.isfinite(image)).sum())})."
            )
        return image, "unit"
    raise ValueError(f"pickle key {key!r} field 'image': expected floats in [0, 1] or uint8, got dtype {image.dtype}.")


def _pickle_masks(key: str, value: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
    if isinstance(value, np.ndarray) and value.ndim == 3:
        value = list(value)
    if not isinstance(value, (list, tuple)) or len(value) != NUM_READERS:
        got = f"{len(value)} masks" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"pickle key {key!r} field 'masks': expected a list of {NUM_READERS} masks, got {got}.")
    masks = []
    for k, mask in enumerate(value):
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(
                f"pickle key {key!r} field 'masks[{k}]': shape {mask.shape} differs from image shape {shape}."
            )
        values = np.unique(mask)
        if not set(values.tolist()) <= {0, 1}:
            raise ValueError(
                f"pickle key {key!r} field 'masks[{k}]': expected binary 0/1 values, found {values[:8].tolist()}."
            )
        masks.append(mask.astype(np.uint8))
    return masks


def _pickle_patients(src: Path, data: Any) -> dict[str, tuple[str, str]]:
    """``{key: (patient, slice key)}`` of the release dict; refuses a non-dict or a key not ``<patient>_<slice>``."""
    if not isinstance(data, dict):
        raise ValueError(f"{str(src)!r}: expected a dict keyed '<patient>_<slice>', got {type(data).__name__}.")
    parsed = {}
    for key in data:
        match = _PATIENT_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(f"{str(src)!r}: key {key!r} is not of the form '<patient>_<slice>'.")
        parsed[key] = (match["patient"], match["slice"])
    return parsed


def _pickle_entry(key: str, entry: Any) -> tuple[np.ndarray, str, list[np.ndarray], str]:
    """One checked release entry: ``(image, intensity, masks, series_uid)``; errors name the key and field."""
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"pickle key {key!r}: expected a dict with 'image', 'masks' and 'series_uid', got {type(entry).__name__}."
        )
    missing = [field for field in ("image", "masks", "series_uid") if field not in entry]
    if missing:
        raise ValueError(f"pickle key {key!r}: missing field(s) {missing}.")
    image, intensity = _pickle_image(key, entry["image"])
    masks = _pickle_masks(key, entry["masks"], image.shape)
    series_uid = entry["series_uid"]
    if isinstance(series_uid, bytes):
        series_uid = series_uid.decode("ascii")
    if not isinstance(series_uid, str):
        raise ValueError(f"pickle key {key!r} field 'series_uid': expected a string, got {series_uid!r}.")
    return image, intensity, masks, series_uid


def _pickle_file_stem(key: str, used_names: dict[str, str]) -> str:
    """The file stem of ``key``, recorded in ``used_names``; two keys that sanitise alike are refused."""
    file_stem = _SAFE_NAME.sub("_", key)
    if used_names.setdefault(file_stem, key) != key:
        raise ValueError(f"pickle keys {used_names[file_stem]!r} and {key!r} map to the same file name {file_stem!r}.")
    return file_stem


_PICKLE_SPLIT_FOLDERS = {"training": "train", "validation": "val", "test": "test"}


def _pickle_header(seed: int, fractions: Sequence[float]) -> dict[str, Any]:
    return {
        "name": "LIDC-IDRI 2D crops, Prob. U-Net/PHiSeg pickle release",
        "description": "128x128 crops from the LIDC pickle; compare with SPEC 4 'LIDC v1' only.",
        "lidc_version": "v1",
        "release": "probunet_pickle",
        "tensorImageSize": "2D",
        "split_seed": seed,
        "split_fractions": list(fractions),
    }


def convert_pickle_release(
    src: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    trusted: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert the Prob. U-Net/PHiSeg LIDC pickle (LIDC v1) into NIfTI files and a ``datalist.json``.

    Memory: the pickle is one dict, which Python can only rebuild whole, so the conversion needs about the
    pickle's size in RAM once (see :func:`load_release_pickle`; about 2 GB for the real release, up to about
    4 GB if it was written with protocol 2); entries are dropped from the dict as they are written.
    Training then reads the small per-item files and never holds the release.

    The pickle has no split, so patients (the key up to its first ``_``) are split ``fractions`` with
    :func:`split_patients`. Written: ``OUT/<split>/images/<patient>/<key>.nii.gz`` (the image's dtype,
    usually float32 in [0, 1]), ``OUT/<split>/labels/<patient>/<key>_l<j>.nii.gz`` (uint8 {0, 1}) and
    ``OUT/datalist.json``. Items carry ``intensity: "unit"`` (``"uint8"`` for a uint8 image),
    ``series_uid`` from the pickle, ``pickle_key``, ``slice_key`` (the key after the patient), ``slice_z: null``
    (the pickle has no position), and all four slots present. Arrays are stored ``(column, row, 1)``, as
    the DICOM preprocessing stores its crops; the affine is :func:`pickle_affine` (the pickle keeps no
    geometry).

    Raises:
        ValueError: an entry is malformed; the message names its key and field.
        pickle.UnpicklingError: the file needs a global other than numpy arrays and ``trusted`` is False.
    """
    src = Path(src)
    data = load_release_pickle(src, trusted=trusted)
    parsed = _pickle_patients(src, data)
    split_of = split_patients((patient for patient, _ in parsed.values()), seed=seed, fractions=fractions)
    output_dir = _prepare_output(output_dir, overwrite)
    splits: dict[str, list] = {key: [] for key in _PICKLE_SPLIT_FOLDERS}
    used_names: dict[str, str] = {}
    for key in _progress(sorted(data), progress, desc="pickle", unit="slice"):
        image, intensity, masks, series_uid = _pickle_entry(key, data.pop(key))
        patient, slice_key = parsed[key]
        rel_dir = (_PICKLE_SPLIT_FOLDERS[split_of[patient]], _SAFE_NAME.sub("_", patient))
        files = _write_crop(output_dir, rel_dir, _pickle_file_stem(key, used_names), image, masks, pickle_affine())
        item = _release_item(
            files,
            patient_id=patient,
            series_uid=series_uid,
            slice_z=None,
            release_fields={"slice_key": slice_key, "pickle_key": key},
            intensity=intensity,
        )
        splits[split_of[patient]].append(item)
    return _write_datalist(output_dir, splits, _pickle_header(seed, fractions))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m car_med.data.lidc_releases {png,pickle} SRC --output-dir OUT``."""
    parser = argparse.ArgumentParser(
        prog="python -m car_med.data.lidc_releases",
        description="Convert a public LIDC crop release into NIfTI files and a datalist.json for car_med.data.lidc.",
    )
    sub = parser.add_subparsers(dest="release", required=True)
    png = sub.add_parser("png", help="DeepMind PNG crops (LIDC v2): SRC holds train/, val/, test/")
    pkl = sub.add_parser("pickle", help="Prob. U-Net/PHiSeg pickle (LIDC v1): SRC is the .pickle file")
    for p in (png, pkl):
        p.add_argument("src", help="release folder (png) or pickle file (pickle)")
        p.add_argument("--output-dir", required=True, help="where to write NIfTI files and datalist.json")
        p.add_argument("--overwrite", action="store_true", help="replace an existing datalist.json")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    pkl.add_argument("--seed", type=int, default=0, help="patient split seed (default 0)")
    pkl.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    pkl.add_argument("--trusted", action="store_true", help="allow any pickled global (only for files you trust)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.release == "png":
        path = convert_png_release(args.src, args.output_dir, overwrite=args.overwrite, progress=not args.no_progress)
    else:
        path = convert_pickle_release(
            args.src,
            args.output_dir,
            fractions=args.fractions,
            seed=args.seed,
            trusted=args.trusted,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    counts = json.loads(path.read_text())
    print(f"wrote {path}: " + ", ".join(f"{k} {len(counts[k])}" for k in ("training", "validation", "test")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
