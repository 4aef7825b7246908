"""Adversarial losses of CAR: non-saturating generator loss (eq. 3), discriminator BCE (eq. 4) and R1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.nn.modules.loss import _Loss

__all__ = [
    "generator_adversarial_loss",
    "discriminator_loss",
    "r1_penalty",
    "GeneratorAdversarialLoss",
    "DiscriminatorLoss",
]


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating -log D(G(F(x), eps)), averaged over every fake sample.

    ``softplus(-l) == -log(sigmoid(l))`` but stays finite for very negative logits.
    """
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of D: -log D(y) - log(1 - D(G(...))), each averaged over its batch."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def r1_penalty(
    real_logits: torch.Tensor,
    real_inputs: torch.Tensor | Sequence[torch.Tensor],
    gamma: float = 10.0,
    half: bool = False,
) -> torch.Tensor:
    """R1 gradient penalty (Mescheder et al. 2018) on real data.

    ``gamma * E_batch[ sum ||dD/dinput||^2 ]``, with the sum over every element of every input in
    ``real_inputs``. The CAR code uses gamma 10 without Mescheder's 1/2 factor; ``half=True``
    restores it.

    Args:
        real_logits: D's logits on real inputs ``(B, 1)``; the graph must reach ``real_inputs``.
        real_inputs: the tensor(s) the penalty is taken against, created with ``requires_grad=True``.
        gamma: penalty weight.
        half: multiply by 1/2, as in Mescheder et al.
    """
    inputs = [real_inputs] if isinstance(real_inputs, torch.Tensor) else list(real_inputs)
    for tensor in inputs:
        if not tensor.requires_grad:
            raise ValueError("r1_penalty needs real_inputs created with requires_grad=True before D's forward pass.")
    grads = torch.autograd.grad(real_logits.sum(), inputs, create_graph=True)
    batch = real_logits.shape[0]
    squared = sum(g.pow(2).reshape(batch, -1).sum(dim=1) for g in grads)
    penalty = gamma * squared.mean()
    return 0.5 * penalty if half else penalty


class GeneratorAdversarialLoss(_Loss):
    """Module form of :func:`generator_adversarial_loss`."""

    def forward(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return generator_adversarial_loss(fake_logits)


class DiscriminatorLoss(_Loss):
    """Module form of :func:`discriminator_loss`."""

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return discriminator_loss(real_logits, fake_logits)
