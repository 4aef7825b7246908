"""Find and load the checkpoints that MONAI's ``CheckpointSaver`` writes, with clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from monai.handlers import CheckpointLoader
from torch import nn

__all__ = [
    "CheckedCheckpointLoader",
    "check_state_dict",
    "latest_checkpoint",
    "load_car_networks",
    "load_network_checkpoint",
]


def _checkpoint_order(path: Path) -> tuple[int, int]:
    # The newest write is what a resume wants, whatever ignite's counter in the name ("epoch=3",
    # "iteration=1500", "final_iteration=...") says; the counter only breaks ties of equal mtimes.
    match = re.search(r"=(\d+)\.pt$", path.name)
    return (path.stat().st_mtime_ns, int(match.group(1)) if match else -1)


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "") -> str | None:
    """Newest ``<prefix>*.pt`` in ``directory`` (for resuming after a kill), or ``None`` if there is none."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob(f"{prefix}*.pt") if p.is_file()]
    if not candidates:
        return None
    return str(max(candidates, key=_checkpoint_order))


def check_state_dict(network: nn.Module, state: dict, source: str) -> None:
    """Raise a ``ValueError`` saying how ``state`` differs from ``network``'s own weights, if it does.

    PyTorch's own error on a mismatch is a long list of ``size mismatch`` lines; this names the count of
    missing, unexpected and mis-shaped weights, one example of each, and the likely cause.

    Args:
        network: the module the weights are meant for.
        state: a state dict.
        source: where the weights come from, for the message (e.g. ``"ckpt.pt#refinement_network"``).
    """
    name = type(network).__name__
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not hold a {name}: {len(missing)} expected weights are missing "
            f"(e.g. {missing[:3]}) and {len(unexpected)} are unexpected (e.g. {unexpected[:3]}). "
            f"Was it saved from a different network or configuration?"
        )
    wrong = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"{source}: {len(wrong)} weights of {name} have the wrong shape, e.g. '{k}' is {got} but the network "
            f"expects {want}. The network configuration (channels, classes, noise_dim) differs from training."
        )


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that first checks every network's weights with :func:`check_state_dict`.

    Resuming a bundle whose architecture was changed (other channels, classes or noise size) then stops
    with one clear message naming the checkpoint entry and the first differing weight, instead of
    PyTorch's ``size mismatch`` trace. Arguments are MONAI's.
    """

    def __call__(self, engine) -> None:
        checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        for key, obj in self.load_dict.items():
            if not isinstance(obj, nn.Module):
                continue
            if len(self.load_dict) == 1 and key not in checkpoint:
                state = checkpoint  # MONAI also accepts a bare state dict for a single object
            elif key not in checkpoint:
                raise ValueError(
                    f"{self.load_path}: no entry '{key}' to resume from; entries are {sorted(checkpoint)}. "
                    "Was it written by another bundle or stage?"
                )
            else:
                state = checkpoint[key]
            network = obj.module if isinstance(obj, nn.parallel.DistributedDataParallel | nn.DataParallel) else obj
            check_state_dict(network, state, f"{self.load_path}#{key}")
        super().__call__(engine)


def load_network_checkpoint(
    network: nn.Module, path: str | os.PathLike, key: str | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load weights into ``network`` from a plain state dict or a MONAI/ignite multi-object checkpoint.

    Args:
        network: the module to fill.
        path: checkpoint file.
        key: entry of a multi-object checkpoint (e.g. ``"refinement_network"``); if ``None`` the file must
            be a plain state dict or hold exactly one entry whose keys fit.
        map_location: passed to ``torch.load``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the checkpoint holds no such key, or its weights belong to another architecture.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {file}")
    checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{file}: expected a state dict, got {type(checkpoint).__name__}.")
    expected_keys = set(network.state_dict())
    state = checkpoint
    if key is not None:
        if key not in checkpoint:
            raise ValueError(f"{file}: no entry '{key}'; entries are {sorted(checkpoint)}.")
        state = checkpoint[key]
    elif not expected_keys & set(checkpoint):
        nested = {k: v for k, v in checkpoint.items() if isinstance(v, dict) and expected_keys & set(v)}
        if len(nested) == 1:
            state = next(iter(nested.values()))
    check_state_dict(network, state, f"{file}{'#' + key if key else ''}")
    network.load_state_dict(state)
    return network


def load_car_networks(
    calibration_network: nn.Module,
    refinement_network: nn.Module,
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
) -> None:
    """Fill F and G from a stage-2 checkpoint (its ``calibration_network`` and ``refinement_network`` entries)."""
    load_network_checkpoint(calibration_network, path, key="calibration_network", map_location=map_location)
    load_network_checkpoint(refinement_network, path, key="refinement_network", map_location=map_location)
