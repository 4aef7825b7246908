"""``hypotheses.json``: a crop's or a nodule's M samples grouped into hypotheses (:mod:`car_med.hypotheses`).

Every export and prediction writes one per crop (``<patient>/<case>/hypotheses.json``, from the crop's M 2D
samples on the model grid) and one per nodule (``<patient>/series_<uid>/nodule_<id>/hypotheses.json``, from
the nodule's M sample volumes: the crops' samples stacked in z order). Both are derived from the stored
``samples.nii.gz`` files, so every run recomputes them from what is on disk and a rerun of the same command
rewrites no byte.

Samples are numbered from 0, as in the file names: sample m is volume m of ``samples.nii.gz`` and
``samples_ct.nii.gz``, ``strip_mNN.png`` with NN = m, and segment m + 1 of ``seg.dcm`` (DICOM numbers segments
from 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from car_med.hypotheses import DEFAULT_CONFIDENCE, DEFAULT_MIN_IOU, Hypothesis, group_samples, hypotheses_json

__all__ = [
    "GROUPING",
    "HYPOTHESES_FILE",
    "SAMPLE_NUMBERING",
    "HypothesisSettings",
    "crop_hypotheses",
    "hypotheses_payload",
    "nodule_hypotheses",
    "read_model_grid_samples",
]

HYPOTHESES_FILE = "hypotheses.json"

SAMPLE_NUMBERING = (
    "0-based, as in the file names: sample m is volume m (the last axis) of samples.nii.gz and "
    "samples_ct.nii.gz, strip_mNN.png with NN = m, and segment m + 1 of seg.dcm (DICOM numbers segments from 1)"
)

GROUPING = (
    "complete-linkage agglomerative clustering of the M samples on 1 - IoU, cut at 1 - min_iou: any two members "
    "of one hypothesis overlap with IoU >= min_iou; empty samples (IoU 1 with each other) form one 'no lesion' "
    "hypothesis. probability: the share of the M samples a hypothesis holds; interval: its Wilson score interval "
    "at the confidence; representative: the member with the highest mean IoU to the other members; mean_iou: "
    "the mean IoU over the pairs of members"
)


@dataclass(frozen=True)
class HypothesisSettings:
    """How samples are grouped into hypotheses (the arguments of :func:`car_med.hypotheses.group_samples`).

    Attributes:
        min_iou: every two members of one hypothesis overlap with at least this IoU, in (0, 1].
        confidence: the confidence of each probability's Wilson interval, in (0, 1).
    """

    min_iou: float = DEFAULT_MIN_IOU
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        if not (isinstance(self.min_iou, (int, float)) and 0 < self.min_iou <= 1):
            raise ValueError(
                f"--min-iou must lie in (0, 1] (the IoU every two samples of one hypothesis share), got "
                f"{self.min_iou!r}."
            )
        if not (isinstance(self.confidence, (int, float)) and 0 < self.confidence < 1):
            raise ValueError(
                f"--confidence must lie in (0, 1) (e.g. 0.95 for 95% Wilson intervals), got {self.confidence!r}."
            )

    def to_json(self) -> dict[str, float]:
        """``{"min_iou": ..., "confidence": ...}``."""
        return {"min_iou": float(self.min_iou), "confidence": float(self.confidence)}


def read_model_grid_samples(case_dir: Path, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A case's samples as boolean masks ``(M, I, J)`` (model grid) and the samples file's affine.

    Raises:
        ValueError: the file is missing or is not ``(I, J, 1, M)``; the message names it.
    """
    path = case_dir / record.get("files", {}).get("samples.nii.gz", "samples.nii.gz")
    if not path.is_file():
        raise ValueError(f"{path} does not exist; the case's hypotheses are made from its samples.")
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim != 4 or data.shape[2] != 1:
        raise ValueError(f"{path} has shape {data.shape}; samples are (I, J, 1, M).")
    return np.moveaxis(data[:, :, 0, :] > 0, -1, 0), np.asarray(image.affine, dtype=np.float64)


def _axis_mm(affine: np.ndarray, axis: int) -> float:
    return float(np.linalg.norm(affine[:3, axis]))


def crop_hypotheses(
    samples: np.ndarray, affine: np.ndarray, settings: HypothesisSettings
) -> tuple[list[Hypothesis], list[float]]:
    """Group one crop's samples ``(M, I, J)``; areas in mm² from the model grid's pixel size.

    Returns:
        The hypotheses, most probable first, and the pixel spacing ``[i, j]`` in mm they were measured with.
    """
    spacing = [_axis_mm(affine, 0), _axis_mm(affine, 1)]
    hypotheses = group_samples(samples, min_iou=settings.min_iou, confidence=settings.confidence, spacing=spacing)
    return hypotheses, spacing


def _slice_spacing(affine: np.ndarray, zs: Sequence[float]) -> float | None:
    """The nodule's slice spacing: the crop affine's third column (the scan's slice spacing), else the median step
    between its crops' z, else ``None`` (a single crop of a scan with no recorded spacing)."""
    spacing = _axis_mm(affine, 2)
    if math.isfinite(spacing) and spacing > 0:
        return spacing
    steps = np.diff(sorted(zs))
    steps = steps[steps > 0]
    return float(np.median(steps)) if len(steps) else None


def nodule_hypotheses(
    stack: Sequence[np.ndarray], affine: np.ndarray, zs: Sequence[float], settings: HypothesisSettings
) -> tuple[list[Hypothesis], list[float] | None]:
    """Group a nodule's sample volumes: ``stack`` holds each crop's samples ``(M, I, J)``, in z order.

    Sample m's volume is its mask on every crop, so the IoU of two samples is summed over the nodule's slices.
    The crops of one nodule may be centred differently slice by slice; that does not matter, since the samples
    of one slice share that slice's grid.

    Returns:
        The hypotheses (volumes in mm³ when the slice spacing is known) and the voxel spacing ``[z, i, j]`` in
        mm, in the samples' axis order (``None`` when the slice spacing is unknown).

    Raises:
        ValueError: the crops hold different numbers of samples or model-grid shapes.
    """
    shapes = {tuple(s.shape) for s in stack}
    if len(shapes) != 1:
        raise ValueError(
            f"the nodule's crops hold samples of different shapes {sorted(shapes)}; a nodule's crops must share M "
            "and the model grid (export them again with --overwrite)."
        )
    volumes = np.stack(list(stack), axis=1)  # (M, D, I, J)
    dz = _slice_spacing(affine, zs)
    spacing = None if dz is None else [dz, _axis_mm(affine, 0), _axis_mm(affine, 1)]
    hypotheses = group_samples(volumes, min_iou=settings.min_iou, confidence=settings.confidence, spacing=spacing)
    return hypotheses, spacing


def hypotheses_payload(
    hypotheses: Sequence[Hypothesis],
    *,
    level: str,
    ids: Mapping[str, Any],
    model: Mapping[str, Any],
    num_samples: int,
    seed: int,
    case_seed: int | None,
    settings: HypothesisSettings,
    samples: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of a ``hypotheses.json``.

    Args:
        hypotheses: the groups, most probable first.
        level: ``"crop"`` (2D, areas in mm²) or ``"nodule"`` (3D, volumes in mm³).
        ids: where the samples come from (patient, series, nodule, case ids).
        model: the model identification ``export.json`` records (:meth:`ModelSource.to_json`).
        num_samples: M.
        seed: the export's seed.
        case_seed: the noise seed the samples were drawn with (``None`` for a nodule whose crops drew apart).
        settings: ``min_iou`` and ``confidence``.
        samples: what was grouped: its shape, axes and spacing.
        extra: further top-level keys (the nodule's noise, each hypothesis's strip).

    Returns:
        A dict with the keys ``level``, the ``ids``, ``model``, ``num_samples``, ``seed``, ``case_seed``,
        ``min_iou``, ``confidence``, ``sample_numbering``, ``grouping``, ``samples`` and ``hypotheses`` (each:
        ``rank``, ``label``, ``no_lesion``, ``probability``, ``interval``, ``count``, ``members``,
        ``representative``, ``mean_iou``, ``voxels`` and ``volume_mm3`` or ``area_mm2``).
    """
    if level not in ("crop", "nodule"):
        raise ValueError(f"level must be 'crop' or 'nodule', got {level!r}.")
    size_key, other_key = ("area_mm2", "volume_mm3") if level == "crop" else ("volume_mm3", "area_mm2")
    rows = []
    for row in hypotheses_json(hypotheses):
        row.pop(other_key)
        row["interval"] = [round(v, 6) for v in row["interval"]]
        row["mean_iou"] = round(row["mean_iou"], 6)
        if row[size_key] is not None:
            row[size_key] = round(row[size_key], 3)
        rows.append(row)
    return {
        "level": level,
        **dict(ids),
        "model": dict(model),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "case_seed": None if case_seed is None else int(case_seed),
        **settings.to_json(),
        "sample_numbering": SAMPLE_NUMBERING,
        "grouping": GROUPING,
        "samples": dict(samples),
        **dict(extra or {}),
        "hypotheses": rows,
    }
