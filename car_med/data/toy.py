"""The 1D bimodal regression data of the CAR paper (section 4.1, eq. 8), its exact density and loaders."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["sample_toy", "toy_mode_means", "toy_log_likelihood", "toy_expected_y", "ToyBatchDataset"]

# x-ranges of the three regimes of eq. 8
_BIMODAL_END = 0.4
_CROSSING_END = 0.8


def _check_params(pi: float, sigma: float) -> None:
    if not 0.0 <= pi <= 1.0:
        raise ValueError(f"pi (mode probability) must be in [0, 1], got {pi}.")
    if sigma <= 0.0:
        raise ValueError(f"sigma (mode noise std) must be > 0, got {sigma}.")


def toy_mode_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two mode centres of y given x: ``(mean if b=1, mean if b=0)``.

    b=1 (probability pi) gives -0.5 on [0, 0.4), -(-1.25x + 1) on [0.4, 0.8) and 0 on [0.8, 1].
    """
    line = -1.25 * x + 1.0
    mode_b1 = torch.where(
        x < _BIMODAL_END, torch.full_like(x, -0.5), torch.where(x < _CROSSING_END, -line, torch.zeros_like(x))
    )
    mode_b0 = torch.where(
        x < _BIMODAL_END, torch.full_like(x, 0.5), torch.where(x < _CROSSING_END, line, torch.zeros_like(x))
    )
    return mode_b1, mode_b0


def sample_toy(
    num: int, pi: float, sigma: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num`` pairs: x ~ U(0, 1), b ~ Bernoulli(pi), y from eq. 8. Returns ``(x, y)``, each ``(num, 1)``."""
    _check_params(pi, sigma)
    x = torch.rand(num, 1, generator=generator)
    b = torch.rand(num, 1, generator=generator) < pi
    mode_b1, mode_b0 = toy_mode_means(x)
    y = torch.where(b, mode_b1, mode_b0) + sigma * torch.randn(num, 1, generator=generator)
    return x, y


def toy_expected_y(x: torch.Tensor, pi: float) -> torch.Tensor:
    """E[y | x], what a perfectly trained F predicts."""
    mode_b1, mode_b0 = toy_mode_means(x)
    return pi * mode_b1 + (1.0 - pi) * mode_b0


def toy_log_likelihood(x: torch.Tensor, y: torch.Tensor, pi: float, sigma: float) -> torch.Tensor:
    """Exact log p(y | x) under the mixture of eq. 8, elementwise (used to score G's samples, Fig. 3a)."""
    _check_params(pi, sigma)
    mode_b1, mode_b0 = toy_mode_means(x)
    norm = -0.5 * math.log(2.0 * math.pi) - math.log(sigma)
    log_b1 = norm - 0.5 * ((y - mode_b1) / sigma) ** 2 + (math.log(pi) if pi > 0 else -math.inf)
    log_b0 = norm - 0.5 * ((y - mode_b0) / sigma) ** 2 + (math.log1p(-pi) if pi < 1 else -math.inf)
    return torch.logaddexp(log_b1, log_b0)


class ToyBatchDataset(Dataset):
    """``num_batches`` ready-made batches of toy data; use with ``DataLoader(batch_size=None)``.

    Whole batches, not single pairs: collating 1000 one-element dicts per step would cost more than
    the MLP itself. Batch ``i`` is drawn from a generator seeded with ``seed + i``, so a run is
    reproducible and a resumed run sees the same data.

    Args:
        num_batches: length of the dataset (one epoch).
        batch_size: pairs per batch.
        pi: probability of the b=1 mode.
        sigma: mode noise std.
        seed: base seed.
    """

    def __init__(self, num_batches: int, batch_size: int, pi: float, sigma: float, seed: int = 0) -> None:
        _check_params(pi, sigma)
        if num_batches < 1 or batch_size < 1:
            raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}.")
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.pi = pi
        self.sigma = sigma
        self.seed = seed

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch index {index} out of range [0, {self.num_batches}).")
        generator = torch.Generator().manual_seed(int(np.int64(self.seed) * 1_000_003 + index))
        x, y = sample_toy(self.batch_size, self.pi, self.sigma, generator)
        return {"image": x, "label": y}
