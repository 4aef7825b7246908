"""The Fig. 3a probe: G's fresh samples scored under the toy's exact density, on a schedule, into a CSV."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from ignite.engine import Engine, Events

from car_med.data.toy import toy_mode_means
from car_med.handlers import ToyLikelihoodHandler


class ZeroCalibration(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class ModeSampler(torch.nn.Module):
    """A G that draws the b=1 mode's centre (plus ``noise_scale`` times its noise); remembers its mode at call."""

    def __init__(self, noise_scale: float = 0.0) -> None:
        super().__init__()
        self.noise_scale = noise_scale
        self.called_in_training_mode: list[bool] = []

    def forward(self, x: torch.Tensor, calibration: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.called_in_training_mode.append(self.training)
        return toy_mode_means(x)[0] + self.noise_scale * noise[:, :1]


def _engine(refinement_network: torch.nn.Module, noise_dim: int = 1) -> Engine:
    engine = Engine(lambda engine, batch: None)
    engine.calibration_network = ZeroCalibration()
    engine.refinement_network = refinement_network
    engine.noise_dim = noise_dim

    @engine.on(Events.STARTED)
    def _on_cpu(engine: Engine) -> None:
        engine.state.device = torch.device("cpu")

    return engine


def test_a_g_on_one_mode_scores_that_modes_share_of_the_density(tmp_path):
    pi, sigma = 0.3, 0.001
    handler = ToyLikelihoodHandler(pi, sigma, str(tmp_path / "curve.csv"), every=1, num_points=50_000, seed=3)
    engine = _engine(ModeSampler())
    handler.attach(engine)
    engine.run(range(1), max_epochs=1)
    # y on the b=1 centre: p(y|x) = pi N(0; sigma) on x < 0.8, where the b=0 centre is many sigma away (but in a
    # band of width ~0.01 sigma-units near 0.8), and N(0; sigma) on x >= 0.8, where the two modes coincide
    log_normal_peak = -0.5 * math.log(2 * math.pi) - math.log(sigma)
    expected = log_normal_peak + 0.8 * math.log(pi)
    (value,) = [v for _, v in handler.history]
    # 50,000 uniform x: the share of x >= 0.8 varies by 0.002 (std), i.e. 0.0024 in the mean log-likelihood
    assert value == pytest.approx(expected, abs=0.01)
    # a handler with pi and 1 - pi mixed up would be 0.8 * log(0.7 / 0.3) = 0.68 away
    assert engine.state.metrics["toy_log_likelihood"] == value


def test_the_curve_is_scored_every_n_iterations_and_written_when_the_run_completes(tmp_path):
    output = tmp_path / "probe" / "likelihood.csv"
    handler = ToyLikelihoodHandler(0.5, 0.1, str(output), every=3, num_points=64, seed=0)
    g = ModeSampler(noise_scale=0.05)
    engine = _engine(g)
    handler.attach(engine)
    engine.run(range(4), max_epochs=2)  # 8 iterations
    assert [iteration for iteration, _ in handler.history] == [3, 6]
    with open(output, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["iteration", "log_likelihood"]
    assert [(int(i), float(v)) for i, v in rows[1:]] == handler.history
    assert not output.with_suffix(".tmp").exists()
    # G is sampled in eval mode and handed back in train mode
    assert g.called_in_training_mode == [False, False] and g.training


def test_runs_with_one_seed_are_scored_on_the_same_points_and_another_seed_on_others(tmp_path):
    def curve(seed: int) -> list[tuple[int, float]]:
        handler = ToyLikelihoodHandler(0.5, 0.1, str(tmp_path / f"{seed}.csv"), every=1, num_points=32, seed=seed)
        engine = _engine(ModeSampler(noise_scale=0.05))
        handler.attach(engine)
        engine.run(range(3), max_epochs=1)
        return handler.history

    first, again, other = curve(0), curve(0), curve(1)
    assert first == again
    assert [i for i, _ in other] == [1, 2, 3] and all(a != b for (_, a), (_, b) in zip(first, other))
    # and each iteration draws its own points
    assert len({value for _, value in first}) == 3


@pytest.mark.parametrize("arguments", [{"every": 0}, {"num_points": 0}])
def test_a_schedule_without_points_is_refused(tmp_path, arguments):
    with pytest.raises(ValueError, match="every and num_points must be >= 1"):
        ToyLikelihoodHandler(0.5, 0.1, str(tmp_path / "curve.csv"), **arguments)
