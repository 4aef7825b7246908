"""A nodule's crops stacked into one volume: 3D GED and HM-IoU, and how coherent a sample is from slice to slice.

The LIDC crops of one nodule (one per axial slice it covers) lie on one 0.5 mm lattice of their scan, but
preprocessing centres each on that slice's lesion centre, so the window shifts by a few voxels from slice to
slice. The crops are placed by their affines on one canvas per nodule (zero outside a crop) before stacking.
Reader slot r is the same annotation on every slice of a nodule (preprocessing orders the masks by annotation
id), so stacking slot r gives that reader's 3D outline. Sample m of the model is one 3D hypothesis only when
its slices share their noise (``noise="nodule"``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from car_med.metrics import generalized_energy_distance, hungarian_matched_iou

__all__ = ["NOISE_MODES", "NoduleVolumes", "adjacent_slice_dice", "nodule_key", "with_nodule_noise"]

NOISE_MODES = ("case", "nodule")
"""Per-case noise: every crop draws its own M noise vectors. Per-nodule: a nodule's crops share them."""

NOISE_INDEX_KEY = "noise_index"


def nodule_key(item: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(patient_id, series_uid, nodule_id)``: the crops of one nodule."""
    return tuple(str(item.get(k)) for k in ("patient_id", "series_uid", "nodule_id"))  # type: ignore[return-value]


def with_nodule_noise(items: Sequence[Mapping[str, Any]], noise: str = "nodule") -> list[dict]:
    """Copies of ``items`` with a ``noise_index``: the nodule's first position in the list, or the item's own
    ``case_index`` with ``noise="case"``."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}.")
    first: dict[tuple, int] = {}
    out = []
    for position, item in enumerate(items):
        index = first.setdefault(nodule_key(item), position) if noise == "nodule" else item["case_index"]
        out.append({**dict(item), NOISE_INDEX_KEY: index})
    return out


def adjacent_slice_dice(stack: torch.Tensor) -> torch.Tensor:
    """Dice of the foreground between neighbouring slices, per map: ``(K, S, H, W)`` -> ``(K,)``.

    Pairs where both slices are empty carry no information on coherence and are left out; a map without any
    informative pair gives NaN.
    """
    a, b = stack[:, :-1].flatten(2).bool(), stack[:, 1:].flatten(2).bool()
    intersection = (a & b).sum(-1).float()
    total = (a.sum(-1) + b.sum(-1)).float()
    dice = torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.full_like(total, float("nan")))
    return dice.nanmean(dim=1)


class NoduleVolumes:
    """Collects each crop's samples and reader masks, then scores every nodule as one volume.

    Args:
        num_samples: samples per crop kept (the first ``num_samples``), e.g. 16 for 3D GED16 and HM-IoU16.
    """

    def __init__(self, num_samples: int = 16) -> None:
        self.num_samples = int(num_samples)
        self._slices: dict[tuple, list[tuple[float, torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def add(self, item: Mapping[str, Any], samples: torch.Tensor, labels: torch.Tensor, affine: torch.Tensor) -> None:
        """One crop: its item (ids and ``slice_z``), samples ``(N, H, W)``, reader masks ``(R, H, W)`` and the
        4x4 affine of its array index."""
        if samples.shape[0] < self.num_samples:
            raise ValueError(f"NoduleVolumes keeps {self.num_samples} samples per crop, got {samples.shape[0]}.")
        z = float(item.get("slice_z", 0.0))
        kept = samples[: self.num_samples].to(torch.uint8).cpu()
        affine = torch.as_tensor(affine, dtype=torch.float64).reshape(4, 4).cpu()
        self._slices[nodule_key(item)].append((z, kept, labels.to(torch.uint8).cpu(), affine))

    @staticmethod
    def _canvas(slices: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``(N, S, H', W')`` and readers ``(R, S, H', W')`` placed by their in-plane offsets."""
        reference = torch.linalg.inv(slices[0][3])
        offsets = []
        for _, _, _, affine in slices:
            relative = reference @ affine
            shift = torch.round(relative[:2, 3])
            if not torch.allclose(
                relative[:2, :2], torch.eye(2, dtype=relative.dtype), atol=1e-3
            ) or not torch.allclose(relative[:2, 3], shift, atol=1e-2):
                raise ValueError("the crops of a nodule are not on one in-plane lattice; they cannot be stacked.")
            offsets.append(shift.long())
        offsets = torch.stack(offsets)
        low = offsets.min(0).values
        size = torch.tensor(slices[0][1].shape[1:])
        high = (offsets + size).max(0).values
        shape = (high - low).tolist()
        samples = torch.zeros(slices[0][1].shape[0], len(slices), *shape, dtype=torch.uint8)
        labels = torch.zeros(slices[0][2].shape[0], len(slices), *shape, dtype=torch.uint8)
        for s, ((_, kept, masks, _), offset) in enumerate(zip(slices, offsets)):
            i, j = (offset - low).tolist()
            h, w = kept.shape[1:]
            samples[:, s, i : i + h, j : j + w] = kept
            labels[:, s, i : i + h, j : j + w] = masks
        return samples, labels

    def stacks(self) -> Iterator[tuple[tuple[str, str, str], int, torch.Tensor, torch.Tensor]]:
        """Per nodule, in key order: its key, slice count, sample volumes ``(N, S, H', W')`` and reader-slot
        volumes ``(R, S, H', W')`` (uint8), the crops placed by their affines and stacked by slice z."""
        for key, slices in sorted(self._slices.items()):
            slices = sorted(slices, key=lambda s: s[0])
            if len({tuple(s[1].shape[1:]) for s in slices}) != 1 or len({s[2].shape[0] for s in slices}) != 1:
                raise ValueError(f"nodule {key}: its crops differ in size or reader count; they cannot be stacked.")
            samples, labels = self._canvas(slices)
            yield key, len(slices), samples, labels

    def per_nodule(self) -> list[dict[str, Any]]:
        """Per nodule: its key, slice count, 3D GED and HM-IoU at ``num_samples``, and the mean adjacent-slice
        Dice of the samples and of the readers (NaN for a one-slice nodule)."""
        rows = []
        for key, num_slices, samples, labels in self.stacks():
            ged = float(generalized_energy_distance(samples[None], labels[None])[0])
            hm = (
                float(hungarian_matched_iou(samples[None], labels[None])[0])
                if samples.shape[0] % labels.shape[0] == 0
                else float("nan")
            )
            many = num_slices > 1
            nan = float("nan")
            rows.append(
                {
                    "patient_id": key[0],
                    "series_uid": key[1],
                    "nodule_id": key[2],
                    "num_slices": num_slices,
                    f"ged{self.num_samples}_3d": ged,
                    f"hm_iou{self.num_samples}_3d": hm,
                    "adjacent_dice": float(adjacent_slice_dice(samples).nanmean()) if many else nan,
                    "readers_adjacent_dice": float(adjacent_slice_dice(labels).nanmean()) if many else nan,
                }
            )
        return rows

    def aggregate(self, rows: Sequence[Mapping[str, Any]] | None = None) -> dict[str, float]:
        """Means over nodules (adjacent-slice Dice over nodules of two or more slices), of :meth:`per_nodule`'s
        rows (pass them when already computed, to stack the volumes only once)."""
        rows = self.per_nodule() if rows is None else rows
        if not rows:
            raise ValueError("NoduleVolumes.aggregate() called before any crop was added.")
        out = {}
        for name in (
            f"ged{self.num_samples}_3d",
            f"hm_iou{self.num_samples}_3d",
            "adjacent_dice",
            "readers_adjacent_dice",
        ):
            values = torch.tensor([r[name] for r in rows], dtype=torch.float64)
            out[name] = float(values.nanmean())
        out["num_nodules"] = len(rows)
        return out
