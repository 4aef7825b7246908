"""Input checks shared by the networks: shapes, dtypes and sizes, with messages that say what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SPATIAL_NAMES", "check_input_shape", "check_floating", "check_min_spatial", "check_spatial_dims"]

SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def check_input_shape(
    owner: str,
    what: str,
    tensor: torch.Tensor,
    expected: Sequence[int | str],
    bound: dict[str, int] | None = None,
) -> dict[str, int]:
    """Raise a ``ValueError`` naming the expected and the given shape when ``tensor`` does not fit.

    Args:
        owner: class name used in the message, e.g. ``"NoiseInjectedUNet"``.
        what: what the tensor is, e.g. ``"image"``.
        tensor: tensor to check.
        expected: one entry per dimension; an int must match exactly, a string (``"B"``, ``"H"``)
            is a symbol that must agree with the same symbol in ``bound``.
        bound: symbol sizes fixed by tensors checked earlier; updated in place and returned, so that
            several inputs of one call can be checked against each other.

    Returns:
        the updated ``bound`` mapping.

    Raises:
        ValueError: when the rank or any size does not match.
    """
    bound = {} if bound is None else bound
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{owner} expected {what} to be a torch.Tensor, got {type(tensor).__name__}")
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected)
    if ok:
        for e, s in zip(expected, shape):
            if isinstance(e, str):
                ok = ok and bound.get(e, s) == s
            else:
                ok = ok and int(e) == s
    if not ok:
        parts = [f"{e}={bound[e]}" if isinstance(e, str) and e in bound else str(e) for e in expected]
        raise ValueError(f"{owner} expected {what} of shape ({', '.join(parts)}), got {shape}")
    for e, s in zip(expected, shape):
        if isinstance(e, str):
            bound.setdefault(e, s)
    return bound


def check_floating(owner: str, what: str, tensor: torch.Tensor) -> None:
    # Integer images would otherwise fail deep inside the first convolution with a dtype mismatch.
    if not tensor.is_floating_point():
        raise ValueError(f"{owner} expected a floating-point {what}, got {tensor.dtype}; convert it with .float()")


def check_min_spatial(owner: str, tensor: torch.Tensor, minimum: int, config: str) -> None:
    # Below the minimum a pooling/conv stage would produce an empty map and PyTorch would fail inside.
    spatial = tuple(tensor.shape[2:])
    if min(spatial) < minimum:
        raise ValueError(f"{owner} needs every spatial dim >= {minimum} with {config}, got {spatial}")


def check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
