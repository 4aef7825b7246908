"""Networks from plain JSON configs, so a bundle and a registered model rebuild the same architecture.

Two spellings of one thing: the registry stores MONAI's ``{"_target_": "car_med.networks.X", **kwargs}``; a
bundle keeps its architectures as ``{"target": ..., **kwargs}`` *specs*, which MONAI's parser leaves as plain
data (a ``_target_`` dict would be instantiated), so the bundle can hand the very dict it built from to the
registry. Only ``nn.Module`` classes defined under ``car_med.`` can be built: a config travels with
registered models, and building arbitrary callables from it would let a model file run foreign code.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["ALLOWED_TARGET_PREFIX", "build_network", "check_network_config", "spec_to_target_config"]

ALLOWED_TARGET_PREFIX = "car_med."


def _check_plain_value(value: Any, where: str) -> None:
    # A string that MONAI's ConfigParser would evaluate ("$expr"), reference ("@id") or copy ("%file#id") is
    # refused: the config is rebuilt without a parser, so it would arrive as a literal string, and evaluating
    # "$" expressions from an artifact store would run arbitrary code.
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ValueError(
            f"network config {where} is the unresolved bundle expression {value!r}; pass resolved values "
            "(numbers, strings, lists), e.g. by giving the bundle's parsed values, not its raw config."
        )
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"network config {where} has a non-string key {key!r}.")
            _check_plain_value(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain_value(item, f"{where}[{index}]")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ValueError(
            f"network config {where} holds a {type(value).__name__} ({value!r}); only JSON values "
            "(numbers, strings, booleans, None, lists, dicts) can be stored with the model."
        )


def _locate_network_class(target: str) -> type[nn.Module]:
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIX):
        raise ValueError(
            f"network config _target_ must name a class under '{ALLOWED_TARGET_PREFIX}' (e.g. "
            f"'car_med.networks.SegNetCalibrationNet'), got {target!r}; other targets are refused so that "
            "loading a model from a registry cannot import arbitrary code."
        )
    parts = target.split(".")
    obj: Any = None
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            obj = None
        break
    if obj is None:
        raise ValueError(f"network config _target_ {target!r} was not found in the installed car_med.")
    # "car_med.some_module.torch.load" starts with the prefix but is not car-med code: check where it lives
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ValueError(f"network config _target_ {target!r} is not a torch.nn.Module class.")
    if not obj.__module__.startswith(ALLOWED_TARGET_PREFIX):
        raise ValueError(
            f"network config _target_ {target!r} resolves to {obj.__module__}.{obj.__qualname__}, which is "
            f"not defined under '{ALLOWED_TARGET_PREFIX}'."
        )
    return obj


def check_network_config(config: Any, what: str = "network") -> dict[str, Any]:
    """Validate a network config and return it as a JSON-ready dict.

    Args:
        config: ``{"_target_": "car_med....", **kwargs}``, or a ``functools.partial`` of a car_med network class
            (what a MONAI bundle gives for a component with ``"_mode_": "callable"``).
        what: name used in error messages.

    Raises:
        ValueError: the target is not a ``car_med`` ``nn.Module`` class, a key other than ``_target_`` starts
            with ``_``, or a value is not plain JSON (e.g. an unresolved ``"@ref"``).
    """
    func = getattr(config, "func", None)
    if func is not None and callable(func) and not isinstance(config, Mapping):
        if getattr(config, "args", ()):
            raise ValueError(f"{what} config: a functools.partial with positional arguments cannot be stored.")
        config = {"_target_": f"{func.__module__}.{func.__qualname__}", **dict(config.keywords)}
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise ValueError(
            f"{what} config must be a dict with a '_target_' key and the constructor kwargs, e.g. "
            "{'_target_': 'car_med.networks.SegNetCalibrationNet', 'in_channels': 1, 'out_channels': 2}; "
            f"got {config!r}."
        )
    special = [k for k in config if isinstance(k, str) and k.startswith("_") and k != "_target_"]
    if special:
        raise ValueError(
            f"{what} config keys {special} are bundle directives that cannot be stored with a model; "
            "give only '_target_' and the constructor kwargs."
        )
    _locate_network_class(config["_target_"])
    _check_plain_value(dict(config), what)
    # tuples become lists, as they will after the JSON round trip
    return json.loads(json.dumps(dict(config)))


def build_network(config: Mapping[str, Any], what: str = "network") -> nn.Module:
    """Instantiate a network from a config checked by :func:`check_network_config`, or from a bundle spec.

    Example::

        f = build_network({"_target_": "car_med.networks.SegNetCalibrationNet", "in_channels": 1,
                           "out_channels": 2, "channels": [8, 16], "convs_per_block": [1, 1]})
    """
    if isinstance(config, Mapping) and "target" in config and "_target_" not in config:
        config = spec_to_target_config(config)
    config = check_network_config(config, what)
    cls = _locate_network_class(config.pop("_target_"))
    try:
        return cls(**config)
    except TypeError as err:
        raise ValueError(f"{what} config does not fit {cls.__name__}: {err}") from err


def spec_to_target_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A bundle spec ``{"target": ..., **kwargs}`` in MONAI's ``{"_target_": ..., **kwargs}`` form."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("target"), str):
        raise ValueError(
            f"a network spec is a dict with 'target' (e.g. 'car_med.networks.NoiseInjectedUNet') and the "
            f"constructor's arguments, got {spec!r}."
        )
    return {"_target_": spec["target"], **{k: v for k, v in spec.items() if k != "target"}}
