"""Per-case seeded sampling and the metric suite of SPEC section 2, on the MONAI metric classes.

Each case's noise comes from its own generator, seeded from the run's seed and the case's index in its
split. So a case gets the same samples whichever batch, process or DDP shard it lands in, and the
validation during training (sharded over ranks) equals a one-process evaluation of the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from car_med.metrics import ExpectedCalibrationError, GeneralizedEnergyDistance, HungarianMatchedIoU, SampleDiversity
from car_med.metrics.presence import DEFAULT_MIN_AREA, DEFAULT_SPECKLE_SIZE, PresenceGap, SpeckleFraction
from car_med.sampling import CARSampler, SampleSet

__all__ = [
    "CASE_INDEX_KEY",
    "SampleMetricSuite",
    "case_generator",
    "case_seed",
    "evaluate_samples",
    "sample_cases",
    "with_case_index",
]

CASE_INDEX_KEY = "case_index"
_SEED_STRIDE = 1_000_003  # a prime above any split size, so (seed, case) pairs never share a stream


def with_case_index(items: Sequence[Mapping], key: str = CASE_INDEX_KEY) -> list[dict]:
    """Copies of ``items`` with their position in the list under ``key`` (the case's noise seed)."""
    return [{**dict(item), key: index} for index, item in enumerate(items)]


def case_seed(seed: int, case_index: int) -> int:
    """The noise seed of one case: ``seed * 1_000_003 + case_index``, the same in any batch or process."""
    return int(seed) * _SEED_STRIDE + int(case_index)


def case_generator(seed: int, case_index: int) -> torch.Generator:
    """The CPU generator of one case's noise, seeded with :func:`case_seed`."""
    return torch.Generator().manual_seed(case_seed(seed, case_index))


def _plain(x: Any) -> Any:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def sample_cases(
    sampler: CARSampler,
    loader: Iterable[Mapping[str, Any]],
    num_samples: int,
    seed: int,
    device: str | torch.device = "cpu",
    case_key: str = CASE_INDEX_KEY,
    progress: bool = False,
) -> Iterator[tuple[Mapping[str, Any], SampleSet]]:
    """Yield ``(batch, samples)`` for every batch, each case's noise drawn from :func:`case_generator`, seeded by
    the case's ``noise_index`` where the batch has one, else by its case index.

    Args:
        sampler: the :class:`~car_med.sampling.CARSampler` of F and G.
        loader: batches with ``image`` and ``case_key`` (see :func:`with_case_index`).
        num_samples: M per case.
        seed: the evaluation seed.
        device: where F and G run.
        case_key: the batch key holding each case's index.
        progress: show a progress bar.
    """
    for batch in tqdm(loader, desc="sampling", disable=not progress, leave=False):
        if case_key not in batch:
            raise ValueError(
                f"evaluation batches need '{case_key}' (each case's noise seed); build the items with "
                "car_med.evaluation.with_case_index(...)."
            )
        # items may name another noise seed (e.g. all crops of a nodule one, car_med.evaluation.volumes)
        cases = torch.as_tensor(batch.get("noise_index", batch[case_key])).reshape(-1).tolist()
        noise = torch.cat(
            [sampler.draw_noise(1, num_samples, torch.device("cpu"), case_generator(seed, c)) for c in cases]
        )
        image = _plain(batch["image"]).to(device)
        yield batch, sampler(image, noise=noise.to(device))


class SampleMetricSuite:
    """GED_n, HM-IoU_n, sample diversity, presence gap, speckle and F's ECE over a pass, each a MONAI metric.

    Given each case's M hard samples (M at least the largest count asked for), GED_n and HM-IoU_n use the
    case's first n samples, so GED16 and GED100 come from one draw of 100. The ECE is F's, against the soft
    per-pixel label distribution of all R reader slots (an empty mask is a reader's "no lesion"). The presence
    gap and the speckle share (``car_med.metrics.presence``) use the first ``diversity_count`` samples (or the
    largest count when diversity is skipped).

    Buffers are gathered across DDP ranks by MONAI (``CumulativeIterationMetric``), so :meth:`aggregate`
    gives every rank the mean over all cases.

    Args:
        ged_counts: sample counts for GED (16, 50, 100 in the literature).
        hm_iou_counts: sample counts for HM-IoU (multiples of the reader count: 16, 32).
        diversity_count: samples for the mean pairwise distance d(S, S'); ``None`` skips it.
        ece_bins: bins of F's ECE; ``None`` skips it.
        classes: foreground class ids of the IoU (``(1,)`` for LIDC).
        presence_min_area: a map with fewer foreground pixels counts as empty in the presence gap; ``None``
            skips the presence gap.
        speckle_size: components under this many pixels are speckle; ``None`` skips the speckle share.
    """

    def __init__(
        self,
        ged_counts: Sequence[int] = (16,),
        hm_iou_counts: Sequence[int] = (16,),
        diversity_count: int | None = 16,
        ece_bins: int | None = 10,
        classes: Sequence[int] = (1,),
        presence_min_area: int | None = DEFAULT_MIN_AREA,
        speckle_size: int | None = DEFAULT_SPECKLE_SIZE,
    ) -> None:
        self._settings = {
            "ged_counts": tuple(ged_counts),
            "hm_iou_counts": tuple(hm_iou_counts),
            "diversity_count": diversity_count,
            "ece_bins": ece_bins,
            "classes": tuple(classes),
            "presence_min_area": presence_min_area,
            "speckle_size": speckle_size,
        }
        counts = [*ged_counts, *hm_iou_counts] + ([diversity_count] if diversity_count else [])
        if not counts or min(counts) < 1:
            raise ValueError(f"sample counts must be >= 1, got ged={ged_counts}, hm_iou={hm_iou_counts}.")
        self.ged = {int(n): GeneralizedEnergyDistance(classes=tuple(classes)) for n in ged_counts}
        self.hm_iou = {int(n): HungarianMatchedIoU(classes=tuple(classes)) for n in hm_iou_counts}
        self.diversity_count = diversity_count
        self.diversity = SampleDiversity(classes=tuple(classes)) if diversity_count else None
        self.ece = ExpectedCalibrationError(n_bins=ece_bins) if ece_bins else None
        self.max_samples = max(counts)
        self.shape_count = diversity_count or self.max_samples
        foreground = tuple(classes)[0]
        self.presence = PresenceGap(presence_min_area, foreground) if presence_min_area else None
        self.speckle = SpeckleFraction(speckle_size, foreground) if speckle_size else None

    def like(self, **changes: Any) -> SampleMetricSuite:
        """A new, empty suite with this one's settings, except ``changes`` (e.g. ``ece_bins=None``)."""
        return SampleMetricSuite(**{**self._settings, **changes})

    @property
    def names(self) -> list[str]:
        """Metric names in report order: ``ged16, ..., hm_iou16, ..., diversity16, ece``."""
        names = [f"ged{n}" for n in self.ged] + [f"hm_iou{n}" for n in self.hm_iou]
        names += [f"diversity{self.diversity_count}"] if self.diversity else []
        names += ["presence_gap"] if self.presence else []
        names += ["speckle"] if self.speckle else []
        return names + (["ece"] if self.ece else [])

    def reset(self) -> None:
        for metric in self._metrics():
            metric.reset()

    def _metrics(self) -> list:
        optional = (self.diversity, self.presence, self.speckle, self.ece)
        return [*self.ged.values(), *self.hm_iou.values()] + [m for m in optional if m is not None]

    def update(self, samples: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor | None = None) -> None:
        """Add a batch: hard samples ``(B, M, H, W)``, reader labels ``(B, R, H, W)``, F's probabilities."""
        samples, labels = _plain(samples), _plain(labels)
        if samples.shape[1] < self.max_samples:
            raise ValueError(f"the suite needs {self.max_samples} samples per case, got {samples.shape[1]}.")
        for n, metric in self.ged.items():
            metric(y_pred=samples[:, :n], y=labels)
        for n, metric in self.hm_iou.items():
            metric(y_pred=samples[:, :n], y=labels)
        if self.diversity is not None:
            self.diversity(y_pred=samples[:, : self.diversity_count])
        if self.presence is not None:
            self.presence(y_pred=samples[:, : self.shape_count], y=labels)
        if self.speckle is not None:
            self.speckle(y_pred=samples[:, : self.shape_count])
        if self.ece is not None:
            if calibration is None:
                raise ValueError("the suite computes F's ECE: pass calibration=F's probabilities.")
            calibration = _plain(calibration)
            foreground = labels.float().mean(dim=1)
            soft = torch.stack([1.0 - foreground, foreground], dim=1).to(calibration.dtype)
            self.ece(y_pred=calibration, y=soft)

    def aggregate(self) -> dict[str, float]:
        """The mean of every metric over all cases (of all ranks); ECE pooled over pixels."""
        values = {f"ged{n}": m.aggregate() for n, m in self.ged.items()}
        values.update({f"hm_iou{n}": m.aggregate() for n, m in self.hm_iou.items()})
        if self.diversity is not None:
            values[f"diversity{self.diversity_count}"] = self.diversity.aggregate()
        if self.presence is not None:
            values["presence_gap"] = self.presence.aggregate()
        if self.speckle is not None:
            values["speckle"] = self.speckle.aggregate()
        if self.ece is not None:
            values["ece"] = self.ece.aggregate()
        return {k: float(v) for k, v in values.items()}

    def per_case(self) -> dict[str, list[float]]:
        """Per-case values in the order the cases were added (ECE excluded: it is pooled)."""
        values = {f"ged{n}": m.aggregate("none") for n, m in self.ged.items()}
        values.update({f"hm_iou{n}": m.aggregate("none") for n, m in self.hm_iou.items()})
        if self.diversity is not None:
            values[f"diversity{self.diversity_count}"] = self.diversity.aggregate("none")
        if self.presence is not None:
            values["presence_gap"] = self.presence.aggregate("none")
        if self.speckle is not None:
            values["speckle"] = self.speckle.aggregate("none")
        return {k: [float(x) for x in v.reshape(-1)] for k, v in values.items()}

    def reliability(self):
        """F's reliability-diagram data (:class:`~car_med.metrics.ReliabilityData`)."""
        if self.ece is None:
            raise ValueError("this suite was built with ece_bins=None.")
        return self.ece.reliability()

    def presence_reliability(self, n_bins: int = 10):
        """The crops binned by the samples' empty share (:class:`~car_med.metrics.presence.PresenceReliability`)."""
        if self.presence is None:
            raise ValueError("this suite was built with presence_min_area=None.")
        return self.presence.reliability(n_bins)


def evaluate_samples(
    sampler: CARSampler,
    loader: Iterable[Mapping[str, Any]],
    suite: SampleMetricSuite,
    seed: int,
    device: str | torch.device = "cpu",
    on_batch: Callable[[Mapping[str, Any], SampleSet], None] | None = None,
    progress: bool = False,
    references: Any = None,
) -> dict[str, float]:
    """Sample every case (``suite.max_samples`` each), feed the suite, and return its means.

    ``on_batch(batch, samples)`` sees each batch (e.g. to keep cases for a montage or write outputs). A suite
    whose ``wants_sample_probs`` is true also gets G's per-sample probabilities (``update(..., sample_probs=)``).
    ``references`` (a :class:`~car_med.evaluation.references.ReferenceRows`) is fed the same cases; read its
    numbers with its ``aggregate()``.
    """
    suite.reset()
    if references is not None:
        references.reset()
    for batch, drawn in sample_cases(sampler, loader, suite.max_samples, seed, device, progress=progress):
        extra = {"sample_probs": drawn.probs} if getattr(suite, "wants_sample_probs", False) else {}
        labels = _plain(batch["label"]).cpu()
        suite.update(drawn.samples.cpu(), labels, drawn.calibration.cpu(), **extra)
        if references is not None:
            cases = torch.as_tensor(batch[CASE_INDEX_KEY]).reshape(-1).tolist()
            references.update(labels, drawn.calibration.cpu(), cases, seed)
        if on_batch is not None:
            on_batch(batch, drawn)
    return suite.aggregate()
