"""Multi-process (torchrun) training without wrapping the networks in ``DistributedDataParallel``.

CAR's stage 2 calls D three times per iteration (on G's samples with D frozen, then on real and fake
labels) and takes R1's double-backward through it; DDP's reducer expects one forward per backward and
mis-counts that pattern. So, like StyleGAN2-ADA, the ranks here average gradients themselves: each
optimiser all-reduces its parameters' gradients just before its step (what DDP would have done during
backward), and BatchNorm buffers are broadcast from rank 0 after every iteration (as DDP's
``broadcast_buffers``). With the same initial weights on every rank, every rank then holds the same model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn

__all__ = [
    "BroadcastBuffers",
    "ReshuffleOnRestart",
    "average_gradients_before_step",
    "broadcast_parameters",
    "distributed_backend",
    "mean_over_ranks",
]


def distributed_backend() -> str:
    """NCCL when a GPU is present, gloo on CPU (the model-zoo configs hard-code NCCL, which has no CPU path)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients_before_step(*optimizers: torch.optim.Optimizer) -> None:
    """Make each optimiser average its gradients over all ranks before every ``step()``.

    A no-op in a single process. Parameters without a gradient on this rank take part with zeros, so
    every rank issues the same collective calls.
    """
    if _world_size() == 1:
        return

    def hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        world = _world_size()
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad.div_(world)

    for optimizer in optimizers:
        optimizer.register_step_pre_hook(hook)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself in a single process)."""
    if _world_size() == 1:
        return value
    total = value.detach().clone().float()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / _world_size()


def broadcast_parameters(*modules: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (call once after building the networks)."""
    if _world_size() == 1:
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


class BroadcastBuffers:
    """Broadcast the networks' buffers (BatchNorm running statistics) from rank 0 after every iteration.

    Each rank sees a different shard, so its running statistics drift apart; DDP's ``broadcast_buffers``
    overwrites them with rank 0's, and this does the same for networks trained without DDP.

    Args:
        modules: the networks whose buffers to keep equal.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if _world_size() == 1:
            return
        for module in self.modules:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)


class ReshuffleOnRestart:
    """Give a ``DistributedSampler`` a new epoch each time the loader restarts inside one long epoch.

    The bundles run each stage as one epoch of N iterations, and ignite restarts an exhausted loader
    within it; a ``DistributedSampler`` keyed on the epoch would then repeat the same shard order.

    Args:
        sampler: the training loader's ``DistributedSampler``.
    """

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.restarts = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.DATALOADER_STOP_ITERATION, self)

    def __call__(self, engine: Engine | None = None) -> None:
        self.restarts += 1
        self.sampler.set_epoch(self.restarts)
