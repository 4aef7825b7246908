"""Random-number state as a checkpointable object, so a resumed run continues the same random streams."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable

__all__ = ["RandomState"]


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    # torch.load(weights_only=True) accepts tensors and plain containers, not numpy arrays
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_dict(d: dict[str, Any]) -> tuple:
    keys = d["keys"].numpy().astype(np.uint32)
    return (d["kind"], keys, d["pos"], d["has_gauss"], d["cached"])


class RandomState:
    """The state of every random stream a training run draws from, with ``state_dict``/``load_state_dict``.

    Put it in a ``CheckpointSaver``'s ``save_dict`` (and the loader's ``load_dict``) next to the networks and
    optimisers: Python's ``random``, NumPy's global generator, torch's CPU generator (and CUDA's when present)
    and each MONAI ``Randomizable`` transform given (e.g. the random reader draw) are restored on resume,
    so the data order, reader draws and G's noise continue as if the run had not stopped.

    Args:
        transforms: MONAI transforms (a ``Compose`` or a list); their ``Randomizable`` members are included.
    """

    def __init__(self, transforms: Any = None) -> None:
        self.randomizables = self._collect(transforms)

    @staticmethod
    def _collect(transforms: Any) -> list[Randomizable]:
        if transforms is None:
            return []
        if hasattr(transforms, "flatten"):
            transforms = transforms.flatten().transforms
        elif not isinstance(transforms, Iterable):
            transforms = [transforms]
        return [t for t in transforms if isinstance(t, Randomizable)]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": _numpy_state_to_dict(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "transforms": [_numpy_state_to_dict(t.R.get_state()) for t in self.randomizables],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("transforms", [])) != len(self.randomizables):
            raise ValueError(
                f"checkpoint has the random state of {len(state.get('transforms', []))} random transforms, "
                f"this run has {len(self.randomizables)}: the data transforms changed since it was saved."
            )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
        torch.set_rng_state(state["torch"])
        for transform, saved in zip(self.randomizables, state["transforms"]):
            transform.R.set_state(_numpy_state_from_dict(saved))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
