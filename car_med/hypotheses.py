"""A lesion's M samples grouped into distinct outlines (hypotheses), each with its probability.

CAR's samples are calibrated by construction (L_cal), so the share of the M samples that draw one outline is
an estimate of that outline's probability. :func:`group_samples` turns M sample masks of one crop (2D) or one
nodule (3D) into hypotheses: groups of samples that all overlap each other with IoU >= ``min_iou``, most probable
first, each with a Wilson score interval for its share, a representative sample and its size.

The grouping is complete-linkage agglomerative clustering (``scipy.cluster.hierarchy``) on 1 - IoU, cut at
1 - ``min_iou``: complete linkage merges two groups only when *every* pair across them is close enough, so any
two members of one hypothesis overlap with IoU >= ``min_iou`` (single or average linkage would chain outlines
that do not overlap). Empty samples have IoU 1 with each other (the project's rule, docs/metrics.md) and 0 with
any drawn outline, so they form one "no lesion" hypothesis of their own.

The result does not depend on the order of the samples: identical masks are merged before clustering, and the
distinct masks are clustered in an order fixed by their content, so ties in the linkage resolve the same way
for any permutation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.stats import norm

__all__ = ["Hypothesis", "group_samples", "wilson_interval", "hypotheses_json"]

#: the default IoU every two members of one hypothesis share at least (docs/metrics.md says why 0.5)
DEFAULT_MIN_IOU = 0.5
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Hypothesis:
    """One distinct outline among a lesion's samples.

    Attributes:
        probability: the share of the M samples this hypothesis holds.
        interval: the Wilson score interval ``(low, high)`` of that share at the grouping's confidence.
        members: the indices of its samples in the input, ascending.
        representative: the member with the highest mean IoU to the other members (ties: the smaller mask,
            then the first in content order, then the lowest index).
        mean_iou: the mean IoU over all pairs of members (1.0 for a single member or for identical members).
        voxels: foreground pixels/voxels of the representative (0 for the "no lesion" hypothesis).
        volume_mm3: the representative's volume for 3D samples with ``spacing``, else ``None``.
        area_mm2: the representative's area for 2D samples with ``spacing``, else ``None``.
    """

    probability: float
    interval: tuple[float, float]
    members: tuple[int, ...]
    representative: int
    mean_iou: float
    voxels: int
    volume_mm3: float | None = None
    area_mm2: float | None = None

    @property
    def count(self) -> int:
        """How many samples this hypothesis holds."""
        return len(self.members)

    @property
    def empty(self) -> bool:
        """True for the "no lesion" hypothesis (its samples draw nothing)."""
        return self.voxels == 0

    def label(self, rank: int) -> str:
        """A short label for viewers, e.g. ``"H1 p=0.69 (0.44-0.86)"``; ``rank`` counts from 1."""
        low, high = self.interval
        name = f"H{rank}" + (" no lesion" if self.empty else "")
        return f"{name} p={self.probability:.2f} ({low:.2f}-{high:.2f})"

    def to_dict(self, rank: int) -> dict:
        """Plain JSON of this hypothesis; ``rank`` counts from 1."""
        return {
            "rank": rank,
            "label": self.label(rank),
            "no_lesion": self.empty,
            "probability": self.probability,
            "interval": list(self.interval),
            "count": self.count,
            "members": list(self.members),
            "representative": self.representative,
            "mean_iou": self.mean_iou,
            "voxels": self.voxels,
            "volume_mm3": self.volume_mm3,
            "area_mm2": self.area_mm2,
        }


def wilson_interval(successes: int, trials: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial share ``successes / trials`` at ``confidence``.

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at 0 or M samples
    of M, which matters at the small M a lesion gets.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}.")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, trials={trials}], got {successes}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    z = float(norm.ppf(0.5 + confidence / 2))
    share = successes / trials
    scale = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / scale
    half = z / scale * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_array(value: object) -> object:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _stacked(samples: Sequence[object]) -> np.ndarray:
    """One array from a sequence of per-sample masks, e.g. sample volumes read one file at a time."""
    masks = [_as_array(mask) for mask in samples]
    for index, mask in enumerate(masks):
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"sample {index} must be a boolean numpy array or torch tensor, got {type(mask)}.")
        if mask.shape != masks[0].shape:
            raise ValueError(
                f"spatial shape mismatch: sample {index} has shape {tuple(mask.shape)}, sample 0 has "
                f"{tuple(masks[0].shape)}; all samples of one lesion must be on one grid."
            )
    if not masks:
        raise ValueError("samples must hold at least one sample (M >= 1), got an empty sequence.")
    return np.stack(masks)


def _as_masks(samples: object) -> np.ndarray:
    if isinstance(samples, (list, tuple)) and not (samples and isinstance(samples[0], (bool, list, tuple))):
        samples = _stacked(samples)
    samples = _as_array(samples)
    if not isinstance(samples, np.ndarray):
        raise TypeError(
            f"samples must be a boolean numpy array or torch tensor (M, *spatial), or a sequence of per-sample "
            f"arrays, got {type(samples)}."
        )
    if samples.dtype != np.bool_:
        raise TypeError(
            f"samples must be boolean masks (M, *spatial), got dtype {samples.dtype} with shape "
            f"{tuple(samples.shape)}; for class maps pass e.g. samples == foreground_class."
        )
    if samples.ndim not in (3, 4):
        raise ValueError(
            f"samples must be (M, H, W) for a crop or (M, D, H, W) for a nodule, got shape {tuple(samples.shape)}."
        )
    if samples.shape[0] < 1:
        raise ValueError(f"samples must hold at least one sample (M >= 1), got shape {tuple(samples.shape)}.")
    if 0 in samples.shape[1:]:
        raise ValueError(f"samples have an empty spatial shape {tuple(samples.shape[1:])}.")
    return samples


def _distinct_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct masks in content order (size, then bytes), and for every sample the index of its mask."""
    # only pixels some sample draws matter to any IoU; a nodule's samples cover a small part of the crop
    active = masks.reshape(masks.shape[0], -1)
    active = active[:, active.any(axis=0)]
    packed = np.packbits(active, axis=1)
    sizes = active.sum(axis=1)
    keys = [(int(size), row.tobytes()) for size, row in zip(sizes, packed)]
    distinct = sorted(set(keys))
    position = {key: index for index, key in enumerate(distinct)}
    of_sample = np.array([position[key] for key in keys], dtype=np.int64)
    first = np.array([keys.index(key) for key in distinct], dtype=np.int64)
    return active[first], of_sample


def _iou_matrix(active: np.ndarray) -> np.ndarray:
    """Pairwise IoU of flattened masks; two empty masks have IoU 1."""
    x = active.astype(np.float64)
    intersection = x @ x.T  # float64 counts are exact far beyond any CT volume's pixel count
    size = np.diag(intersection)
    union = size[:, None] + size[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 1.0)
    return iou


def group_samples(
    samples: object,
    *,
    min_iou: float = DEFAULT_MIN_IOU,
    confidence: float = DEFAULT_CONFIDENCE,
    spacing: Sequence[float] | None = None,
) -> list[Hypothesis]:
    """Group a lesion's M sample masks into hypotheses, most probable first.

    Args:
        samples: boolean masks ``(M, H, W)`` (a crop's samples) or ``(M, D, H, W)`` (a nodule's sample
            volumes), numpy or torch; or a sequence of M per-sample masks of one shape.
        min_iou: every two members of one hypothesis overlap with at least this IoU; in (0, 1]. What counts as
            "distinct" depends on the task; the default 0.5 is the LIDC choice (docs/metrics.md).
        confidence: the confidence of each probability's Wilson interval, in (0, 1).
        spacing: the pixel/voxel spacing in mm, one value per spatial axis in the samples' axis order; with
            it each hypothesis carries its representative's area (2D, mm²) or volume (3D, mm³).

    Returns:
        The hypotheses, sorted by decreasing probability; ties: the smaller representative first, then by
        content. Their members partition ``range(M)`` and their probabilities sum to 1.

    Raises:
        TypeError: when ``samples`` is not a boolean array or tensor.
        ValueError: on M = 0, per-sample masks of different shapes, a shape that is neither 2D nor 3D per
            sample, ``min_iou`` outside (0, 1], ``confidence`` outside (0, 1), or ``spacing`` of the wrong
            length or not positive.
    """
    masks = _as_masks(samples)
    spatial = masks.shape[1:]
    spacing = _checked_settings(min_iou, confidence, spacing, spatial)
    num_samples = masks.shape[0]
    distinct, of_sample = _distinct_masks(masks)
    iou = _iou_matrix(distinct)
    group_of_distinct = _complete_linkage_groups(iou, min_iou)
    sizes = distinct.sum(axis=1)
    voxel_mm = math.prod(spacing) if spacing is not None else None
    hypotheses = []
    for group in np.unique(group_of_distinct):
        masks_in = np.flatnonzero(group_of_distinct == group)
        members = np.flatnonzero(np.isin(of_sample, masks_in))
        chosen, mean_iou = _most_central(masks_in, of_sample, iou)
        representative = int(np.flatnonzero(of_sample == chosen)[0])
        voxels = int(sizes[chosen])
        size_mm = None if voxel_mm is None else voxels * voxel_mm
        hypotheses.append(
            (
                (-len(members), int(chosen)),
                Hypothesis(
                    probability=len(members) / num_samples,
                    interval=wilson_interval(len(members), num_samples, confidence),
                    members=tuple(int(i) for i in members),
                    representative=representative,
                    mean_iou=min(1.0, mean_iou),
                    voxels=voxels,
                    volume_mm3=size_mm if len(spatial) == 3 else None,
                    area_mm2=size_mm if len(spatial) == 2 else None,
                ),
            )
        )
    return [hypothesis for _, hypothesis in sorted(hypotheses, key=lambda pair: pair[0])]


def _checked_settings(
    min_iou: float, confidence: float, spacing: Sequence[float] | None, spatial: tuple[int, ...]
) -> tuple[float, ...] | None:
    """Refuse ``min_iou`` outside (0, 1], ``confidence`` outside (0, 1) and a ``spacing`` that is not one positive
    value per axis of ``spatial``; return ``spacing`` as a tuple of floats."""
    if not 0 < min_iou <= 1:
        raise ValueError(f"min_iou must lie in (0, 1], got {min_iou}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != len(spatial) or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(
            f"spacing must give one positive value per spatial axis of samples {tuple(spatial)} "
            f"(in that axis order), got {spacing}."
        )
    return spacing


def _complete_linkage_groups(iou: np.ndarray, min_iou: float) -> np.ndarray:
    """The group (from 0) of each distinct mask: complete-linkage clusters on 1 - IoU cut at 1 - ``min_iou``."""
    if len(iou) == 1:
        return np.zeros(1, dtype=np.int64)
    # 1 - iou is monotone in iou under rounding, so "distance <= 1 - min_iou" is exactly "iou >= min_iou"
    distance = squareform(1.0 - iou, checks=False)
    tree = linkage(distance, method="complete")
    return fcluster(tree, t=1.0 - min_iou, criterion="distance") - 1


def _most_central(masks_in: np.ndarray, of_sample: np.ndarray, iou: np.ndarray) -> tuple[int, float]:
    """The distinct mask of one group with the highest mean IoU to the group's other samples (ties: the first in
    content order), and the mean IoU over all pairs of the group's samples (identical copies count, with IoU 1).

    Args:
        masks_in: the group's distinct masks, indices into ``iou``, ascending.
        of_sample: each sample's distinct mask.
        iou: IoU between the distinct masks.
    """
    weights = np.array([(of_sample == m).sum() for m in masks_in], dtype=np.float64)
    sub = iou[np.ix_(masks_in, masks_in)]
    count = weights.sum()
    if count > 1:
        to_others = (sub @ weights - 1.0) / (count - 1)
        pair_sum = weights @ sub @ weights - count
        mean_iou = float(pair_sum / (count * (count - 1)))
    else:
        to_others, mean_iou = np.ones(1), 1.0
    best = max(range(len(masks_in)), key=lambda i: (round(float(to_others[i]), 12), -i))
    return masks_in[best], mean_iou


def hypotheses_json(hypotheses: Sequence[Hypothesis]) -> list[dict]:
    """The hypotheses as plain JSON, ranked from 1 in their order."""
    return [hypothesis.to_dict(rank) for rank, hypothesis in enumerate(hypotheses, start=1)]
