"""The CAR LIDC model as an MLflow pyfunc: HU batch in, M coherent samples plus F's and G's maps out.

The logged model holds no pickled Python object. It is three files next to the ``MLmodel`` file:

- ``pyfunc_entry.py``: the models-from-code file (a copy of :mod:`car_med.registry.pyfunc_entry`), which only
  imports :class:`CARPyfuncModel` from the installed ``car_med`` and hands it to ``mlflow.models.set_model``;
- ``artifacts/car_weights.pt``: the state dicts of F and G (tensors only, read with ``weights_only=True``);
- ``artifacts/car_model.json``: how to rebuild F and G (MONAI-bundle style ``{"_target_": ..., kwargs}``; only
  ``car_med.*`` network classes are accepted) and the inference settings (HU window, noise, M, chunk size).

So loading a registered model runs ``car_med`` code and ``torch.load(weights_only=True)``, nothing from the
artifact store that could execute. ``car_med`` must be installed where the model is loaded or served.

Input and output of :meth:`CARPyfuncModel.predict` (the sample axis is dim 1, as everywhere in car-med):

- input: float32 CT intensities in Hounsfield units ``(B, 1, H, W)``; the model windows them to [0, 1] with
  :class:`car_med.data.lidc.ScaleLIDCIntensityd` (``"hu"`` kind, clipped), exactly as the training transforms;
- params: ``num_samples`` (M) and ``seed``: the noise comes from a CPU ``torch.Generator`` seeded with ``seed``,
  so the same batch and seed give the same samples on any device; ``noise_groups``, one id per row, makes the
  rows of a group (the slices of one nodule) share their noise, so sample m of the group is one 3D hypothesis;
  ``hypotheses`` (default false), ``min_iou`` and ``confidence`` ask for the samples grouped into distinct
  outlines (:func:`car_med.hypotheses.group_samples`), per noise group or per row;
- output: a dict of numpy arrays, ``samples`` uint8 ``(B, M, H, W)`` (class maps), ``mean`` float32
  ``(B, C, H, W)`` (Gbar), ``calibration`` float32 ``(B, C, H, W)`` (F's softmax) and ``entropy`` float32
  ``(B, H, W)`` (H(F(x)) in nats); with ``hypotheses`` true also ``hypotheses``, a list of plain-JSON dicts (see
  :meth:`CARPyfuncModel.predict`), which MLflow's scoring server returns as it is.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from torch import nn

from car_med.data.lidc import DEFAULT_HU_WINDOW, ScaleLIDCIntensityd
from car_med.hypotheses import DEFAULT_CONFIDENCE, DEFAULT_MIN_IOU, group_samples, hypotheses_json
from car_med.networks.factory import build_network, check_network_config
from car_med.sampling import CARSampler

__all__ = [
    "CONFIG_ARTIFACT",
    "FOREGROUND_CLASS",
    "PARAM_NAMES",
    "WEIGHTS_ARTIFACT",
    "CARPyfuncModel",
    "build_network",
    "car_model_signature",
    "check_network_config",
    "inference_settings",
    "load_networks_from_model_dir",
    "load_state_dict_strict",
]

#: artifact keys of the logged model (``context.artifacts[...]``) and the file names behind them
WEIGHTS_ARTIFACT = "car_weights"
CONFIG_ARTIFACT = "car_model"
WEIGHTS_FILE = "car_weights.pt"
CONFIG_FILE = "car_model.json"
#: version of the layout of ``car_model.json``; bump when a reader would misread an older file
CONFIG_FORMAT_VERSION = 1
#: only classes defined under this package may be rebuilt from a logged config
#: the class maps are returned as uint8
MAX_CLASSES = 256

_NETWORK_KEYS = ("calibration_network", "refinement_network")
#: the params :meth:`CARPyfuncModel.predict` reads, in signature order; called directly it refuses any other name,
#: and MLflow drops a name that is not in the model's stored signature (with a warning)
PARAM_NAMES = ("num_samples", "seed", "noise_groups", "hypotheses", "min_iou", "confidence")
#: the class whose masks ``hypotheses`` groups: the lesion of a two-class (background, lesion) model
FOREGROUND_CLASS = 1

_logger = logging.getLogger(__name__)


def car_model_signature(num_classes: int = -1, default_num_samples: int = 16, default_seed: int = 0) -> ModelSignature:
    """The signature of the CAR pyfunc model.

    Args:
        num_classes: C of the ``mean`` and ``calibration`` outputs; ``-1`` leaves it open.
        default_num_samples: default of the ``num_samples`` param (M).
        default_seed: default of the ``seed`` param.

    Returns:
        a signature with one unnamed float32 tensor input ``(-1, 1, -1, -1)`` (HU), the named tensor outputs
        ``samples`` (uint8), ``mean``, ``calibration`` and ``entropy`` (float32), and the params (:data:`PARAM_NAMES`):

        - ``num_samples`` (integer) and ``seed`` (long);
        - ``noise_groups`` (a list of longs, default empty): one group id per input row; rows with one id share
          their M noise vectors, e.g. the slices of one nodule, so sample m of the group is one 3D hypothesis;
        - ``hypotheses`` (boolean, default false): also return the samples grouped into hypotheses;
        - ``min_iou`` (double, default :data:`car_med.hypotheses.DEFAULT_MIN_IOU`) and ``confidence`` (double,
          default :data:`car_med.hypotheses.DEFAULT_CONFIDENCE`): the grouping's IoU threshold and the confidence
          of each probability's Wilson interval.

        The ``hypotheses`` output (a list of dicts, present only on request) is not in the output schema: MLflow's
        tensor schemas cannot describe it and a schema may not mix tensors and columns. The output schema is not
        enforced, so the scoring server returns it all the same.

    Example::

        sig = car_model_signature(num_classes=2)
        [p.name for p in sig.params.params]
        # ['num_samples', 'seed', 'noise_groups', 'hypotheses', 'min_iou', 'confidence']
    """
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))])
    outputs = Schema(
        [
            TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1), "samples"),
            TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "mean"),
            TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "calibration"),
            TensorSpec(np.dtype(np.float32), (-1, -1, -1), "entropy"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("num_samples", "integer", int(default_num_samples)),
            ParamSpec("seed", "long", int(default_seed)),
            ParamSpec("noise_groups", "long", [], shape=(-1,)),
            ParamSpec("hypotheses", "boolean", False),
            ParamSpec("min_iou", "double", float(DEFAULT_MIN_IOU)),
            ParamSpec("confidence", "double", float(DEFAULT_CONFIDENCE)),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def load_state_dict_strict(network: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """``network.load_state_dict(state, strict=True)``, failing with a ``ValueError`` that names the source."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the {what} weights in {source} do not fit the network rebuilt from its config "
            f"({type(network).__name__}); the config and the weights must come from the same model.\n{err}"
        ) from err


def load_networks_from_model_dir(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """Rebuild F and G of a logged CAR model from its local model directory.

    Args:
        model_dir: the MLflow model directory (the one holding ``MLmodel``), e.g. from
            ``mlflow.artifacts.download_artifacts("models:/car-lidc/1")``.
        device: where to put the networks.

    Returns:
        ``(calibration_network, refinement_network, config)``, the networks in eval mode and the content of
        ``car_model.json`` (``inference`` holds ``hu_window``, ``noise_dim``, ``noise_std``, ``num_classes``,
        ``default_num_samples``, ``max_batch``, ``max_num_samples`` and ``min_component_size``, which models
        saved before it existed lack; ``extra_metadata`` what the trainer added).

    Raises:
        FileNotFoundError: the directory lacks the weights or the config file.
        ValueError: the config names a target outside ``car_med``, or the weights do not fit.
    """
    model_dir = Path(model_dir)
    try:
        flavor = mlflow.models.Model.load(str(model_dir)).flavors.get("python_function", {})
        artifacts = {name: model_dir / entry["path"] for name, entry in flavor.get("artifacts", {}).items()}
    except (OSError, MlflowException):
        artifacts = {}  # a bare directory holding artifacts/ with the two files works too
    config_path = artifacts.get(CONFIG_ARTIFACT, model_dir / "artifacts" / CONFIG_FILE)
    weights_path = artifacts.get(WEIGHTS_ARTIFACT, model_dir / "artifacts" / WEIGHTS_FILE)
    return _load_networks(config_path, weights_path, device)


def _load_networks(
    config_path: str | Path, weights_path: str | Path, device: str | torch.device
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    config_path, weights_path = Path(config_path), Path(weights_path)
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"CAR model file {path} is missing; is this a model logged by car_med.registry?")
    config = json.loads(config_path.read_text())
    if config.get("format_version") != CONFIG_FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {config.get('format_version')!r}; this car_med reads "
            f"{CONFIG_FORMAT_VERSION}. Install the car_med version that logged the model "
            f"({config.get('car_med_version')!r})."
        )
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    networks = []
    for key in _NETWORK_KEYS:
        if key not in config or key not in state:
            raise ValueError(f"{config_path} or {weights_path} has no '{key}' entry.")
        network = build_network(config[key], key)
        load_state_dict_strict(network, state[key], key, str(weights_path))
        networks.append(network.to(device).eval())
    return networks[0], networks[1], config


def _resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class _PredictParams:
    """The checked scalar params of one ``predict`` call (``noise_groups`` is checked against the batch)."""

    num_samples: int
    seed: int
    hypotheses: bool
    min_iou: float
    confidence: float


def _stale_signature_params(model_dir: Path) -> tuple[list[str], str]:
    """The :data:`PARAM_NAMES` missing from the signature stored in ``model_dir`` (none when it cannot be read),
    and the URI that ``mlflow.models.set_signature`` takes for the model: ``models:/<model_id>`` or the folder."""
    try:
        model = mlflow.models.Model.load(str(model_dir))
    except (OSError, MlflowException):
        return [], str(model_dir)
    signature = model.signature
    stored = set() if signature is None or signature.params is None else {p.name for p in signature.params.params}
    model_id = getattr(model, "model_id", None)
    return [name for name in PARAM_NAMES if name not in stored], f"models:/{model_id}" if model_id else str(model_dir)


class CARPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc model of a trained CAR model: HU images in, M samples and F's and G's maps out.

    It is logged as models-from-code (:mod:`car_med.registry.pyfunc_entry`); ``load_context`` rebuilds F and G
    from the model's artifacts. The model config (``mlflow.pyfunc.load_model(uri, model_config=...)``) may set
    ``device``: ``"auto"`` (default, CUDA when available), ``"cpu"``, ``"cuda:0"``, ...

    Example::

        model = mlflow.pyfunc.load_model("models:/car-lidc/latest")
        out = model.predict(hu.astype(np.float32), params={"num_samples": 16, "seed": 0})
        out["samples"].shape  # (B, 16, H, W), uint8
    """

    def __init__(self) -> None:
        # models-from-code instantiates this at logging time too: keep it cheap, load in load_context
        self.sampler: CARSampler | None = None
        self.settings: dict[str, Any] = {}
        self.device = torch.device("cpu")

    def load_context(self, context) -> None:
        device = _resolve_device((context.model_config or {}).get("device"))
        f, g, config = _load_networks(
            context.artifacts[CONFIG_ARTIFACT], context.artifacts[WEIGHTS_ARTIFACT], device=device
        )
        self._setup(f, g, config["inference"], device)
        # the code is the installed car_med, but the signature is the one stored when the model was saved: MLflow
        # drops every param it does not list before predict sees it, so say so once, where the server logs it
        model_dir = Path(context.artifacts[CONFIG_ARTIFACT]).parents[1]
        missing, model_uri = _stale_signature_params(model_dir)
        if missing:
            _logger.warning(
                "The CAR model at %s was saved with a signature that lacks the params %s: MLflow drops them from "
                "every request ('Unrecognized params ... are ignored'), so e.g. params={'hypotheses': true} returns "
                "no hypotheses. Give the model the current signature with mlflow.models.set_signature('%s', "
                "car_med.registry.car_model_signature(num_classes=%d, default_num_samples=%d)), or register it again.",
                model_dir,
                missing,
                model_uri,
                int(self.settings["num_classes"]),
                int(self.settings["default_num_samples"]),
            )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, device: str | None = "cpu") -> CARPyfuncModel:
        """The model of a local model directory, ready to ``predict(None, x, params)`` without MLflow's wrapper."""
        model = cls()
        device = _resolve_device(device)
        f, g, config = load_networks_from_model_dir(model_dir, device)
        model._setup(f, g, config["inference"], device)
        return model

    def _setup(self, f: nn.Module, g: nn.Module, settings: Mapping[str, Any], device: torch.device) -> None:
        self.settings = dict(settings)
        self.device = device
        self.scale = ScaleLIDCIntensityd(
            keys="image", hu_window=self.settings.get("hu_window", DEFAULT_HU_WINDOW), clip=True
        )
        self.sampler = CARSampler(
            f,
            g,
            num_samples=int(self.settings["default_num_samples"]),
            noise_dim=int(self.settings["noise_dim"]),
            max_batch=int(self.settings["max_batch"]),
            return_probs=False,
            noise_std=float(self.settings["noise_std"]),
            # models registered before the option existed sample G's plain argmax
            min_component_size=int(self.settings.get("min_component_size", 0)),
        )

    def _read_params(self, params: Mapping[str, Any] | None) -> _PredictParams:
        params = dict(params or {})
        unknown = sorted(set(params) - set(PARAM_NAMES))
        if unknown:
            names = ", ".join(repr(name) for name in PARAM_NAMES)
            raise ValueError(f"CAR model params are {names}; got unknown {unknown}.")
        values = {}
        defaults = {"num_samples": self.settings["default_num_samples"], "seed": 0}
        for name, default in defaults.items():
            value = params.get(name, default)
            value = default if value is None else value
            if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
                raise ValueError(f"CAR model param '{name}' must be an integer, got {value!r}.")
            values[name] = int(value)
        num_samples, seed = values["num_samples"], values["seed"]
        max_num_samples = int(self.settings.get("max_num_samples", num_samples))
        if not 1 <= num_samples <= max_num_samples:
            raise ValueError(
                f"CAR model param 'num_samples' must be in [1, {max_num_samples}], got {num_samples} (the upper "
                "bound is max_num_samples, set when the model was registered)."
            )
        if not 0 <= seed < 2**63:
            raise ValueError(f"CAR model param 'seed' must be in [0, 2**63), got {seed}.")
        hypotheses = params.get("hypotheses")
        hypotheses = False if hypotheses is None else hypotheses
        if not isinstance(hypotheses, (bool, np.bool_)):
            raise ValueError(f"CAR model param 'hypotheses' must be a boolean (JSON true/false), got {hypotheses!r}.")
        min_iou = self._float_param(params, "min_iou", DEFAULT_MIN_IOU)
        if not 0 < min_iou <= 1:
            raise ValueError(
                f"CAR model param 'min_iou' must lie in (0, 1] (every two samples of one hypothesis overlap with at "
                f"least this IoU), got {min_iou}."
            )
        confidence = self._float_param(params, "confidence", DEFAULT_CONFIDENCE)
        if not 0 < confidence < 1:
            raise ValueError(
                f"CAR model param 'confidence' must lie in (0, 1) (of each probability's Wilson interval), got "
                f"{confidence}."
            )
        num_classes = int(self.settings.get("num_classes", 2))
        if hypotheses and num_classes != 2:
            raise ValueError(
                f"CAR model param 'hypotheses' groups the lesion masks (class {FOREGROUND_CLASS}) of a two-class "
                f"(background, lesion) model; this model has {num_classes} classes. Group its 'samples' per class "
                "yourself with car_med.hypotheses.group_samples(samples == c)."
            )
        return _PredictParams(
            num_samples=num_samples, seed=seed, hypotheses=bool(hypotheses), min_iou=min_iou, confidence=confidence
        )

    @staticmethod
    def _float_param(params: Mapping[str, Any], name: str, default: float) -> float:
        value = params.get(name)
        value = default if value is None else value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"CAR model param '{name}' must be a number, got {value!r}.")
        return float(value)

    @staticmethod
    def _noise_groups(params: Mapping[str, Any] | None, rows: int) -> np.ndarray | None:
        groups = (params or {}).get("noise_groups")
        if groups is None or len(groups) == 0:
            return None
        groups = np.asarray(groups)
        if groups.ndim != 1 or len(groups) != rows or not np.issubdtype(groups.dtype, np.integer):
            raise ValueError(
                f"CAR model param 'noise_groups' must list one integer group id per input row ({rows}), got "
                f"{groups.tolist()!r}."
            )
        return groups

    @staticmethod
    def _as_hu_batch(model_input: Any) -> torch.Tensor:
        if isinstance(model_input, torch.Tensor):
            if model_input.dtype != torch.float32:
                raise ValueError(
                    f"CAR model input must be float32 HU, got a torch tensor of dtype {model_input.dtype}; "
                    "cast it with x.float()."
                )
            x = model_input.detach().cpu()
        elif isinstance(model_input, np.ndarray):
            if model_input.dtype != np.float32:
                raise ValueError(
                    f"CAR model input must be float32 HU, got a numpy array of dtype {model_input.dtype}; "
                    "cast it with x.astype(np.float32)."
                )
            x = torch.from_numpy(np.ascontiguousarray(model_input))
        elif isinstance(model_input, (list, tuple)):
            try:
                x = torch.from_numpy(np.asarray(model_input, dtype=np.float32))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"CAR model input list must be a rectangular nested list of numbers (B, 1, H, W): {err}"
                ) from err
        else:
            raise ValueError(
                "CAR model input must be a float32 numpy array, torch tensor or nested list of shape "
                f"(B, 1, H, W) in HU, got {type(model_input).__name__}."
            )
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[0] < 1:
            raise ValueError(
                f"CAR model input must have shape (B, 1, H, W) (a batch of single-channel CT slices in HU), "
                f"got {tuple(x.shape)}; add the axes with x[:, None] or x[None, None] as needed."
            )
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            # the HU window would clip +-Inf to 0 or 1 and NaN would become an empty mask: refuse both
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"CAR model input batch index {bad[:5]}{' ...' if len(bad) > 5 else ''} holds NaN or Inf HU "
                "values; fix or drop those slices before sampling."
            )
        return x

    @staticmethod
    def _group_hypotheses(samples: np.ndarray, groups: np.ndarray | None, options: _PredictParams) -> list[dict]:
        """The samples of each noise group (one 3D volume, its rows in input order) or each row, as hypotheses."""
        foreground = samples == FOREGROUND_CLASS  # (B, M, H, W)
        if groups is None:
            units = [(None, [row]) for row in range(len(samples))]
        else:
            _, first = np.unique(groups, return_index=True)
            ids = groups[np.sort(first)]  # in order of first appearance, as the noise is drawn
            units = [(int(group), np.flatnonzero(groups == group).tolist()) for group in ids]
        entries = []
        for group, rows in units:
            # a group's rows are the slices of one volume: sample m of the group is the stack of its rows' sample m
            masks = foreground[rows[0]] if group is None else np.moveaxis(foreground[rows], 0, 1)
            hypotheses = group_samples(masks, min_iou=options.min_iou, confidence=options.confidence)
            entries.append(
                {
                    "group": group,
                    "rows": rows,
                    "num_samples": options.num_samples,
                    "min_iou": options.min_iou,
                    "confidence": options.confidence,
                    "hypotheses": hypotheses_json(hypotheses),
                }
            )
        return entries

    # the np.ndarray hint tells MLflow not to wrap predict with its own type-hint validation (the signature
    # already checks the input); called directly, a torch tensor or a nested list works too
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sample the model, and on request group the samples into hypotheses.

        Args:
            context: MLflow's context (unused here; ``None`` when called directly).
            model_input: float32 HU ``(B, 1, H, W)``: a numpy array, a torch tensor or a nested list.
            params: any of :data:`PARAM_NAMES` (another name is refused):

                - ``num_samples``: M, default set at registration;
                - ``seed``: default 0;
                - ``noise_groups``: default none, every row draws its own noise; else one group id per row, and the
                  rows of a group, e.g. the slices of one nodule, share their M noise vectors;
                - ``hypotheses``: default false; true adds the ``hypotheses`` output;
                - ``min_iou``: in (0, 1], default :data:`car_med.hypotheses.DEFAULT_MIN_IOU`: every two samples of
                  one hypothesis overlap with at least this IoU;
                - ``confidence``: in (0, 1), default :data:`car_med.hypotheses.DEFAULT_CONFIDENCE`, of each
                  probability's Wilson interval.

        Returns:
            a dict:

            - ``samples``: uint8 class maps ``(B, M, H, W)``;
            - ``mean``: float32 Gbar ``(B, C, H, W)``, the mean of G's softmax over the M samples;
            - ``calibration``: float32 F's softmax ``(B, C, H, W)``;
            - ``entropy``: float32 H(F(x)) in nats ``(B, H, W)``;
            - ``hypotheses`` (only with ``hypotheses`` true): a list of plain-JSON dicts, one per noise group in
              order of first appearance, or one per row without ``noise_groups``. The masks grouped are the lesion
              (class :data:`FOREGROUND_CLASS`) of ``samples``; a group's rows, in input order, are the slices of one
              volume, so its hypotheses are 3D outlines. Each dict holds ``group`` (the id; ``None`` per row),
              ``rows`` (the input rows), ``num_samples``, ``min_iou``, ``confidence`` and ``hypotheses``: the
              hypotheses most probable first, each as :func:`car_med.hypotheses.hypotheses_json` writes it
              (``rank``, ``label``, ``no_lesion``, ``probability``, ``interval`` ``[low, high]``, ``count``,
              ``members`` and ``representative``: sample indices m into ``samples[row, m]``, ``mean_iou``,
              ``voxels``, the representative's lesion pixels over the group's rows; ``volume_mm3`` and
              ``area_mm2`` are ``None``, the model knows no spacing). Their probabilities sum to 1 per group.

        Raises:
            ValueError: wrong type, dtype, shape or non-finite values, unknown params, params out of range, or
                ``hypotheses`` asked of a model with more than two classes.

        Example::

            out = model.predict(hu, params={"noise_groups": [4, 4, 4, 9], "hypotheses": True})
            best = out["hypotheses"][0]["hypotheses"][0]  # nodule 4's most probable outline
            out["samples"][0, best["representative"]]     # its first slice
        """
        if self.sampler is None:
            raise RuntimeError("CARPyfuncModel has no networks: load it with mlflow.pyfunc.load_model.")
        options = self._read_params(params)
        hu = self._as_hu_batch(model_input)
        image = self.scale({"image": hu})["image"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        generator = torch.Generator().manual_seed(options.seed)
        groups = self._noise_groups(params, hu.shape[0])
        if groups is None:
            out = self.sampler(image.to(self.device), num_samples=options.num_samples, generator=generator)
        else:
            # one draw of (groups, M) noise vectors, in order of first appearance; a group's rows share theirs
            _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
            order = np.argsort(first)
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            # group by group, so the first group gets exactly what its first row alone gets with this seed
            cpu = torch.device("cpu")
            drawn = torch.cat(
                [self.sampler.draw_noise(1, options.num_samples, cpu, generator) for _ in range(len(order))]
            )
            noise = drawn[torch.as_tensor(rank[inverse].reshape(-1))]
            out = self.sampler(image.to(self.device), noise=noise.to(self.device))
        result = {
            "samples": out.samples.to(torch.uint8).cpu().numpy(),
            "mean": out.mean.float().cpu().numpy(),
            "calibration": out.calibration.float().cpu().numpy(),
            "entropy": out.entropy.float().cpu().numpy(),
        }
        if options.hypotheses:
            result["hypotheses"] = self._group_hypotheses(result["samples"], groups, options)
        return result


def _finite_float(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}.")
    return value


def inference_settings(
    num_classes: int,
    hu_window: Sequence[float],
    noise_dim: int,
    noise_std: float,
    default_num_samples: int,
    max_batch: int,
    max_num_samples: int,
    min_component_size: int = 0,
) -> dict[str, Any]:
    """The ``inference`` block of ``car_model.json``, validated."""
    low, high = (_finite_float(v, "hu_window") for v in hu_window)
    if not low < high:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {tuple(hu_window)}.")
    if not 2 <= int(num_classes) <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}] (samples are uint8), got {num_classes}.")
    for name, value in (("noise_dim", noise_dim), ("max_batch", max_batch), ("max_num_samples", max_num_samples)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if not 1 <= int(default_num_samples) <= int(max_num_samples):
        raise ValueError(
            f"default_num_samples must be in [1, max_num_samples={max_num_samples}], got {default_num_samples}."
        )
    if _finite_float(noise_std, "noise_std") <= 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std}.")
    if int(min_component_size) < 0:
        raise ValueError(f"min_component_size must be >= 0 pixels, got {min_component_size}.")
    return {
        "hu_window": [low, high],
        "num_classes": int(num_classes),
        "noise_dim": int(noise_dim),
        "noise_std": float(noise_std),
        "default_num_samples": int(default_num_samples),
        "max_batch": int(max_batch),
        "max_num_samples": int(max_num_samples),
        "min_component_size": int(min_component_size),
    }
