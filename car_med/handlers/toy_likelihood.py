"""Fig. 3a probe: score fresh samples of G under the toy's exact mixture density during training."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.networks.utils import eval_mode

from car_med.data.toy import toy_log_likelihood
from car_med.files import atomic_write

__all__ = ["ToyLikelihoodHandler"]


class ToyLikelihoodHandler:
    """Every ``every`` iterations draw ``num_points`` fresh x in [0, 1], one G sample each, and record
    the mean exact log-likelihood log p(y_hat | x). The curve is written to ``output_file`` (CSV) when
    the engine completes, and the latest value is put in ``engine.state.metrics``.

    Each evaluation draws fresh x and noise from a generator seeded with ``seed + iteration``, so runs
    with the same seed are scored on the same points and the curves of different runs compare.

    Args:
        pi: the data's mode probability.
        sigma: the data's mode noise std.
        output_file: CSV path with columns ``iteration,log_likelihood``.
        every: evaluation period in iterations.
        num_points: x values per evaluation.
        seed: seed of the x and noise draws.
    """

    def __init__(
        self, pi: float, sigma: float, output_file: str, every: int = 10, num_points: int = 2000, seed: int = 0
    ) -> None:
        if every < 1 or num_points < 1:
            raise ValueError(f"every and num_points must be >= 1, got {every} and {num_points}.")
        self.pi = pi
        self.sigma = sigma
        self.output_file = Path(output_file)
        self.every = every
        self.num_points = num_points
        self.seed = seed
        self.history: list[tuple[int, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.evaluate)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def evaluate(self, engine: Engine) -> float:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + engine.state.iteration)
        device = engine.state.device
        x = torch.rand(self.num_points, 1, generator=generator).to(device)
        noise = torch.randn(self.num_points, engine.noise_dim, generator=generator).to(device)
        with eval_mode(engine.calibration_network, engine.refinement_network):
            y_hat = engine.refinement_network(x, engine.calibration_network(x), noise)
        value = float(toy_log_likelihood(x, y_hat, self.pi, self.sigma).mean())
        self.history.append((engine.state.iteration, value))
        engine.state.metrics["toy_log_likelihood"] = value
        return value

    def write(self, engine: Engine | None = None) -> None:
        with atomic_write(self.output_file) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["iteration", "log_likelihood"])
            writer.writerows(self.history)
