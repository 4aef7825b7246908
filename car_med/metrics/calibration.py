"""Calibration metrics: pixelwise expected calibration error with reliability diagrams, and the Cityscapes
stochastic-class calibration offsets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import MetricReduction, convert_to_tensor

from car_med.data.stochastic_classes import CITYSCAPES_STOCHASTIC_CLASSES, check_stochastic_classes
from car_med.metrics.pairwise import as_ignore_tuple

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ReliabilityData",
    "calibration_bin_statistics",
    "expected_calibration_error",
    "plot_reliability_diagram",
    "ExpectedCalibrationError",
    "ClassCalibrationResult",
    "class_calibration_statistics",
    "class_calibration_offsets",
    "calibration_result_from_sums",
    "StochasticClassCalibration",
]

# Softmax outputs can overshoot [0, 1] by rounding; anything further out is not a probability.
_PROB_TOL = 1e-4


@dataclass(frozen=True)
class ReliabilityData:
    """Per-bin reliability-diagram data, pooled over every pixel seen.

    Attributes:
        bin_edges: ``(n_bins + 1,)`` edges of the equal-width confidence bins; bin ``m`` is
            ``(edges[m], edges[m + 1]]`` (the first bin also holds confidence 0).
        confidence: ``(n_bins,)`` mean confidence per bin, NaN for empty bins.
        accuracy: ``(n_bins,)`` accuracy per bin (mean probability mass of the predicted class under soft
            targets), NaN for empty bins.
        count: ``(n_bins,)`` number of pixels per bin.
        ece: the expected calibration error ``sum_m n_m / n * |acc_m - conf_m|``.
    """

    bin_edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor
    ece: float

    @classmethod
    def from_bin_sums(cls, sums: torch.Tensor) -> ReliabilityData:
        """Build from ``(3, n_bins)`` sums ``[count, sum of confidences, sum of accuracies]``."""
        if sums.ndim != 2 or sums.shape[0] != 3:
            raise ValueError(f"bin sums must have shape (3, n_bins), got {tuple(sums.shape)}.")
        sums = sums.detach().to("cpu", torch.float64)
        count, conf_sum, acc_sum = sums
        n_bins = sums.shape[1]
        nonempty = count > 0
        nan = torch.full_like(count, float("nan"))
        total = count.sum()
        ece = float((acc_sum - conf_sum).abs().sum() / total) if total > 0 else float("nan")
        return cls(
            bin_edges=torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64),
            confidence=torch.where(nonempty, conf_sum / count.clamp_min(1.0), nan),
            accuracy=torch.where(nonempty, acc_sum / count.clamp_min(1.0), nan),
            count=count,
            ece=ece,
        )


def _check_probs(probs: Any) -> torch.Tensor:
    p = convert_to_tensor(probs, track_meta=False)
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise ValueError(
            f"probs must be a float tensor of class probabilities (B, C, *spatial), got "
            f"{getattr(p, 'dtype', type(p))} with shape {tuple(getattr(p, 'shape', ()))}."
        )
    if p.ndim < 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (B, C, *spatial) with C >= 2 classes, got {tuple(p.shape)}.")
    if p.numel() and (float(p.min()) < -_PROB_TOL or float(p.max()) > 1.0 + _PROB_TOL):
        raise ValueError(
            f"probs with shape {tuple(p.shape)} must lie in [0, 1] (softmax outputs), got values in "
            f"[{float(p.min()):.4g}, {float(p.max()):.4g}]."
        )
    return p


def _target_accuracy(
    probs: torch.Tensor, target: Any, pred: torch.Tensor, ignore: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel accuracy of the argmax prediction ``pred (B, *spatial)`` and the mask of pixels that count."""
    t = convert_to_tensor(target, track_meta=False)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"target must be a tensor or array, got {type(target).__name__}.")
    t = t.to(probs.device)
    b, c = probs.shape[:2]
    spatial = tuple(probs.shape[2:])
    if t.ndim == probs.ndim and t.shape[1] == c and c > 1:
        # one-hot or soft labels: credit the probability mass the target puts on the predicted class
        if ignore:
            raise ValueError(
                "ignore_index applies to integer targets only; soft targets mark unlabelled pixels with "
                "all-zero vectors."
            )
        if tuple(t.shape) != tuple(probs.shape):
            raise ValueError(f"soft target {tuple(t.shape)} must match probs {tuple(probs.shape)}.")
        t = t.to(torch.float64)
        total = t.sum(dim=1)
        if bool((t < -_PROB_TOL).any()) or bool((((total - 1.0).abs() > 1e-3) & (total.abs() > 1e-3)).any()):
            raise ValueError(
                f"soft/one-hot target {tuple(t.shape)} must be non-negative and sum to 1 over dim 1 "
                "(or to 0 for unlabelled pixels)."
            )
        acc = t.gather(1, pred.unsqueeze(1)).squeeze(1)
        return acc, total > 0.5
    if t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"target with shape {tuple(t.shape)} and dtype {t.dtype} looks like float labels: pass integer class "
            f"indices (B, *spatial) or (B, 1, *spatial), or a soft/one-hot target of shape {tuple(probs.shape)}."
        )
    if t.ndim == probs.ndim and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.ndim != probs.ndim - 1 or t.shape[0] != b or tuple(t.shape[1:]) != spatial:
        raise ValueError(
            f"target {tuple(t.shape)} does not match probs {tuple(probs.shape)}: expected integer labels "
            f"({b}, *{spatial}) or ({b}, 1, *{spatial}), or a soft target {tuple(probs.shape)}."
        )
    valid = torch.ones_like(t, dtype=torch.bool)
    if ignore:
        valid = ~torch.isin(t, torch.tensor(ignore, device=t.device, dtype=t.dtype))
    bad = valid & ((t < 0) | (t >= c))
    if bool(bad.any()):
        raise ValueError(
            f"class id out of range: target {tuple(t.shape)} contains {int(t[bad].flatten()[0])}, "
            f"probs {tuple(probs.shape)} has C={c} classes (ignore_index={ignore or None})."
        )
    return (t.long() == pred).to(torch.float64), valid


def calibration_bin_statistics(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 10,
    *,
    ignore_index: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-image sums over equal-width confidence bins, the additive statistic behind ECE.

    Each pixel's confidence is its top class probability and its prediction the argmax (Guo et al., 2017). Bin
    ``m`` covers ``(m / n_bins, (m + 1) / n_bins]``. Summing these statistics over images and ranks, then calling
    :meth:`ReliabilityData.from_bin_sums`, gives the exact pixel-pooled ECE of a whole dataset.

    Args:
        probs: class probabilities ``(B, C, *spatial)``.
        target: integer class indices ``(B, *spatial)`` or ``(B, 1, *spatial)``, or a one-hot/soft target
            ``(B, C, *spatial)``. A soft target credits each pixel with the probability it gives the predicted
            class (the expected accuracy); its all-zero pixels are left out.
        n_bins: number of equal-width bins over [0, 1].
        ignore_index: integer target value(s) whose pixels are left out.

    Returns:
        ``(B, 3, n_bins)`` float64: pixel count, sum of confidences and sum of accuracies per bin.

    Raises:
        ValueError: on mismatched shapes, float class indices or class ids out of range.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}.")
    p = _check_probs(probs)
    conf, pred = p.max(dim=1)
    acc, valid = _target_accuracy(p, target, pred, as_ignore_tuple(ignore_index))
    b = p.shape[0]
    conf = conf.to(torch.float64).reshape(b, -1)
    acc = acc.reshape(b, -1)
    valid = valid.reshape(b, -1)
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=p.device)[1:-1]
    # right=False puts x == edge in the lower bin: bins are (lo, hi] as in Guo et al.
    bins = torch.bucketize(conf, inner_edges, right=False)
    flat = (bins + n_bins * torch.arange(b, device=p.device)[:, None])[valid]
    size = b * n_bins
    stats = torch.stack(
        [
            torch.bincount(flat, minlength=size).to(torch.float64),
            torch.bincount(flat, weights=conf[valid], minlength=size),
            torch.bincount(flat, weights=acc[valid], minlength=size),
        ]
    )
    return stats.reshape(3, b, n_bins).permute(1, 0, 2).contiguous()


def expected_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 10,
    *,
    ignore_index: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, ReliabilityData]:
    """Pixelwise expected calibration error over all pixels of the batch, with reliability-diagram data.

    ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|`` over ``n_bins`` equal-width confidence bins (Guo et al.,
    2017), each pixel counted independently as in CAR's Fig. 7. See :func:`calibration_bin_statistics` for the
    argument conventions.

    Returns:
        ``(ece, reliability)``: a 0-dim float64 tensor and :class:`ReliabilityData`.
    """
    stats = calibration_bin_statistics(probs, target, n_bins, ignore_index=ignore_index)
    data = ReliabilityData.from_bin_sums(stats.sum(dim=0))
    return torch.tensor(data.ece, dtype=torch.float64, device=stats.device), data


def plot_reliability_diagram(
    data: ReliabilityData,
    path: str | Path | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = "Reliability diagram",
) -> Figure:
    """Draw a reliability diagram: per-bin accuracy bars, the gap to the mean confidence, and the diagonal.

    The figure is built on matplotlib's Agg canvas without pyplot, so it works headless and leaves the global
    backend alone.

    Args:
        data: the reliability data to draw.
        path: if given, the figure is saved there (format from the suffix, e.g. ``.png``).
        ax: draw into this axes instead of a new figure.
        title: axes title; the ECE is appended.

    Returns:
        The matplotlib Figure.
    """
    from car_med.visualize import isolate_matplotlib_config

    isolate_matplotlib_config()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(4.5, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    edges = data.bin_edges.numpy()
    width = edges[1:] - edges[:-1]
    left = edges[:-1]
    acc = torch.nan_to_num(data.accuracy, nan=0.0).numpy()
    conf = data.confidence.numpy()
    nonempty = data.count.numpy() > 0
    ax.bar(left, acc, width=width, align="edge", color="#4c72b0", edgecolor="black", linewidth=0.6, label="accuracy")
    gap_bottom = acc[nonempty]
    gap = conf[nonempty] - acc[nonempty]
    ax.bar(
        left[nonempty],
        gap,
        bottom=gap_bottom,
        width=width[nonempty],
        align="edge",
        color="#dd8452",
        alpha=0.6,
        edgecolor="#c44e52",
        linewidth=0.6,
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece_text = f"ECE = {100 * data.ece:.2f}%"
    ax.set_title(f"{title}  ({ece_text})" if title else ece_text)
    ax.legend(loc="upper left", fontsize="small")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    return fig


class ExpectedCalibrationError(CumulativeIterationMetric):
    """ECE as a MONAI cumulative metric: ``metric(y_pred=probs, y=target)`` per batch, then ``aggregate()``.

    Each batch adds per-image bin sums ``(B, 3, n_bins)`` to the buffer (gathered across DDP ranks by the base
    class). ``aggregate()`` pools the sums over every image, so it returns the exact pixelwise ECE of the whole
    dataset, not a mean of per-image ECEs.

    Args:
        n_bins: number of equal-width confidence bins.
        ignore_index: integer target value(s) left out.
        reduction: ``"mean"`` (default): the pooled dataset ECE; ``"none"``: one ECE per image (NaN where an image
            has no valid pixel).
    """

    def __init__(
        self,
        n_bins: int = 10,
        ignore_index: int | Sequence[int] | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.reduction = self._check_reduction(reduction)

    @staticmethod
    def _check_reduction(reduction: MetricReduction | str) -> MetricReduction:
        reduction = MetricReduction(reduction)
        if reduction not in (MetricReduction.MEAN, MetricReduction.NONE):
            raise ValueError(f"ExpectedCalibrationError supports reduction 'mean' or 'none', got {reduction.value!r}.")
        return reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("ExpectedCalibrationError needs a target: call metric(y_pred=probs, y=target).")
        return calibration_bin_statistics(y_pred, y, self.n_bins, ignore_index=self.ignore_index)

    def _bin_sums(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("ExpectedCalibrationError.aggregate() called before any batch was added.")
        return data

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        """The pooled ECE (``"mean"``) or per-image ECEs ``(num_images,)`` (``"none"``), float64."""
        reduction = self._check_reduction(reduction or self.reduction)
        sums = self._bin_sums()
        if reduction == MetricReduction.NONE:
            count = sums[:, 0].sum(dim=1)
            gap = (sums[:, 2] - sums[:, 1]).abs().sum(dim=1)
            return torch.where(count > 0, gap / count.clamp_min(1.0), torch.full_like(count, float("nan")))
        return torch.tensor(ReliabilityData.from_bin_sums(sums.sum(dim=0)).ece, dtype=torch.float64)

    def reliability(self) -> ReliabilityData:
        """Reliability-diagram data pooled over every image added so far (all ranks)."""
        return ReliabilityData.from_bin_sums(self._bin_sums().sum(dim=0))


@dataclass(frozen=True)
class ClassCalibrationResult:
    """Calibration of the stochastic classes, pooled over every pixel whose true class is a base class.

    Attributes:
        base_classes: the base class of each pair, e.g. sidewalk 1.
        flipped_classes: its flipped twin, e.g. sidewalk2 19.
        true_probs: ``(K,)`` the flip probability each pair was generated with.
        pixel_count: ``(K,)`` number of (pixel, sample) pairs behind each estimate.
        predicted: ``(K,)`` F's mean predicted probability of the flipped class, or the frequency of the flipped
            class in G's samples; NaN where no pixel of the base class was seen.
    """

    base_classes: tuple[int, ...]
    flipped_classes: tuple[int, ...]
    true_probs: torch.Tensor
    pixel_count: torch.Tensor
    predicted: torch.Tensor

    @property
    def offsets(self) -> torch.Tensor:
        """``(K,)`` calibration offset ``|true - predicted|`` per pair (CAR, Sec. 4.3)."""
        return (self.predicted - self.true_probs).abs()

    @property
    def signed_offsets(self) -> torch.Tensor:
        """``(K,)`` ``predicted - true``: positive where the flipped class is over-predicted."""
        return self.predicted - self.true_probs

    @property
    def mean_offset(self) -> float:
        """Mean offset over the pairs seen (CAR reports 1.6% for F)."""
        off = self.offsets
        off = off[~torch.isnan(off)]
        return float(off.mean()) if off.numel() else float("nan")


def _single_label(label: Any, pred: torch.Tensor, pred_name: str) -> torch.Tensor:
    t = convert_to_tensor(label, track_meta=False)
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"label must be integer class indices (B, *spatial) or (B, 1, *spatial), got "
            f"{getattr(t, 'dtype', type(t))} with shape {tuple(getattr(t, 'shape', ()))}."
        )
    if t.ndim == pred.ndim and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.ndim != pred.ndim - 1 or t.shape[0] != pred.shape[0] or tuple(t.shape[1:]) != tuple(pred.shape[2:]):
        raise ValueError(
            f"label {tuple(t.shape)} does not match {pred_name} {tuple(pred.shape)}: expected "
            f"({pred.shape[0]}, *{tuple(pred.shape[2:])}) or ({pred.shape[0]}, 1, *{tuple(pred.shape[2:])})."
        )
    return t.to(pred.device)


def class_calibration_statistics(
    label: torch.Tensor,
    prediction: torch.Tensor,
    *,
    source: str,
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
) -> torch.Tensor:
    """Per-image sums behind the stochastic-class calibration offsets: ``(B, K, 2)`` float64 ``[count, sum]``.

    Only pixels whose true class is the pair's base class count: pixels labelled with the base class or its flipped
    twin (so either the un-flipped label or any flipped mode may be passed).

    Args:
        label: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        prediction: for ``source="probs"``, class probabilities ``(B, C, *spatial)`` (F's output, or G's mean
            ``Gbar``); for ``source="samples"``, integer hard samples ``(B, N, *spatial)`` (G's argmax samples).
        source: ``"probs"`` (sum of the flipped class's probability) or ``"samples"`` (number of samples that
            chose the flipped class; the count is pixels times N).
        stochastic_classes: ``(base, flipped, probability)`` triples.
    """
    triples = check_stochastic_classes(stochastic_classes)
    if source not in ("probs", "samples"):
        raise ValueError(f"source must be 'probs' or 'samples', got {source!r}.")
    pred = convert_to_tensor(prediction, track_meta=False)
    if not isinstance(pred, torch.Tensor) or pred.ndim < 2:
        raise ValueError(f"prediction must be a (B, C|N, *spatial) tensor, got {type(prediction).__name__}.")
    if source == "probs":
        pred = _check_probs(pred)
        out = [f for _, f, _ in triples if f >= pred.shape[1]]
        if out:
            raise ValueError(
                f"class id out of range: flipped classes {out} but probs {tuple(pred.shape)} has C={pred.shape[1]}."
            )
    elif pred.is_floating_point() or pred.is_complex():
        raise ValueError(
            f"samples must be integer label maps (B, N, *spatial), got dtype {pred.dtype} "
            f"with shape {tuple(pred.shape)}."
        )
    t = _single_label(label, pred, source)
    b = pred.shape[0]
    t = t.reshape(b, -1)
    rows = []
    for base, flipped, _ in triples:
        member = ((t == base) | (t == flipped)).to(torch.float64)
        n_pix = member.sum(dim=1)
        if source == "probs":
            total = (pred[:, flipped].reshape(b, -1).to(torch.float64) * member).sum(dim=1)
            count = n_pix
        else:
            hits = (pred.reshape(b, pred.shape[1], -1) == flipped).sum(dim=1).to(torch.float64)
            total = (hits * member).sum(dim=1)
            count = n_pix * pred.shape[1]
        rows.append(torch.stack([count, total], dim=-1))
    return torch.stack(rows, dim=1)


def calibration_result_from_sums(
    sums: torch.Tensor, triples: Sequence[tuple[int, int, float]]
) -> ClassCalibrationResult:
    """A :class:`ClassCalibrationResult` from pooled per-class ``(pixel count, flipped total)`` sums.

    Lets a caller accumulate :func:`class_calibration_statistics` over a pass (summed over images) and turn the
    totals into predicted flip probabilities at the end.

    Args:
        sums: ``(K, 2)``: per stochastic class, the number of base-class pixels and the sum of the flipped
            class's probability (or sample hits) over them.
        triples: the ``(base, flipped, probability)`` triples, in the order of the rows of ``sums``.

    Returns:
        The result; a class with no pixel has a NaN prediction.
    """
    triples = tuple(tuple(t) for t in triples)
    sums = sums.detach().to("cpu", torch.float64)
    count, total = sums[:, 0], sums[:, 1]
    predicted = torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(count, float("nan")))
    return ClassCalibrationResult(
        base_classes=tuple(b for b, _, _ in triples),
        flipped_classes=tuple(f for _, f, _ in triples),
        true_probs=torch.tensor([p for _, _, p in triples], dtype=torch.float64),
        pixel_count=count,
        predicted=predicted,
    )


def class_calibration_offsets(
    label: torch.Tensor,
    *,
    probs: torch.Tensor | None = None,
    samples: torch.Tensor | None = None,
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
) -> dict[str, ClassCalibrationResult]:
    """Cityscapes stochastic-class calibration check, pooled over all pixels of the batch.

    For every ``(base, flipped, p)`` pair and every pixel whose true class is ``base``, compare ``p`` with (a) the
    mean predicted probability of ``flipped`` (F's output) and (b) the frequency with which G's samples choose
    ``flipped`` (SPEC: 16 samples). The offset is ``|p - predicted|``.

    Args:
        label: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``, base or flipped.
        probs: optional class probabilities ``(B, C, *spatial)``.
        samples: optional hard samples ``(B, N, *spatial)``.
        stochastic_classes: ``(base, flipped, probability)`` triples; the Cityscapes five by default.

    Returns:
        ``{"probs": ..., "samples": ...}`` with a :class:`ClassCalibrationResult` for each prediction given.
    """
    if probs is None and samples is None:
        raise ValueError("class_calibration_offsets needs probs, samples or both.")
    triples = check_stochastic_classes(stochastic_classes)
    out = {}
    for source, pred in (("probs", probs), ("samples", samples)):
        if pred is not None:
            sums = class_calibration_statistics(label, pred, source=source, stochastic_classes=triples)
            out[source] = calibration_result_from_sums(sums.sum(dim=0), triples)
    return out


class StochasticClassCalibration(CumulativeIterationMetric):
    """Stochastic-class calibration offsets as a MONAI cumulative metric, pooled over the dataset and DDP ranks.

    Call ``metric(y_pred=probs, y=label)`` (``source="probs"``) or ``metric(y_pred=samples, y=label)``
    (``source="samples"``) per batch.

    Args:
        source: ``"probs"`` for probability maps ``(B, C, *spatial)``, ``"samples"`` for hard samples
            ``(B, N, *spatial)``.
        stochastic_classes: ``(base, flipped, probability)`` triples.
        reduction: ``"mean"`` (default): the mean absolute offset over the pairs; ``"none"``: ``(K,)`` offsets.
    """

    def __init__(
        self,
        source: str = "probs",
        stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__()
        if source not in ("probs", "samples"):
            raise ValueError(f"source must be 'probs' or 'samples', got {source!r}.")
        self.source = source
        self.stochastic_classes = check_stochastic_classes(stochastic_classes)
        self.reduction = self._check_reduction(reduction)

    @staticmethod
    def _check_reduction(reduction: MetricReduction | str) -> MetricReduction:
        reduction = MetricReduction(reduction)
        if reduction not in (MetricReduction.MEAN, MetricReduction.NONE):
            raise ValueError(
                f"StochasticClassCalibration supports reduction 'mean' or 'none', got {reduction.value!r}."
            )
        return reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("StochasticClassCalibration needs labels: call metric(y_pred=..., y=label).")
        return class_calibration_statistics(y, y_pred, source=self.source, stochastic_classes=self.stochastic_classes)

    def result(self) -> ClassCalibrationResult:
        """Pooled per-pair predictions and offsets over everything added so far."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("StochasticClassCalibration.result() called before any batch was added.")
        return calibration_result_from_sums(data.sum(dim=0), self.stochastic_classes)

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        """Mean absolute offset over the pairs (``"mean"``), or the ``(K,)`` offsets (``"none"``)."""
        reduction = self._check_reduction(reduction or self.reduction)
        res = self.result()
        if reduction == MetricReduction.NONE:
            return res.offsets
        return torch.tensor(res.mean_offset, dtype=torch.float64)
