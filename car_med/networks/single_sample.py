"""F and G composed into one image -> probabilities network, for tools that call ``net(image)``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CARSingleSample"]


class CARSingleSample(nn.Module):
    """One CAR sample per image: ``G(x, softmax(F(x)), eps)`` with eps drawn from a fixed seed.

    MONAI's ``verify_net_in_out`` and exporters call a network with the image alone; G also needs F's
    probabilities and noise. This wrapper supplies both, with a seeded generator so the output is
    reproducible. For sampling many outlines use :class:`car_med.sampling.CARSampler`.

    Args:
        calibration_network: F (returns logits).
        refinement_network: G (returns softmax probabilities); needs a ``noise_dim`` attribute.
        seed: seed of the noise.
    """

    def __init__(self, calibration_network: nn.Module, refinement_network: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.calibration_network = calibration_network
        self.refinement_network = refinement_network
        self.seed = seed

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(image.shape[0], self.refinement_network.noise_dim, generator=generator)
        calibration = torch.softmax(self.calibration_network(image), dim=1)
        return self.refinement_network(image, calibration, noise.to(device=image.device, dtype=image.dtype))
