"""Stand-ins for what the validation handlers meet in training: an engine that moves G's weights each iteration, and
the part of MONAI's MLFlowHandler they use."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from ignite.engine import Engine, Events


def weight_moving_engine(g: torch.nn.Module, step_size: float = 0.2, seed: int = 0) -> tuple[Engine, dict[int, dict]]:
    """An engine whose every iteration moves each of G's weight tensors at random by ``step_size`` times its mean
    magnitude (a stand-in for training), and the state dict G had after each iteration, by iteration."""
    generator = torch.Generator().manual_seed(seed)
    weights: dict[int, dict] = {}

    def step(engine: Engine, batch) -> None:
        with torch.no_grad():
            for parameter in g.parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(step_size * parameter.abs().mean() * noise)

    engine = Engine(step)

    @engine.on(Events.ITERATION_COMPLETED)
    def _remember(engine: Engine) -> None:
        weights[engine.state.iteration] = copy.deepcopy(g.state_dict())

    return engine, weights


class RecordingMLflowHandler:
    """``cur_run.info.run_id`` and a ``client`` that records ``log_metric`` and ``log_artifact`` calls."""

    def __init__(self, run_id: str = "run-1") -> None:
        self.cur_run = SimpleNamespace(info=SimpleNamespace(run_id=run_id))
        self.client = self
        self.metrics: list[tuple[str, str, float, int]] = []
        self.artifacts: list[tuple[str, str, str]] = []

    def log_metric(self, run_id: str, key: str, value: float, step: int) -> None:
        self.metrics.append((run_id, key, value, step))

    def log_artifact(self, run_id: str, path: str, artifact_path: str) -> None:
        self.artifacts.append((run_id, path, artifact_path))
