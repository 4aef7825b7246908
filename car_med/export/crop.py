"""Export one LIDC crop: its CT, readers, the model's M samples, Gbar, F and entropy as NIfTI, and a montage.

Two grids, both in the scanner frame (RAS mm), both in the crop's slice plane:

* the **crop grid**: the 180x180 crop at 0.5 mm that ``preprocessing.lidc`` wrote (``image.nii.gz``,
  ``annotations.nii.gz``), with the crop file's own affine;
* the **model grid**: the 128x128 window the model sees, the crop's centre (MONAI ``CenterSpatialCrop``,
  voxels 26..153 of both axes), with the crop affine shifted by those 26 voxels (``samples.nii.gz``,
  ``mean.nii.gz``, ``calibration.nii.gz``, ``entropy.nii.gz``).

A viewer overlays them by their affines; ``case.json`` and ``export.json`` name each file's grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from car_med.export.files import ExportFiles, safe_path_part
from car_med.files import json_bytes
from car_med.metrics import sample_diversity
from car_med.visualize.review import review_montage_png

__all__ = [
    "CASE_RECORD",
    "CROP_GRID_FILES",
    "MODEL_GRID_FILES",
    "CropInput",
    "case_id_of",
    "export_case",
    "read_crop",
]

CASE_RECORD = "case.json"
"""Written last in a case folder: a case is complete, and is not exported again, once it is there."""

CROP_GRID_FILES = ("image.nii.gz", "annotations.nii.gz")
MODEL_GRID_FILES = ("samples.nii.gz", "mean.nii.gz", "calibration.nii.gz", "entropy.nii.gz")

AMBIGUITY_SCORE = (
    "mean pairwise 1 - IoU of the foreground between the M samples (distinct pairs; two empty samples count "
    "as IoU 1), the GED's sample-diversity term: 0 when every sample is the same outline, near 1 when they "
    "hardly overlap"
)


@dataclass
class CropInput:
    """One crop read back from the preprocessing output.

    Attributes:
        hu: HU ``(I, J)`` on the crop grid (``I`` = column, ``J`` = row, as the NIfTI stores them).
        crop_affine: 4x4 RAS affine of the crop grid.
        annotations: the present readers' masks ``(I, J, R)`` uint8, or ``None`` when the item has no labels.
        window: ``(i, j)`` of the model window's first voxel in the crop.
        roi_size: ``(h, w)`` of the model window.
    """

    hu: np.ndarray
    crop_affine: np.ndarray
    annotations: np.ndarray | None
    window: tuple[int, int]
    roi_size: tuple[int, int]

    @property
    def model_affine(self) -> np.ndarray:
        shift = np.eye(4)
        shift[:2, 3] = self.window
        return self.crop_affine @ shift

    def in_window(self, array: np.ndarray) -> np.ndarray:
        (i, j), (h, w) = self.window, self.roi_size
        return array[i : i + h, j : j + w]


def case_id_of(item: Mapping[str, Any]) -> str:
    """A crop's folder name: ``scan<id>_n<nodule>_k<slice>`` when the item says where it comes from, else its
    image file's name without ``_image.nii.gz``; sanitised either way."""
    if all(item.get(k) is not None for k in ("scan_id", "nodule_id", "slice_index")):
        raw = f"scan{item['scan_id']}_n{int(item['nodule_id']):02d}_k{int(item['slice_index']):04d}"
    else:
        raw = Path(str(item["image"])).name.removesuffix(".gz").removesuffix(".nii").removesuffix("_image")
    return safe_path_part(raw, "case id")


def _load_2d(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not Path(path).is_file():
        raise ValueError(f"{what} {path} does not exist.")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises several types for broken files
        raise ValueError(f"{what} {path} cannot be read as NIfTI: {err}") from err
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 2:
        raise ValueError(f"{what} {path} has shape {data.shape}; a crop is (H, W) or (H, W, 1).")
    return data, np.asarray(image.affine, dtype=np.float64)


def read_crop(item: Mapping[str, Any], roi_size: Sequence[int] = (128, 128)) -> CropInput:
    """Read and check one datalist item's crop.

    Raises:
        ValueError: the item does not store HU (the model takes HU), a file is missing or unreadable, the crop
            is smaller than the model window or not finite, or a mask is not 0/1 or of another size; the
            message names the file.
    """
    intensity = item.get("intensity", "hu")
    if intensity != "hu":
        raise ValueError(
            f"item {item.get('image')} stores {intensity!r} intensities; export needs HU crops as "
            "`python -m preprocessing.lidc` writes them (the model's input is HU)."
        )
    hu, affine = _load_2d(str(item["image"]), "image")
    h, w = (int(s) for s in roi_size)
    if hu.shape[0] < h or hu.shape[1] < w:
        raise ValueError(f"image {item['image']} is {hu.shape[0]}x{hu.shape[1]}, smaller than the {h}x{w} model input.")
    hu = hu.astype(np.float32)
    if not np.isfinite(hu).all():
        raise ValueError(f"image {item['image']} holds NaN or Inf values.")
    present = item.get("annotator_present") or [True] * len(item.get("label") or [])
    masks = []
    for path, is_present in zip(item.get("label") or [], present):
        if not is_present:
            continue
        mask, mask_affine = _load_2d(str(path), "label")
        if mask.shape != hu.shape:
            raise ValueError(f"label {path} is {mask.shape}, its image {item['image']} is {hu.shape}.")
        if not np.allclose(mask_affine, affine, atol=1e-4):
            raise ValueError(f"label {path} has another affine than its image {item['image']}.")
        values = np.unique(mask)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"label {path} holds values {values[:8].tolist()}; masks must be 0/1.")
        masks.append(mask.astype(np.uint8))
    window = ((hu.shape[0] - h) // 2, (hu.shape[1] - w) // 2)  # MONAI CenterSpatialCrop's start
    annotations = np.stack(masks, axis=-1) if masks else None
    return CropInput(hu=hu, crop_affine=affine, annotations=annotations, window=window, roi_size=(h, w))


def _foreground(probabilities: np.ndarray) -> np.ndarray:
    """``(C, h, w)`` -> ``(h, w, 1)`` for two classes (the foreground channel), else ``(h, w, 1, C)``."""
    if probabilities.shape[0] == 2:
        return probabilities[1][..., None].astype(np.float32)
    return np.moveaxis(probabilities, 0, -1)[:, :, None, :].astype(np.float32)


@dataclass
class _CaseMaps:
    """The model's output for one crop, on the model grid.

    Attributes:
        samples: the M sampled masks ``(h, w, M)`` uint8.
        mean: Gbar, the samples' mean, in :func:`_foreground`'s layout.
        calibration: F's class probabilities, in :func:`_foreground`'s layout.
        entropy: the predictive entropy ``(h, w)``.
    """

    samples: np.ndarray
    mean: np.ndarray
    calibration: np.ndarray
    entropy: np.ndarray


def _predict_case(model: Any, crop: CropInput, num_samples: int, seed: int) -> _CaseMaps:
    x = crop.in_window(crop.hu)[None, None].astype(np.float32)
    out = model.predict(None, x, params={"num_samples": int(num_samples), "seed": int(seed)})
    return _CaseMaps(
        samples=np.moveaxis(out["samples"][0], 0, -1).astype(np.uint8),
        mean=_foreground(out["mean"][0]),
        calibration=_foreground(out["calibration"][0]),
        entropy=out["entropy"][0].astype(np.float32),
    )


def _write_case_volumes(files: ExportFiles, case_dir: Path, crop: CropInput, maps: _CaseMaps) -> dict[str, Path]:
    """Write the crop-grid and model-grid NIfTIs of one case; return them by file name."""
    model_affine, crop_affine = crop.model_affine, crop.crop_affine
    written = {
        "image.nii.gz": files.write_nifti(case_dir / "image.nii.gz", crop.hu.astype(np.int16)[..., None], crop_affine),
        "samples.nii.gz": files.write_nifti(case_dir / "samples.nii.gz", maps.samples[:, :, None, :], model_affine),
        "mean.nii.gz": files.write_nifti(case_dir / "mean.nii.gz", maps.mean, model_affine),
        "calibration.nii.gz": files.write_nifti(case_dir / "calibration.nii.gz", maps.calibration, model_affine),
        "entropy.nii.gz": files.write_nifti(case_dir / "entropy.nii.gz", maps.entropy[..., None], model_affine),
    }
    if crop.annotations is not None:
        path = case_dir / "annotations.nii.gz"
        written["annotations.nii.gz"] = files.write_nifti(path, crop.annotations[:, :, None, :], crop_affine)
    return written


def _sample_ambiguity(samples: np.ndarray) -> float:
    """:data:`AMBIGUITY_SCORE` of ``(h, w, M)`` samples; 0 for a single sample."""
    foreground = torch.from_numpy(np.moveaxis(samples, -1, 0)[None].astype(np.int64))
    return float(sample_diversity(foreground, unbiased=True)[0]) if samples.shape[-1] > 1 else 0.0


def _areas_mm2(masks: np.ndarray, affine: np.ndarray) -> list[float]:
    """The area in mm^2 of each mask of ``(h, w, n)`` masks on the grid of ``affine``, to 0.001 mm^2."""
    pixel_mm2 = float(np.linalg.norm(affine[:3, 0]) * np.linalg.norm(affine[:3, 1]))
    return [round(float(a) * pixel_mm2, 3) for a in masks.reshape(-1, masks.shape[-1]).sum(axis=0)]


def _case_record(
    record: Mapping[str, Any],
    crop: CropInput,
    maps: _CaseMaps,
    written: Mapping[str, Path],
    *,
    seed: int,
    num_samples: int,
    ambiguity: float,
) -> dict[str, Any]:
    """``record`` (the case's ids) with the scores, sample and reader areas, files and grids of ``case.json``."""
    union = maps.samples.any(axis=-1)
    areas = _areas_mm2(maps.samples, crop.model_affine)
    return {
        **record,
        "status": "ok",
        "case_seed": int(seed),
        "num_samples": int(num_samples),
        "ambiguity": round(ambiguity, 6),
        "mean_entropy_in_union": round(float(maps.entropy[union].mean()) if union.any() else 0.0, 6),
        "sample_areas_mm2": areas,
        "area_mean_mm2": round(float(np.mean(areas)), 3),
        "area_min_mm2": round(float(np.min(areas)), 3),
        "area_max_mm2": round(float(np.max(areas)), 3),
        "reader_areas_mm2": [] if crop.annotations is None else _areas_mm2(crop.annotations, crop.crop_affine),
        "files": {name: path.name for name, path in written.items()} | {"montage": "montage.png"},
        "grids": {
            "crop": {"shape": list(crop.hu.shape), "files": [n for n in CROP_GRID_FILES if n in written]},
            "model": {
                "shape": list(crop.roi_size),
                "offset_in_crop": list(crop.window),
                "files": list(MODEL_GRID_FILES),
            },
        },
    }


def _case_montage(crop: CropInput, maps: _CaseMaps, title: str, hu_window: Sequence[float]) -> bytes:
    """The review montage PNG of one case: CT, readers, F, Gbar, entropy and the samples, in the model window."""
    return review_montage_png(
        crop.in_window(crop.hu),
        None if crop.annotations is None else crop.in_window(crop.annotations),
        maps.calibration[:, :, 0] if maps.calibration.ndim == 3 else maps.calibration[:, :, 0, -1],
        maps.mean[:, :, 0] if maps.mean.ndim == 3 else maps.mean[:, :, 0, -1],
        maps.entropy,
        maps.samples,
        title=title,
        hu_window=hu_window,
    )


def export_case(
    model: Any,
    item: Mapping[str, Any],
    case_dir: Path,
    files: ExportFiles,
    num_samples: int,
    seed: int,
    record: dict[str, Any],
    hu_window: Sequence[float] = (-1024.0, 400.0),
    roi_size: Sequence[int] = (128, 128),
) -> dict[str, Any]:
    """Sample one crop and write its files into ``case_dir``; ``case.json`` last.

    Args:
        model: a :class:`car_med.registry.CARPyfuncModel` (HU batch in, samples and maps out).
        item: the datalist item (absolute paths).
        case_dir: the case folder.
        files: the export's atomic writers.
        num_samples: M.
        seed: this case's noise seed (``predict(x, params={"seed": seed})`` gives the same samples).
        record: the case's ids, extended and returned.
        hu_window: grey window of the montage.
        roi_size: the model window.

    Returns:
        The case record (also in ``case.json``): ids, seed, ambiguity score, sample areas, files and grids.
    """
    crop = read_crop(item, roi_size)
    maps = _predict_case(model, crop, num_samples, seed)
    written = _write_case_volumes(files, case_dir, crop, maps)
    ambiguity = _sample_ambiguity(maps.samples)
    record = _case_record(record, crop, maps, written, seed=seed, num_samples=num_samples, ambiguity=ambiguity)
    title = f"{record['patient_id']}  {record['case_id']}  ambiguity {ambiguity:.3f}"
    files.write_bytes(case_dir / "montage.png", _case_montage(crop, maps, title, hu_window))
    files.write_bytes(case_dir / CASE_RECORD, json_bytes(record))
    return record
