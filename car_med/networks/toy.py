"""MLPs of the 1D bimodal regression toy (paper section 4.1): F, G and D, 4 hidden layers of 64 units."""

from __future__ import annotations

import torch
from monai.networks.nets import FullyConnectedNet
from torch import nn

__all__ = ["ToyCalibrationMLP", "ToyRefinementMLP", "ToyDiscriminatorMLP"]


def _check_columns(name: str, tensor: torch.Tensor, columns: int, what: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.shape[1] != columns:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} expected {what} of shape (B, {columns}), got {shape}.")


class ToyCalibrationMLP(nn.Module):
    """F: x -> predicted mean of y (ReLU MLP; trained with MSE, a unit-scale Gaussian likelihood)."""

    def __init__(self, hidden: int = 64, num_hidden_layers: int = 4) -> None:
        super().__init__()
        self.net = FullyConnectedNet(1, 1, [hidden] * num_hidden_layers, act="RELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_columns(type(self).__name__, x, 1, "x")
        return self.net(x)


class ToyRefinementMLP(nn.Module):
    """G: (x, F(x), eps) -> one sample of y (LeakyReLU MLP, slope ``negative_slope``)."""

    def __init__(
        self, noise_dim: int = 1, hidden: int = 64, num_hidden_layers: int = 4, negative_slope: float = 0.2
    ) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        act = ("LEAKYRELU", {"negative_slope": negative_slope})
        self.net = FullyConnectedNet(2 + noise_dim, 1, [hidden] * num_hidden_layers, act=act)

    def forward(self, x: torch.Tensor, calibration: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_columns(name, x, 1, "x")
        _check_columns(name, calibration, 1, "F(x)")
        _check_columns(name, noise, self.noise_dim, "noise")
        # detach: the refinement loss must never train F (paper section 3.3)
        return self.net(torch.cat([x, calibration.detach(), noise], dim=1))


class ToyDiscriminatorMLP(nn.Module):
    """D: (x, y) -> real/fake logit (LeakyReLU MLP, slope ``negative_slope``)."""

    def __init__(self, hidden: int = 64, num_hidden_layers: int = 4, negative_slope: float = 0.2) -> None:
        super().__init__()
        act = ("LEAKYRELU", {"negative_slope": negative_slope})
        self.net = FullyConnectedNet(2, 1, [hidden] * num_hidden_layers, act=act)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_columns(name, x, 1, "x")
        _check_columns(name, y, 1, "y")
        return self.net(torch.cat([x, y], dim=1))
