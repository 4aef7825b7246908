"""Slice-level presence calibration and speckle of hard segmentation samples.

**Presence.** On LIDC the main ambiguity of a crop is often whether a reader drew the nodule on that slice at
all: in the demo cohort 57-66% of crops have at least one empty reader slot. A map counts as *empty* when its
foreground covers fewer than ``min_area`` pixels (default :data:`DEFAULT_MIN_AREA`, 5 pixels, 1.25 mm^2 at the
crops' 0.5 mm), so a sample holding only stray pixels counts as "no lesion here", as a reader's empty slot
does. The same rule is applied to the readers' masks and to the samples. Per crop:

- the readers' empty share: the fraction of the R reader slots that are empty;
- the samples' empty share: the fraction of the N samples that are empty;
- the presence gap: their absolute difference. Its mean over crops is ``presence_gap``; 0 is perfect.

A reliability plot bins the crops by the samples' empty share (the model's probability that the lesion is not
on this slice) and plots the readers' mean empty share per bin.

**Speckle.** The share of the samples' foreground pixels that lie in 4-connected components of fewer than
``min_size`` pixels (default 5). Reader masks are filled contours, so for them it is 0; a sampler that
thresholds pixels independently scores high. Pooled over all pixels of all samples of all crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from car_med.components import small_components
from car_med.metrics.metric import PerImageMetric, reduce_per_image

__all__ = [
    "DEFAULT_MIN_AREA",
    "DEFAULT_SPECKLE_SIZE",
    "PresenceGap",
    "PresenceReliability",
    "SpeckleFraction",
    "empty_share",
    "plot_presence_reliability",
    "presence_gap",
    "presence_reliability",
    "speckle_pixels",
]

DEFAULT_MIN_AREA = 5
DEFAULT_SPECKLE_SIZE = 5


def _check_maps(maps: Any, name: str) -> torch.Tensor:
    maps = torch.as_tensor(maps.as_tensor() if hasattr(maps, "as_tensor") else maps)
    if maps.ndim != 4:
        raise ValueError(f"{name} must be hard maps (B, N, H, W), got shape {tuple(maps.shape)}.")
    if maps.is_floating_point():
        raise ValueError(f"{name} must be integer label maps (argmax samples or reader masks), got {maps.dtype}.")
    return maps


def empty_share(maps: torch.Tensor, min_area: int = DEFAULT_MIN_AREA, foreground: int = 1) -> torch.Tensor:
    """Per image, the fraction of its maps whose ``foreground`` area is under ``min_area`` pixels.

    Args:
        maps: integer maps ``(B, N, H, W)``: samples or reader slots.
        min_area: a map with fewer foreground pixels counts as empty (``1``: only truly empty maps).
        foreground: the foreground class id.

    Returns:
        ``(B,)`` float64 in [0, 1].
    """
    maps = _check_maps(maps, "maps")
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1 pixel, got {min_area}.")
    area = (maps == foreground).flatten(2).sum(-1)
    return (area < min_area).double().mean(dim=1)


def presence_gap(
    samples: torch.Tensor, labels: torch.Tensor, min_area: int = DEFAULT_MIN_AREA, foreground: int = 1
) -> torch.Tensor:
    """Per image ``|empty share of the samples - empty share of the reader slots|`` (see the module docstring).

    Args:
        samples: hard samples ``(B, N, H, W)``.
        labels: reader masks ``(B, R, H, W)``; an empty slot is a reader's "not on this slice".
        min_area: the area under which a map counts as empty, applied to both.
        foreground: the foreground class id.

    Returns:
        ``(B,)`` float64.
    """
    samples, labels = _check_maps(samples, "samples"), _check_maps(labels, "labels")
    if samples.shape[0] != labels.shape[0] or samples.shape[2:] != labels.shape[2:]:
        raise ValueError(
            f"samples {tuple(samples.shape)} and labels {tuple(labels.shape)} must share batch and spatial size."
        )
    return (empty_share(samples, min_area, foreground) - empty_share(labels, min_area, foreground)).abs()


def speckle_pixels(
    samples: torch.Tensor, min_size: int = DEFAULT_SPECKLE_SIZE, foreground: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, foreground pixels in 4-connected components under ``min_size`` pixels, and all foreground pixels.

    The components are found by :func:`car_med.components.small_components`.

    Returns:
        ``(speckle, total)``, each ``(B,)`` float64 pixel counts summed over the N samples.
    """
    samples = _check_maps(samples, "samples")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1 pixel, got {min_size}.")
    foreground_pixels = samples == foreground
    speckle = small_components(samples, min_size, foreground).flatten(1).sum(dim=1).double().cpu()
    total = foreground_pixels.flatten(1).sum(dim=1).double().cpu()
    return speckle, total


class PresenceGap(PerImageMetric):
    """:func:`presence_gap` per image as a MONAI cumulative metric (``y_pred`` samples, ``y`` reader masks).

    Its buffer also keeps each image's two empty shares, for :meth:`reliability`.
    """

    def __init__(self, min_area: int = DEFAULT_MIN_AREA, foreground: int = 1, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.min_area = int(min_area)
        self.foreground = foreground

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("PresenceGap needs y: the reader masks (B, R, H, W).")
        sample_share = empty_share(y_pred, self.min_area, self.foreground)
        reader_share = empty_share(y, self.min_area, self.foreground)
        return torch.stack([(sample_share - reader_share).abs(), sample_share, reader_share], dim=1)

    def _shares(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("PresenceGap.aggregate() called before any batch was added.")
        return data.reshape(-1, 3)

    def aggregate(self, reduction: str | None = None) -> torch.Tensor:
        return reduce_per_image(self._shares()[:, 0], reduction or self.reduction)

    def reliability(self, n_bins: int = 10) -> PresenceReliability:
        """The crops binned by the samples' empty share (see :func:`presence_reliability`)."""
        shares = self._shares()
        return presence_reliability(shares[:, 1], shares[:, 2], n_bins)


class SpeckleFraction(PerImageMetric):
    """Pooled speckle share (:func:`speckle_pixels`) as a MONAI cumulative metric over ``y_pred`` samples.

    ``aggregate()`` returns the pooled share (speckle pixels over all foreground pixels of the pass; 0 when
    there is no foreground); ``aggregate("none")`` gives each image's own share (NaN without foreground).
    """

    def __init__(self, min_size: int = DEFAULT_SPECKLE_SIZE, foreground: int = 1) -> None:
        super().__init__("mean")
        self.min_size = int(min_size)
        self.foreground = foreground

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        speckle, total = speckle_pixels(y_pred, self.min_size, self.foreground)
        return torch.stack([speckle, total], dim=1)

    def aggregate(self, reduction: str | None = None) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("SpeckleFraction.aggregate() called before any batch was added.")
        data = data.reshape(-1, 2)
        if (reduction or "mean") == "none":
            return torch.where(data[:, 1] > 0, data[:, 0] / data[:, 1].clamp(min=1), torch.nan)
        total = data[:, 1].sum()
        return data[:, 0].sum() / total if total > 0 else torch.zeros((), dtype=data.dtype)


@dataclass
class PresenceReliability:
    """Crops binned by the samples' empty share.

    Attributes:
        bin_edges: ``(n_bins + 1,)`` equal-width edges over [0, 1].
        sample_empty: per bin, the mean empty share of the samples (the model's "absent" probability).
        reader_empty: per bin, the mean empty share of the reader slots (how often readers left it empty).
        count: crops per bin.
        gap: the mean presence gap over all crops.
    """

    bin_edges: np.ndarray
    sample_empty: np.ndarray
    reader_empty: np.ndarray
    count: np.ndarray
    gap: float


def presence_reliability(sample_share: Any, reader_share: Any, n_bins: int = 10) -> PresenceReliability:
    """Bin crops by their samples' empty share; per bin the mean sample and reader empty shares.

    Args:
        sample_share: ``(K,)`` samples' empty share per crop.
        reader_share: ``(K,)`` readers' empty share per crop.
        n_bins: equal-width bins over [0, 1]; the last bin includes 1.
    """
    s = np.asarray(torch.as_tensor(sample_share, dtype=torch.float64)).reshape(-1)
    r = np.asarray(torch.as_tensor(reader_share, dtype=torch.float64)).reshape(-1)
    if s.shape != r.shape:
        raise ValueError(f"sample_share {s.shape} and reader_share {r.shape} must have one value per crop each.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(s, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        sample_empty = np.bincount(index, weights=s, minlength=n_bins) / count
        reader_empty = np.bincount(index, weights=r, minlength=n_bins) / count
    gap = float(np.abs(s - r).mean()) if s.size else float("nan")
    return PresenceReliability(edges, sample_empty, reader_empty, count, gap)


def plot_presence_reliability(
    curves: dict[str, PresenceReliability], path: str | Path, title: str = "presence calibration"
) -> Path:
    """One reliability plot of several predictors: x the samples' empty share, y the readers' empty share.

    Each curve's legend gives its mean presence gap; empty bins are left out.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for name, curve in curves.items():
        keep = curve.count > 0
        ax.plot(
            curve.sample_empty[keep],
            curve.reader_empty[keep],
            marker="o",
            linewidth=1.2,
            label=f"{name} ({curve.gap:.3f})",
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("share of samples empty on the slice")
    ax.set_ylabel("share of reader slots empty")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, title="predictor (mean gap)", title_fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
