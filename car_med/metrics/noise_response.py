"""How much G's output moves with its noise, per stochastic class: the measure of a collapsed refinement net.

The paper's cGAN+L_ce baseline "collapses to a deterministic output": G learns to ignore its noise vector. The
argmax samples alone cannot show that where G's collapsed output sits near a tie between a class and its flipped
twin (sidewalk's flip probability is 8/17): there the argmax of an almost constant output still changes pixel by
pixel from sample to sample, and the sample diversity stays high. So this looks at G's probabilities instead.

Per stochastic class and per pixel whose true class is the base class (or its flipped twin), the spread is the
standard deviation, over the samples, of G's probability of the flipped class. A sampler whose samples are one-hot
maps that flip the class with frequency p has spread ``sqrt(p (1 - p))``; a G that ignores its noise has 0. The
noise response is the spread over that reference, averaged over the classes: 1 for coherent, calibrated flips and
0 for a collapsed G.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.utils import convert_to_tensor

from car_med.data.stochastic_classes import CITYSCAPES_STOCHASTIC_CLASSES, check_stochastic_classes

__all__ = ["class_sample_spread_statistics", "noise_response_from_sums", "reference_spread"]


def reference_spread(p: float) -> float:
    """The spread of one-hot samples that flip a class with probability ``p``: ``sqrt(p (1 - p))``."""
    return math.sqrt(p * (1.0 - p))


def class_sample_spread_statistics(
    label: torch.Tensor,
    sample_probs: torch.Tensor,
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
) -> torch.Tensor:
    """Per-image sums behind the per-class spread of G's samples: ``(B, K, 2)`` float64 ``[pixel count, sum]``.

    Args:
        label: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``, base or flipped.
        sample_probs: G's softmax of every sample ``(B, M, C, *spatial)``, ``M >= 2``.
        stochastic_classes: ``(base, flipped, probability)`` triples.

    Returns:
        For each image and pair, the number of pixels whose true class is the pair's base class and the sum over
        them of the (population) standard deviation across the M samples of G's probability of the flipped class.

    Raises:
        ValueError: probabilities not ``(B, M, C, *spatial)``, fewer than 2 samples, a flipped class beyond C, or a
            label whose shape does not match.
    """
    triples = check_stochastic_classes(stochastic_classes)
    probs = convert_to_tensor(sample_probs, track_meta=False)
    t = convert_to_tensor(label, track_meta=False)
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"label must be integer class indices, got {getattr(t, 'dtype', type(t).__name__)}.")
    if isinstance(probs, torch.Tensor) and t.ndim == probs.ndim - 1 and t.ndim > 1 and t.shape[1] == 1:
        t = t.squeeze(1)
    # the label fixes the spatial rank, so a (B, C, H, W) map passed by mistake is told apart from (B, M, C, H, W)
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.ndim != t.ndim + 2:
        raise ValueError(
            f"sample_probs must be G's per-sample probabilities (B, M, C, *spatial) for labels {tuple(t.shape)}, "
            f"got {getattr(probs, 'dtype', type(probs).__name__)} with shape {tuple(getattr(probs, 'shape', ()))}."
        )
    batch, num_samples, channels = probs.shape[:3]
    if num_samples < 2:
        raise ValueError(f"the spread over samples needs at least 2 samples per image, got {num_samples}.")
    beyond = [f for _, f, _ in triples if f >= channels]
    if beyond:
        raise ValueError(f"class id out of range: flipped classes {beyond} but sample_probs has C={channels}.")
    if tuple(t.shape) != (batch, *probs.shape[3:]):
        raise ValueError(
            f"label {tuple(t.shape)} does not match sample_probs {tuple(probs.shape)}: expected "
            f"({batch}, *{tuple(probs.shape[3:])}) or ({batch}, 1, *{tuple(probs.shape[3:])})."
        )
    t = t.to(probs.device).reshape(batch, -1)
    rows = []
    for base, flipped, _ in triples:
        member = ((t == base) | (t == flipped)).to(torch.float64)
        spread = probs[:, :, flipped].reshape(batch, num_samples, -1).to(torch.float64).std(dim=1, correction=0)
        rows.append(torch.stack([member.sum(dim=1), (spread * member).sum(dim=1)], dim=-1))
    return torch.stack(rows, dim=1).cpu()


def noise_response_from_sums(
    sums: torch.Tensor, stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES
) -> tuple[torch.Tensor, float]:
    """Per-class spreads and the noise response from sums pooled over a pass.

    Args:
        sums: ``(K, 2)`` pixel counts and spread sums (:func:`class_sample_spread_statistics` summed over images).
        stochastic_classes: the triples, in the order of the rows of ``sums``.

    Returns:
        ``(spreads, noise_response)``: ``(K,)`` mean spread per class (NaN for a class never seen), and the mean
        over the classes seen with 0 < p < 1 of spread / ``sqrt(p (1 - p))`` (NaN if none).
    """
    triples = check_stochastic_classes(stochastic_classes)
    sums = sums.detach().to("cpu", torch.float64)
    count, total = sums[:, 0], sums[:, 1]
    spreads = torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(count, float("nan")))
    reference = torch.tensor([reference_spread(p) for _, _, p in triples], dtype=torch.float64)
    # a class flipped with probability 0 or 1 has no reference spread: it cannot enter the ratio
    relative = torch.where(reference > 0, spreads / reference.clamp_min(1e-12), torch.full_like(spreads, float("nan")))
    seen = ~torch.isnan(relative)
    return spreads, float(relative[seen].mean()) if seen.any() else float("nan")
