"""Networks from a plain JSON spec, so a bundle and a registered model rebuild the same architecture."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.utils import optional_import
from torch import nn

__all__ = ["build_network", "spec_to_target_config"]

_ALLOWED_PREFIX = "car_med.networks."


def _check_spec(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("target"), str):
        raise ValueError(
            f"a network spec is a dict with 'target' (e.g. 'car_med.networks.NoiseInjectedUNet') and the "
            f"constructor's arguments, got {spec!r}."
        )
    target = spec["target"]
    if not target.startswith(_ALLOWED_PREFIX):
        # a spec travels with registered models; building arbitrary callables from it would run foreign code
        raise ValueError(f"network spec 'target' must name a class in {_ALLOWED_PREFIX}*, got {target!r}.")
    return target, {k: v for k, v in spec.items() if k != "target"}


def build_network(spec: Mapping[str, Any]) -> nn.Module:
    """Build ``spec["target"](**other keys)``; only classes under ``car_med.networks`` are allowed.

    A spec has no ``_target_`` key, so a MONAI bundle keeps it as plain data (``@calibration_network_spec``
    resolves to the dict, not to a built network) and can hand the very same dict to the model registry.

    Example::

        build_network({"target": "car_med.networks.Discriminator", "channels": [32, 64]})
    """
    target, kwargs = _check_spec(spec)
    module, attr = target.rsplit(".", 1)
    cls, found = optional_import(module, name=attr)
    if not found or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"network spec 'target' {target!r} is not a network class of car_med.networks.")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"network spec for {target}: {err}") from None


def spec_to_target_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The same spec in MONAI's ``{"_target_": ...}`` form (what ``car_med.registry`` stores)."""
    target, kwargs = _check_spec(spec)
    return {"_target_": target, **kwargs}
