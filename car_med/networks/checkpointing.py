"""Activation checkpointing of a network's blocks with PyTorch's own ``torch.utils.checkpoint``.

A checkpointed block keeps only its inputs for the backward pass and runs its forward pass again there. Two
things must not happen twice: dropout must draw the same masks on the rerun (``checkpoint`` restores the RNG
state), and BatchNorm must update its running statistics once per iteration. On the rerun BatchNorm runs with
momentum 0, which leaves its running statistics as they are; in training mode it normalises with the batch's
statistics either way, so the recomputed output is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed", "running_stats_frozen"]


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode normalise by the batch but leave their running stats.

    The layers keep tracking (the rerun must save the same tensors for the backward pass as the first run), with
    momentum 0, so the running statistics are multiplied by exactly 1; the batch counter is put back after.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [
        (norm.momentum, None if norm.num_batches_tracked is None else norm.num_batches_tracked.clone())
        for norm in norms
    ]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved):
            norm.momentum = momentum
            if count is not None:
                norm.num_batches_tracked.copy_(count)


def checkpointed(block: Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
    """``block(*inputs)`` under ``torch.utils.checkpoint`` (non-reentrant), BatchNorm stats updated once."""
    module = block if isinstance(block, nn.Module) else None

    def contexts():
        return nullcontext(), (running_stats_frozen(module) if module is not None else nullcontext())

    return checkpoint(block, *inputs, use_reentrant=False, context_fn=contexts)
