"""Plain per-pair reference implementations of GED and HM-IoU, written straight from SPEC section 2.

Deliberately slow and literal (a Python loop over every pair, each IoU from its own masks) so that the vectorised
kernel is checked against the formulas, not against a second clever implementation.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# the multi-class test setting: 24 classes plus the ignore class 24, as in the 25-channel Cityscapes labels
MULTI_CLASSES = tuple(range(24))
MULTI_IGNORE = 24


def ref_iou(a: np.ndarray, b: np.ndarray, classes, valid: np.ndarray) -> float:
    """Mean IoU over the classes present in either map (on valid pixels); 1 if no class is present."""
    a = a[valid][None, :] == np.asarray(classes)[:, None]  # (C, pixels) masks of this one pair
    b = b[valid][None, :] == np.asarray(classes)[:, None]
    union = np.logical_or(a, b).sum(axis=1)
    inter = np.logical_and(a, b).sum(axis=1)
    present = union > 0  # a class absent from both maps is skipped
    if not present.any():
        return 1.0
    return float(np.mean(inter[present] / union[present]))


def _valid_masks(labels: np.ndarray, ignore) -> list[np.ndarray]:
    ignore = () if ignore is None else (ignore if isinstance(ignore, (tuple, list)) else (ignore,))
    return [~np.isin(y, ignore) for y in labels]


def ref_ged_terms(samples, labels, classes, ignore=None, weights=None, unbiased=False):
    """GED and its terms for one image: samples (N, *spatial), labels (R, *spatial), weights (R,) or None."""
    n, r = len(samples), len(labels)
    valid = _valid_masks(labels, ignore)
    valid_all = np.logical_and.reduce(valid)
    w = np.full(r, 1.0 / r) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)

    d_sy = 0.0
    for i in range(n):
        for j in range(r):
            d_sy += w[j] * (1.0 - ref_iou(samples[i], labels[j], classes, valid[j])) / n

    d_ss, count = 0.0, 0
    for i in range(n):
        for j in range(n):
            if unbiased and i == j:
                continue
            d_ss += 1.0 - ref_iou(samples[i], samples[j], classes, valid_all)
            count += 1
    d_ss /= count

    d_yy, norm = 0.0, 0.0
    for i in range(r):
        for j in range(r):
            if unbiased and i == j:
                continue
            d_yy += w[i] * w[j] * (1.0 - ref_iou(labels[i], labels[j], classes, valid[i] & valid[j]))
            norm += w[i] * w[j]
    d_yy = d_yy / norm if unbiased else d_yy
    return 2.0 * d_sy - d_ss - d_yy, d_sy, d_ss, d_yy


def ref_hm_iou(samples, labels, classes, ignore=None) -> float:
    """HM-IoU for one image: tile the labels N / R times, match with cost 1 - IoU, mean matched IoU."""
    n, r = len(samples), len(labels)
    valid = _valid_masks(labels, ignore)
    cache: dict[tuple[int, int], float] = {}
    iou = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            key = (i, j % r)  # tiled column j is label j % R
            if key not in cache:
                cache[key] = ref_iou(samples[i], labels[j % r], classes, valid[j % r])
            iou[i, j] = cache[key]
    rows, cols = linear_sum_assignment(1.0 - iou)
    return float(iou[rows, cols].mean())


def make_maps(seed, batch, n, r, spatial, multiclass, flip=0.3, p_empty=0.2):
    """Labels that disagree a little, samples that are noisy copies of them, some empty maps, ignore pixels."""
    rng = np.random.default_rng(seed)
    n_values = 24 if multiclass else 2
    base = rng.integers(0, n_values, size=(batch, 1, *spatial))
    labels = np.repeat(base, r, axis=1)
    labels = np.where(rng.random(labels.shape) < flip, rng.integers(0, n_values, size=labels.shape), labels)
    samples = labels[:, rng.integers(0, r, size=n)]
    samples = np.where(rng.random(samples.shape) < flip, rng.integers(0, n_values, size=samples.shape), samples)
    samples[rng.random((batch, n)) < p_empty] = 0
    labels[rng.random((batch, r)) < p_empty] = 0
    if multiclass:
        shared = rng.random((batch, 1, *spatial)) < 0.15
        own = rng.random(labels.shape) < 0.05
        labels = np.where(shared | own, MULTI_IGNORE, labels)
        # samples may predict the ignore class too; it never counts as a class
        samples = np.where(rng.random(samples.shape) < 0.05, MULTI_IGNORE, samples)
    return torch.as_tensor(samples), torch.as_tensor(labels)
