"""Dropout whose CPU masks cost a third of ``nn.Dropout``'s.

On CPU, PyTorch draws a dropout mask with one Mersenne-Twister call per element, on one thread: at B=8,
M=20, 128x128, G's masks took 1.4 s of a 9 s stage-2 step. :class:`FastDropout` cuts each 64-bit draw
into four 16-bit numbers and keeps an element when its number is at or above the drop probability's
threshold, which takes 0.2 s where ``bernoulli_`` takes 0.6 s for one of G's full-resolution blocks. The
drop probability is ``p`` rounded to a multiple of 1/65536 (0.1 becomes 0.100006). Kept values are scaled
by ``1 / (1 - p)``, as in ``nn.Dropout``. On other devices it is ``nn.Dropout``: CUDA's fused dropout is
fast already. No library offers a faster CPU mask, hence this module.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FastDropout", "apply_keep_mask", "fill_keep_mask_"]

_LEVELS = 2**16


def _threshold(p: float) -> int:
    """The int16 value at or above which an element is kept: P(keep) = 1 - round(p * 65536) / 65536."""
    return -(_LEVELS // 2) + round(p * _LEVELS)


def fill_keep_mask_(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill a dense boolean tensor, in its memory order, with independent keep decisions (keep = ``True``).

    Args:
        mask: a ``torch.bool`` tensor whose elements fill one contiguous run of memory (any dense layout,
            e.g. channels-last); it is filled in place in that memory order.
        p: drop probability in [0, 1].
        generator: the random generator; the default one when ``None``.

    Returns:
        ``mask``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"fill_keep_mask_: mask must be torch.bool, got {mask.dtype}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fill_keep_mask_: drop probability must be in [0, 1], got {p}")
    if not _is_dense(mask):
        raise ValueError(
            f"fill_keep_mask_: mask of shape {tuple(mask.shape)} must be dense, got strides {mask.stride()}"
        )
    n = mask.numel()
    flat = torch.as_strided(mask, (n,), (1,), mask.storage_offset())
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=mask.device)
    # the full int64 range: the default range of random_() leaves the top bit, and so one int16 in four, biased
    words.random_(-(2**63), None, generator=generator)
    torch.ge(words.view(torch.int16)[:n], _threshold(p), out=flat)
    return mask


def apply_keep_mask(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``x / (1 - p)`` where ``mask`` keeps, 0 elsewhere: the values of ``nn.Dropout`` for the same mask."""
    scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1.0 - p)
    return torch.where(mask, x * scale, 0.0)


def _is_dense(t: torch.Tensor) -> bool:
    """Whether the elements of ``t`` occupy exactly ``numel`` consecutive memory slots."""
    order = sorted(range(t.ndim), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with CPU masks from :func:`fill_keep_mask_` (see the module docstring).

    Its state dict and ``p``, ``inplace`` are those of ``nn.Dropout``, which it subclasses.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or not _is_dense(x):
            return super().forward(x)
        if self.p == 1.0:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        mask = fill_keep_mask_(torch.empty_like(x, dtype=torch.bool), self.p)
        out = apply_keep_mask(x, mask, self.p)
        return x.copy_(out) if self.inplace else out
