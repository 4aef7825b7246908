"""Inference step of the toy bundle: M samples on a fixed x grid, F's target and D's landscape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.networks.utils import eval_mode
from torch import nn

from car_med.data.toy import toy_expected_y
from car_med.engines.checkpoints import latest_checkpoint, load_network_checkpoint
from car_med.files import atomic_write
from car_med.sampling import CARSampler

__all__ = ["ToyInference"]


class ToyInference:
    """Load the checkpoint training wrote in ``output_dir`` and write ``samples.npz`` there.

    ``samples.npz`` holds ``x`` (N,), ``samples`` (N, M), ``calibration_target`` (N,) = F(x),
    ``expected_y`` (N,) = the true E[y|x], and D's probability ``d_prob`` on the ``d_x`` x ``d_y``
    grid (for the background of Fig. 3b/c).

    Args:
        calibration_network, refinement_network, discriminator: the toy MLPs, architecture as in training.
        output_dir: the training run's output folder.
        checkpoint: explicit checkpoint path; default the newest ``stage2*.pt`` under ``output_dir/checkpoints``.
        pi: the data's mode probability (for ``expected_y``).
        num_points: size of the x grid over [0, 1].
        num_samples: M per x (>= 1).
        seed: noise seed.
        y_range: y extent of D's grid.
        grid_size: D grid resolution per axis.
    """

    def __init__(
        self,
        calibration_network: nn.Module,
        refinement_network: nn.Module,
        discriminator: nn.Module,
        output_dir: str,
        checkpoint: str | None = None,
        pi: float = 0.5,
        num_points: int = 200,
        num_samples: int = 100,
        seed: int = 0,
        y_range: tuple[float, float] = (-1.0, 1.0),
        grid_size: int = 200,
    ) -> None:
        self.calibration_network = calibration_network
        self.refinement_network = refinement_network
        self.discriminator = discriminator
        self.output_dir = Path(output_dir)
        self.checkpoint = checkpoint
        self.pi = pi
        self.num_points = num_points
        self.num_samples = num_samples
        self.seed = seed
        self.y_range = y_range
        self.grid_size = grid_size

    def _resolve_checkpoint(self) -> str:
        path = self.checkpoint or latest_checkpoint(self.output_dir / "checkpoints", "stage2")
        if path is None:
            raise FileNotFoundError(
                f"no stage-2 checkpoint in {self.output_dir / 'checkpoints'}: run the toy training with "
                f"--output_dir {self.output_dir} first, or pass --checkpoint."
            )
        return path

    def run(self) -> str:
        path = self._resolve_checkpoint()
        load_network_checkpoint(self.calibration_network, path, key="calibration_network")
        load_network_checkpoint(self.refinement_network, path, key="refinement_network")
        load_network_checkpoint(self.discriminator, path, key="discriminator")
        sampler = CARSampler(
            self.calibration_network,
            self.refinement_network,
            num_samples=self.num_samples,
            output_type="continuous",
            max_batch=20000,
        )
        x = torch.linspace(0.0, 1.0, self.num_points).unsqueeze(1)
        result = sampler(x, generator=torch.Generator().manual_seed(self.seed))
        d_x = np.linspace(0.0, 1.0, self.grid_size, dtype=np.float32)
        d_y = np.linspace(self.y_range[0], self.y_range[1], self.grid_size, dtype=np.float32)
        gx, gy = np.meshgrid(d_x, d_y)
        with eval_mode(self.discriminator):
            logits = self.discriminator(torch.from_numpy(gx.reshape(-1, 1)), torch.from_numpy(gy.reshape(-1, 1)))
        d_prob = torch.sigmoid(logits).reshape(self.grid_size, self.grid_size).numpy()
        target = self.output_dir / "samples.npz"
        with atomic_write(target, suffix=".tmp.npz") as tmp:  # np.savez would append .npz to another name
            np.savez(
                tmp,
                x=x[:, 0].numpy(),
                samples=result.samples[:, :, 0].numpy(),
                calibration_target=result.calibration[:, 0].numpy(),
                expected_y=toy_expected_y(x, self.pi)[:, 0].numpy(),
                d_x=d_x,
                d_y=d_y,
                d_prob=d_prob,
            )
        return str(target)
