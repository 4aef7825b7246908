"""Small connected components of hard segmentation maps: found for the speckle measure, removed by the sampler.

A sample whose only foreground is a few stray pixels is a lesion outline to Hungarian-matched IoU and GED: it
scores IoU 0 against every reader who drew nothing on the slice. :func:`remove_small_components` turns such
components into background (``CARSampler(min_component_size=...)``), :func:`small_components` finds them for
:class:`~car_med.metrics.presence.SpeckleFraction`. Both use 4-connectivity, as the speckle measure does.

scipy's ``ndimage.label`` does the labelling, one call per 2D map: 0.13 ms for a 128x128 map with one lesion,
0.23 ms for one of random noise (1 thread). MONAI's ``RemoveSmallObjects`` would do the same through
scikit-image, but per channel of one image and with a deprecation warning on every call of the scikit-image
in our requirements.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["remove_small_components", "small_components"]

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def small_components(maps: torch.Tensor, min_size: int, foreground: int = 1) -> torch.Tensor:
    """Which pixels of ``maps`` lie in 4-connected ``foreground`` components of fewer than ``min_size`` pixels.

    Args:
        maps: integer class maps ``(..., H, W)`` on any device.
        min_size: components with fewer pixels than this are small; must be >= 1.
        foreground: the class whose components are measured.

    Returns:
        a bool tensor shaped like ``maps``, on ``maps``' device.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1 pixel, got {min_size}.")
    if maps.ndim < 2:
        raise ValueError(f"maps must be (..., H, W) class maps, got shape {tuple(maps.shape)}.")
    masks = (maps == foreground).cpu().numpy()
    flat = masks.reshape(-1, *masks.shape[-2:])
    small = np.zeros_like(flat)
    for index, mask in enumerate(flat):
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=_FOUR_CONNECTED)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        sizes[0] = min_size  # the background label is never small
        small[index] = (sizes < min_size)[components]
    return torch.from_numpy(small.reshape(masks.shape)).to(maps.device)


def remove_small_components(
    maps: torch.Tensor, min_size: int, foreground: int = 1, background: int = 0
) -> torch.Tensor:
    """``maps`` with every ``foreground`` component of fewer than ``min_size`` pixels set to ``background``.

    A map whose foreground is only such components becomes empty. ``maps`` is not changed.
    """
    return maps.masked_fill(small_components(maps, min_size, foreground), background)
