"""Evaluation of CAR on stochastic Cityscapes (SPEC 2 and 3.2): GED against the 32 weighted modes on the 10
switchable classes, per-class calibration of F and of G, F's ECE, a reliability diagram, the calibration bar
chart of the paper's Fig. 6, ``metrics.json`` with a protocol card, a per-case CSV and an MLflow run.

Every number comes from :mod:`car_med.metrics`; this module only feeds them.

**A class absent from both maps of a pair.** The authors' evaluation code (EliasKassapis/CARSSS,
``utils/evaluation_utils.py``: ``get_IoU`` sets a class's IoU to NaN when ``tp + fp + fn == 0``, and
``calc_energy_distances`` takes ``nanmean`` over the classes) skips it: a pair's distance is 1 - the mean IoU
over the classes present in either map. That is ``absent_class="skip"``, the default, and the rule behind the
paper's GED16 of 0.164. ``absent_class="one"`` counts such a class as IoU 1 (distance 0) in the mean over all
10 classes, as PHiSeg and CCDM do; it gives smaller distances, and its numbers do not compare with the paper's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset, MetaTensor

from car_med.data.cityscapes import load_cityscapes_datalist
from car_med.data.cityscapes_packing import cityscapes_packed_transforms
from car_med.data.stochastic_classes import check_stochastic_classes
from car_med.evaluation.report_files import (
    case_row,
    reliability_record,
    report_head,
    write_per_case_csv,
    write_report,
)
from car_med.evaluation.sample_metrics import sample_cases
from car_med.evaluation.start import DEFAULT_EVALUATION_SAMPLER, start_evaluation
from car_med.metrics import (
    CITYSCAPES_IGNORE_INDEX,
    CITYSCAPES_STOCHASTIC_CLASSES,
    CITYSCAPES_SWITCHABLE_CLASSES,
    ClassCalibrationResult,
    EnergyDistanceTerms,
    ReliabilityData,
    calibration_bin_statistics,
    class_calibration_statistics,
    energy_distance_from_iou,
    pairwise_iou,
    plot_reliability_diagram,
    stochastic_label_modes,
    stochastic_mode_weights,
)
from car_med.metrics.calibration import calibration_result_from_sums
from car_med.metrics.noise_response import class_sample_spread_statistics, noise_response_from_sums, reference_spread
from car_med.metrics.pairwise import PairwiseIoU
from car_med.networks.conditioned import analytic_label_distribution
from car_med.sampling import CARSampler, SamplerOptions

__all__ = [
    "ABSENT_CLASS_CONVENTIONS",
    "CITYSCAPES_CASE_FIELDS",
    "CITYSCAPES_METRIC_DEFINITIONS",
    "CityscapesEvaluationSettings",
    "CityscapesMetricSuite",
    "cityscapes_dataset_card",
    "cityscapes_energy_distance",
    "evaluate_cityscapes",
    "plot_class_calibration",
    "score_cityscapes_split",
    "write_cityscapes_report_files",
]

logger = logging.getLogger(__name__)

ABSENT_CLASS_CONVENTIONS = ("skip", "one")
F_PIXEL_CHOICES = ("blackbox_correct", "all")
CITYSCAPES_CASE_FIELDS = ("case_index", "stem", "city", "official_split")

CITYSCAPES_METRIC_DEFINITIONS: dict[str, str] = {
    "distance": "d(a, b) = 1 - mean over the 10 switchable classes (trainIds 0, 1, 8, 11, 13, 19-23) of the "
    "class IoU; pixels whose label is ignore (24, 255) are left out of every pair",
    "absent_class": "absent_class='skip' (the authors' code, CARSSS utils/evaluation_utils.py get_IoU + nanmean, "
    "and the paper's 0.164): a class absent from both maps is NaN and left out of the mean; a pair with "
    "every class absent has IoU 1. absent_class='one' (PHiSeg, CCDM): such a class counts as IoU 1",
    "ged<n>": "per image 2 E d(S, Y) - E d(S, S') - E d(Y, Y') over the full matrices, diagonals included, "
    "with the image's first n samples and the 32 analytic modes weighted by their probabilities (w_m for "
    "d(S, Y), w_m w_m' for d(Y, Y')); averaged over images",
    "diversity<n>": "mean d(S, S') over the n x n sample matrix, diagonal included",
    "f_offset_<class>": "|p - mean F probability of the flipped class| over the pixels whose true class is the "
    "base class; with f_calibration_pixels='blackbox_correct' (the authors' code, compute_pred_class_probs with "
    "get_cs_ignore_mask) only where the black box's prediction equals the label",
    "g_offset_<class>": "|p - frequency of the flipped class in G's first calibration_count samples| over all "
    "pixels whose true class is the base class (the authors' count_pixel_modes)",
    "f_mean_offset, g_mean_offset": "mean of the 5 per-class offsets",
    "g_spread (per class)": "std over G's first calibration_count samples of its probability of the flipped class, "
    "averaged over the pixels whose true class is the base class; sqrt(p (1 - p)) for one-hot samples flipping "
    "with frequency p, 0 when G ignores its noise",
    "g_noise_response": "mean over the 5 classes of g_spread / sqrt(p (1 - p)): 1 for coherent calibrated flips, "
    "0 for a G collapsed to a deterministic output (cGAN+L_ce); NaN without G's per-sample probabilities",
    "ece": "F's expected calibration error, 10 equal-width confidence bins (Guo et al. 2017), pooled over all "
    "non-ignore pixels; the target is the analytic per-pixel label distribution (the expected accuracy of F's "
    "argmax)",
    "samples": "per image, noise from torch.Generator seeded seed * 1000003 + image index; the n-sample metrics "
    "use the first n of one draw",
}

#: short names of the five stochastic pairs, in CITYSCAPES_STOCHASTIC_CLASSES order
CLASS_NAMES = {1: "sidewalk", 11: "person", 13: "car", 8: "vegetation", 0: "road"}


def _plain(x: Any) -> Any:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _class_name(base: int) -> str:
    return CLASS_NAMES.get(base, f"class{base}")


def cityscapes_energy_distance(
    samples: torch.Tensor,
    modes: torch.Tensor,
    weights: torch.Tensor,
    *,
    absent_class: str = "skip",
    classes: Sequence[int] = CITYSCAPES_SWITCHABLE_CLASSES,
    ignore_index: Sequence[int] = CITYSCAPES_IGNORE_INDEX,
) -> EnergyDistanceTerms:
    """Per-image GED and its terms against weighted label modes, with either absent-class convention.

    Args:
        samples: hard samples ``(B, N, H, W)``.
        modes: the label modes ``(B, R, H, W)`` (e.g. :func:`~car_med.metrics.stochastic_label_modes`).
        weights: ``(R,)`` or ``(B, R)`` mode probabilities.
        absent_class: ``"skip"`` (the authors' and SPEC's rule) or ``"one"`` (IoU 1 for a class absent from both).
        classes: the classes the IoU is averaged over.
        ignore_index: label values left out.
    """
    if absent_class not in ABSENT_CLASS_CONVENTIONS:
        raise ValueError(f"absent_class must be one of {ABSENT_CLASS_CONVENTIONS}, got {absent_class!r}.")
    if absent_class == "skip":
        iou = pairwise_iou(samples, modes, classes=tuple(classes), ignore_index=tuple(ignore_index))
    else:
        # one class at a time, pairwise_iou gives IoU 1 where the class is absent from both maps
        per_class = [pairwise_iou(samples, modes, classes=(c,), ignore_index=tuple(ignore_index)) for c in classes]
        iou = PairwiseIoU(*(torch.stack([p[i] for p in per_class]).mean(dim=0) for i in range(3)))
    return energy_distance_from_iou(iou, label_weights=weights)


class CityscapesMetricSuite:
    """GED_n, diversity, per-class calibration of F and G and F's ECE over a pass (one process).

    The interface of :class:`~car_med.evaluation.SampleMetricSuite` (``reset``, ``update``, ``aggregate``,
    ``per_case``, ``names``, ``max_samples``), so :func:`~car_med.evaluation.evaluate_samples` and
    :class:`~car_med.handlers.SampleValidation` can drive it.

    Args:
        ged_counts: sample counts for GED (16 in the paper).
        calibration_count: G's samples behind its calibration offsets (16, SPEC 2).
        ece_bins: bins of F's ECE; ``None`` skips it.
        absent_class: ``"skip"`` (default, the authors') or ``"one"``; see the module docstring.
        f_calibration_pixels: ``"blackbox_correct"`` (default, the authors': only pixels where the black box
            is right) or ``"all"``; without a black box given to :meth:`update`, all pixels count.
        num_classes: channels of F's output (25).
        stochastic_classes: ``(base, flipped, probability)`` triples.
    """

    #: :func:`~car_med.evaluation.evaluate_samples` passes G's per-sample probabilities to :meth:`update`
    wants_sample_probs = True

    def __init__(
        self,
        ged_counts: Sequence[int] = (16,),
        calibration_count: int = 16,
        ece_bins: int | None = 10,
        absent_class: str = "skip",
        f_calibration_pixels: str = "blackbox_correct",
        num_classes: int = 25,
        stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
    ) -> None:
        counts = [int(n) for n in ged_counts] + [int(calibration_count)]
        if not ged_counts or min(counts) < 1:
            raise ValueError(f"sample counts must be >= 1, got ged={ged_counts}, calibration={calibration_count}.")
        if absent_class not in ABSENT_CLASS_CONVENTIONS:
            raise ValueError(f"absent_class must be one of {ABSENT_CLASS_CONVENTIONS}, got {absent_class!r}.")
        if f_calibration_pixels not in F_PIXEL_CHOICES:
            raise ValueError(f"f_calibration_pixels must be one of {F_PIXEL_CHOICES}, got {f_calibration_pixels!r}.")
        self.ged_counts = [int(n) for n in ged_counts]
        self.calibration_count = int(calibration_count)
        self.ece_bins = ece_bins
        self.absent_class = absent_class
        self.f_calibration_pixels = f_calibration_pixels
        self.num_classes = num_classes
        self.stochastic_classes = check_stochastic_classes(stochastic_classes)
        self.weights = stochastic_mode_weights(self.stochastic_classes)
        self.max_samples = max(counts)
        self.reset()

    @property
    def names(self) -> list[str]:
        """Scalar metric names in report order."""
        names = [f"ged{n}" for n in self.ged_counts] + [f"diversity{self.ged_counts[0]}"]
        names += ["f_mean_offset", "g_mean_offset", "g_noise_response"]
        for base, _, _ in self.stochastic_classes:
            names += [f"f_offset_{_class_name(base)}", f"g_offset_{_class_name(base)}"]
        return names + (["ece"] if self.ece_bins else [])

    def reset(self) -> None:
        self._terms: dict[int, list[EnergyDistanceTerms]] = {n: [] for n in self.ged_counts}
        k = len(self.stochastic_classes)
        self._f_sums = torch.zeros(k, 2, dtype=torch.float64)
        self._g_sums = torch.zeros(k, 2, dtype=torch.float64)
        self._spread_sums = torch.zeros(k, 2, dtype=torch.float64)
        self._ece_sums = None if not self.ece_bins else torch.zeros(3, self.ece_bins, dtype=torch.float64)

    def update(
        self,
        samples: torch.Tensor,
        labels: torch.Tensor,
        calibration: torch.Tensor | None = None,
        blackbox: torch.Tensor | None = None,
        sample_probs: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            samples: G's hard samples ``(B, M, H, W)``, ``M >= max_samples``.
            labels: the un-flipped (or flipped) integer labels ``(B, 1, H, W)`` or ``(B, H, W)``.
            calibration: F's probabilities ``(B, C, H, W)``.
            blackbox: the black box's prediction, integer ``(B, H, W)``/``(B, 1, H, W)`` or one-hot ``(B, 19, H, W)``.
            sample_probs: G's softmax of every sample ``(B, M, C, H, W)``, for the spread and the noise response.
        """
        samples, labels = _plain(samples).cpu(), _plain(labels).cpu()
        if labels.ndim == samples.ndim:
            if labels.shape[1] != 1:
                raise ValueError(f"labels must be (B, 1, H, W) or (B, H, W), got {tuple(labels.shape)}.")
            labels = labels[:, 0]
        labels = labels.long()
        if samples.shape[1] < self.max_samples:
            raise ValueError(f"the suite needs {self.max_samples} samples per image, got {samples.shape[1]}.")
        spread = None
        if sample_probs is not None and self.calibration_count >= 2:  # one sample has no spread
            # checked before anything is added, so a bad batch leaves the pass's sums as they were
            probs = _plain(sample_probs)
            if probs.ndim < 2 or probs.shape[1] < self.calibration_count:
                raise ValueError(
                    f"sample_probs must hold G's probabilities of at least {self.calibration_count} samples per image "
                    f"(B, M, C, H, W), got {tuple(probs.shape)}."
                )
            probs = probs[:, : self.calibration_count]
            spread = class_sample_spread_statistics(labels, probs, self.stochastic_classes).sum(dim=0)
        modes = stochastic_label_modes(labels, self.stochastic_classes)
        for n in self.ged_counts:
            self._terms[n].append(
                cityscapes_energy_distance(samples[:, :n], modes, self.weights, absent_class=self.absent_class)
            )
        g = class_calibration_statistics(
            labels, samples[:, : self.calibration_count], source="samples", stochastic_classes=self.stochastic_classes
        )
        self._g_sums += g.sum(dim=0)
        if spread is not None:
            self._spread_sums += spread
        if calibration is None:
            return
        calibration = _plain(calibration).cpu().float()
        f_labels = labels
        if blackbox is not None and self.f_calibration_pixels == "blackbox_correct":
            bb = _plain(blackbox).cpu()
            if bb.is_floating_point() and bb.ndim == labels.ndim + 1 and bb.shape[1] > 1:
                bb = bb.argmax(dim=1)
            elif bb.ndim == labels.ndim + 1:
                bb = bb[:, 0]
            # the authors' get_cs_ignore_mask: the black box is right up to the flips
            base = labels.clone()
            for b, f, _ in self.stochastic_classes:
                base[labels == f] = b
            f_labels = torch.where(bb.long() == base, labels, torch.full_like(labels, CITYSCAPES_IGNORE_INDEX[0]))
        f = class_calibration_statistics(
            f_labels, calibration, source="probs", stochastic_classes=self.stochastic_classes
        )
        self._f_sums += f.sum(dim=0)
        if self._ece_sums is not None:
            valid = ~torch.isin(labels, torch.tensor(CITYSCAPES_IGNORE_INDEX))
            safe = torch.where(valid, labels, torch.zeros_like(labels)).clamp_max(calibration.shape[1] - 1)
            soft = analytic_label_distribution(safe, calibration.shape[1], self.stochastic_classes)
            soft = soft * valid.unsqueeze(1)
            self._ece_sums += calibration_bin_statistics(calibration, soft, self.ece_bins).sum(dim=0)

    def _cat(self, n: int) -> EnergyDistanceTerms:
        parts = self._terms[n]
        if not parts:
            raise ValueError("CityscapesMetricSuite.aggregate() called before any batch was added.")
        return EnergyDistanceTerms(*(torch.cat([getattr(p, f) for p in parts]) for f in EnergyDistanceTerms._fields))

    def f_calibration(self) -> ClassCalibrationResult:
        """F's pooled per-class predictions (NaN for a class never seen)."""
        return calibration_result_from_sums(self._f_sums, self.stochastic_classes)

    def g_calibration(self) -> ClassCalibrationResult:
        """The pooled frequency of each flipped class in G's samples."""
        return calibration_result_from_sums(self._g_sums, self.stochastic_classes)

    def noise_response(self) -> tuple[torch.Tensor, float]:
        """G's per-class spread over its samples and its noise response (NaN without ``sample_probs``)."""
        return noise_response_from_sums(self._spread_sums, self.stochastic_classes)

    def reliability(self) -> ReliabilityData:
        """F's reliability-diagram data."""
        if self._ece_sums is None:
            raise ValueError("this suite was built with ece_bins=None.")
        return ReliabilityData.from_bin_sums(self._ece_sums)

    def aggregate(self) -> dict[str, float]:
        """Every scalar of :attr:`names` (NaN where nothing was seen, e.g. F's offsets without F's output)."""
        values = {f"ged{n}": float(self._cat(n).ged.mean()) for n in self.ged_counts}
        values[f"diversity{self.ged_counts[0]}"] = float(self._cat(self.ged_counts[0]).d_ss.mean())
        f_res, g_res = self.f_calibration(), self.g_calibration()
        values["f_mean_offset"], values["g_mean_offset"] = f_res.mean_offset, g_res.mean_offset
        values["g_noise_response"] = self.noise_response()[1]
        for k, (base, _, _) in enumerate(self.stochastic_classes):
            values[f"f_offset_{_class_name(base)}"] = float(f_res.offsets[k])
            values[f"g_offset_{_class_name(base)}"] = float(g_res.offsets[k])
        if self._ece_sums is not None:
            values["ece"] = self.reliability().ece if self._ece_sums[0].sum() > 0 else float("nan")
        return values

    def per_case(self) -> dict[str, list[float]]:
        """Per-image GED and its terms, in the order the images were added."""
        out: dict[str, list[float]] = {}
        for n in self.ged_counts:
            terms = self._cat(n)
            out[f"ged{n}"] = terms.ged.tolist()
            out[f"d_sy{n}"] = terms.d_sy.tolist()
            out[f"d_ss{n}"] = terms.d_ss.tolist()
        out["d_yy"] = self._cat(self.ged_counts[0]).d_yy.tolist()
        return out

    def calibration_table(self) -> list[dict[str, Any]]:
        """Per class: base and flipped ids, the true p, F's and G's predictions and offsets, G's spread over its
        samples with its one-hot reference ``sqrt(p (1 - p))``, pixel counts."""
        f_res, g_res = self.f_calibration(), self.g_calibration()
        spreads = self.noise_response()[0]
        rows = []
        for k, (base, flipped, p) in enumerate(self.stochastic_classes):
            rows.append(
                {
                    "class": _class_name(base),
                    "base": base,
                    "flipped": flipped,
                    "true": p,
                    "f": _num(f_res.predicted[k]),
                    "g": _num(g_res.predicted[k]),
                    "f_offset": _num(f_res.offsets[k]),
                    "g_offset": _num(g_res.offsets[k]),
                    "g_spread": _num(spreads[k]),
                    "reference_spread": reference_spread(p),
                    "f_pixels": int(f_res.pixel_count[k]),
                    "g_pixel_samples": int(g_res.pixel_count[k]),
                }
            )
        return rows


def _num(x: Any) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


def plot_class_calibration(
    table: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "Calibration of the stochastic classes"
) -> Path:
    """The paper's Fig. 6: per stochastic class, the true flip probability, F's and G's (bars); saved to ``path``."""
    from car_med.visualize import isolate_matplotlib_config

    isolate_matplotlib_config()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.27
    xs = range(len(table))
    series = (
        ("true", "ground truth", "#55a868"),
        ("f", "F (calibration net)", "#4c72b0"),
        ("g", "G (samples)", "#dd8452"),
    )
    for j, (key, label, colour) in enumerate(series):
        values = [float("nan") if row[key] is None else row[key] for row in table]
        ax.bar([x + (j - 1) * width for x in xs], values, width=width, label=label, color=colour, edgecolor="black")
    ax.set_xticks(list(xs))
    # two lines per class: "vegetation -> vegetation2" on one line overlaps its neighbours
    ax.set_xticklabels([f"{row['class']}\n\u2192 {row['class']}2" for row in table])
    ax.set_ylabel("probability of the flipped class")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def cityscapes_dataset_card(datalist: str | os.PathLike) -> dict[str, Any]:
    """Describe a Cityscapes datalist: its path, image counts per split and the preprocessing config."""
    path = Path(datalist)
    content = json.loads(path.read_text())
    card: dict[str, Any] = {
        "datalist": str(path.resolve()),
        "protocol": "stochastic Cityscapes (Kohl et al. 2018, as used by CAR): 19 trainIds, ignore -> 24, five "
        "whole-class flips (sidewalk 8/17, person 7/17, car 6/17, vegetation 5/17, road 4/17); training = "
        "official train minus darmstadt, monchengladbach, ulm; validation = those three; test = official val",
        "counts": {k: len(v) for k, v in content.items() if isinstance(v, list)},
        "has_blackbox": all("blackbox" in item for v in content.values() if isinstance(v, list) for item in v),
    }
    summary = path.parent / "summary.json"
    if summary.is_file():
        card["preprocessing"] = json.loads(summary.read_text()).get("config", {})
    return card


@dataclass(frozen=True)
class CityscapesEvaluationSettings:
    """Everything that decides a Cityscapes evaluation's numbers; ``metrics.json``'s protocol card records it.

    Attributes:
        split: ``"test"`` (the official val set, default), ``"validation"`` or ``"training"``.
        max_cases: only the split's first images; ``None`` for all.
        ged_counts: GED sample counts.
        calibration_count: G's samples behind its calibration offsets.
        ece_bins: bins of F's ECE.
        absent_class: ``"skip"`` (the authors', default) or ``"one"``.
        f_calibration_pixels: ``"blackbox_correct"`` (the authors', default) or ``"all"``.
        conditioning: what is packed into the image for F, as in training (``"blackbox"`` or ``"label"``).
        spatial_size: ``(H, W)`` as in training; ``None`` keeps the preprocessed size.
        seed: noise seed (per image, see ``car_med.evaluation.case_generator``).
    """

    split: str = "test"
    max_cases: int | None = None
    ged_counts: tuple[int, ...] = (16,)
    calibration_count: int = 16
    ece_bins: int = 10
    absent_class: str = "skip"
    f_calibration_pixels: str = "blackbox_correct"
    conditioning: str | None = "blackbox"
    spatial_size: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ged_counts", tuple(self.ged_counts))
        if self.spatial_size is not None:
            object.__setattr__(self, "spatial_size", tuple(self.spatial_size))
        self.metric_suite()  # a bad count or convention fails here, before any sampling

    def metric_suite(self) -> CityscapesMetricSuite:
        """A new, empty suite."""
        return CityscapesMetricSuite(
            self.ged_counts, self.calibration_count, self.ece_bins, self.absent_class, self.f_calibration_pixels
        )

    def read_split(self, datalist: str | os.PathLike, split: str) -> list[dict]:
        """The split's items; black-box conditioning needs every item's black-box prediction."""
        return load_cityscapes_datalist(datalist, split, require_blackbox=self.conditioning == "blackbox")

    def protocol_card(self, datalist: str | os.PathLike, suite: CityscapesMetricSuite) -> dict[str, Any]:
        """``metrics.json``'s ``protocol``: these settings, the dataset's card and every definition used."""
        return {
            "dataset": cityscapes_dataset_card(datalist),
            "evaluated_cases": "all" if self.max_cases is None else f"first {self.max_cases}",
            "sample_counts": {"ged": list(self.ged_counts), "calibration": self.calibration_count},
            "seed": self.seed,
            "spatial_size": None if self.spatial_size is None else list(self.spatial_size),
            "conditioning": self.conditioning,
            "absent_class": self.absent_class,
            "f_calibration_pixels": self.f_calibration_pixels,
            "mode_weights_sum": float(suite.weights.sum()),
            "metric_definitions": CITYSCAPES_METRIC_DEFINITIONS,
        }


def score_cityscapes_split(
    sampler: CARSampler,
    cases: Sequence[dict],
    settings: CityscapesEvaluationSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[CityscapesMetricSuite, list[dict[str, Any]]]:
    """Draw every image's samples (seeded by its case index) and score them: the suite and one row per image."""
    transform = cityscapes_packed_transforms(
        "eval", conditioning=settings.conditioning, spatial_size=settings.spatial_size
    )
    loader = DataLoader(Dataset(cases, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    suite = settings.metric_suite()
    rows: list[dict[str, Any]] = []
    for batch, drawn in sample_cases(sampler, loader, suite.max_samples, settings.seed, device, progress=progress):
        suite.update(
            drawn.samples.cpu(),
            _plain(batch["label"]),
            drawn.calibration.cpu(),
            batch.get("blackbox"),
            sample_probs=drawn.probs,
        )
        for i in range(drawn.samples.shape[0]):
            rows.append(case_row(batch, i, CITYSCAPES_CASE_FIELDS))
    return suite, rows


def write_cityscapes_report_files(
    out: Path,
    suite: CityscapesMetricSuite,
    rows: Sequence[dict[str, Any]],
    settings: CityscapesEvaluationSettings,
    *,
    datalist: str | os.PathLike,
    checkpoint: str | os.PathLike | None,
    model_label: str,
) -> dict[str, Any]:
    """Write ``per_case.csv``, ``reliability.png`` and ``class_calibration.png``; give ``metrics.json``'s content."""
    split = settings.split
    metrics = suite.aggregate()
    write_per_case_csv(out / "per_case.csv", rows, CITYSCAPES_CASE_FIELDS, suite.per_case())
    reliability = suite.reliability()
    plot_reliability_diagram(reliability, out / "reliability.png", title=f"F on Cityscapes {split}")
    table = suite.calibration_table()
    plot_class_calibration(table, out / "class_calibration.png", title=f"{model_label} on Cityscapes {split}")
    return {
        **report_head(model_label, checkpoint, split, len(rows), metrics),
        "class_calibration": table,
        "protocol": settings.protocol_card(datalist, suite),
        "reliability": reliability_record(reliability),
    }


def evaluate_cityscapes(
    calibration_network: torch.nn.Module,
    refinement_network: torch.nn.Module,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    settings: CityscapesEvaluationSettings | None = None,
    sampler_options: SamplerOptions = DEFAULT_EVALUATION_SAMPLER,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    num_workers: int = 0,
    model_label: str = "CAR",
    tracking_uri: str | None = None,
    experiment_name: str = "car_cityscapes",
    run_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score G's samples and F's calibration on one split and write the report files.

    Writes into ``output_dir``: ``metrics.json`` (the numbers, the per-class calibration table, N, the checkpoint
    and the protocol card with every metric's definition and the absent-class convention), ``per_case.csv``
    (one row per image: its ids, GED and its terms), ``reliability.png`` (F's reliability diagram) and
    ``class_calibration.png`` (Fig. 6: true, F's and G's flip probability per class). With ``tracking_uri``
    the metrics and files also go to a new MLflow run.

    Args:
        calibration_network: F on the packed input (weights from ``checkpoint`` if given).
        refinement_network: G (weights from ``checkpoint`` if given).
        datalist: the ``datalist.json`` of ``python -m preprocessing.cityscapes``.
        output_dir: where the report goes.
        settings: what decides the numbers (:class:`CityscapesEvaluationSettings`; its defaults when ``None``).
        sampler_options: G's sampler (``max_batch``, ``noise_std``).
        checkpoint: a stage-2 checkpoint holding ``calibration_network`` and ``refinement_network``.
        device: where to run.
        batch_size: images per batch.
        num_workers: data loader workers.
        model_label: the model's name in the report.
        tracking_uri: MLflow tracking URI, or ``None`` to log nothing.
        experiment_name: MLflow experiment.
        run_name: MLflow run name (default ``evaluate-<split>``).
        progress: show a progress bar.

    Returns:
        The content of ``metrics.json``.
    """
    settings = settings if settings is not None else CityscapesEvaluationSettings()
    out, cases, sampler = start_evaluation(
        calibration_network,
        refinement_network,
        datalist=datalist,
        split=settings.split,
        read_split=settings.read_split,
        output_dir=output_dir,
        checkpoint=checkpoint,
        device=device,
        max_cases=settings.max_cases,
        sampler_options=sampler_options,
    )
    suite, rows = score_cityscapes_split(
        sampler, cases, settings, device=device, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    report = write_cityscapes_report_files(
        out, suite, rows, settings, datalist=datalist, checkpoint=checkpoint, model_label=model_label
    )
    return write_report(
        out,
        report,
        f"{model_label} on Cityscapes {settings.split} ({len(rows)} images)",
        tracking_uri,
        experiment_name,
        run_name,
        {"absent_class": settings.absent_class, "f_calibration_pixels": settings.f_calibration_pixels},
        report["metrics"],
        ("metrics.json", "per_case.csv", "reliability.png", "class_calibration.png"),
        logger,
    )
