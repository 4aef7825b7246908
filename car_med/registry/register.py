"""Log a trained CAR model as an MLflow models-from-code pyfunc and register it.

:func:`register_car_model` writes F's and G's state dicts (``torch.save``, read back with ``weights_only=True``)
and their MONAI-bundle style configs, logs them with :mod:`car_med.registry.pyfunc_entry` as the model code
(``python_model=<file path>``: nothing is cloudpickled), and creates a new version of the registered model.
:func:`save_car_model` writes the same model directory locally, without a tracking server.

Before anything is logged, F and G are rebuilt from their configs and the given weights are loaded into them
strictly, so a config that does not describe the trained networks fails here, at the end of training, and not
when someone loads the model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import monai
import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.models.model import ModelInfo
from mlflow.tracking._tracking_service import utils as _tracking_utils
from torch import nn

import car_med
from car_med.data.lidc import DEFAULT_HU_WINDOW
from car_med.registry.model import (
    CONFIG_ARTIFACT,
    CONFIG_FILE,
    CONFIG_FORMAT_VERSION,
    WEIGHTS_ARTIFACT,
    WEIGHTS_FILE,
    build_network,
    car_model_signature,
    check_network_config,
    inference_settings,
    load_state_dict_strict,
)

__all__ = ["CARModelOptions", "MODEL_CODE_PATH", "default_pip_requirements", "register_car_model", "save_car_model"]

#: the models-from-code file handed to MLflow as ``python_model``
MODEL_CODE_PATH = Path(__file__).with_name("pyfunc_entry.py")


def default_pip_requirements() -> list[str]:
    """What the logged model needs. ``car-med`` is not on PyPI: serve with ``--env-manager local`` where it is
    installed, or pass ``pip_requirements`` naming where to get it (e.g. a wheel path or a git URL)."""
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return [
        f"car-med=={car_med.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"monai=={monai.__version__}",
        f"torch>={torch_version}",
        "numpy",
    ]


def _unwrap(network: nn.Module, what: str) -> nn.Module:
    if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        network = network.module
    if not isinstance(network, nn.Module):
        raise ValueError(f"{what} must be a torch.nn.Module, got {type(network).__name__}.")
    return network


def _to_builtin(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)) and np.size(value) == 1:
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def _jsonable(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``value`` as plain JSON; NaN and Inf become ``None`` (a NaN validation score must not fail registration)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}.")
    try:
        plain = json.loads(json.dumps(dict(value), default=_to_builtin))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must hold JSON values (numbers, strings, lists, dicts; numpy/torch values and paths are "
            f"converted): {err}"
        ) from err
    return _finite_or_none(plain)


def _num_classes(f: nn.Module, g: nn.Module) -> int:
    found = {
        name: int(value)
        for name, value in (
            ("F.out_channels", getattr(f, "out_channels", None)),
            ("G.num_classes", getattr(g, "num_classes", None)),
        )
        if value is not None
    }
    if not found:
        raise ValueError("cannot tell the number of classes: F has no `out_channels` and G no `num_classes`.")
    if len(set(found.values())) > 1:
        raise ValueError(f"F and G disagree on the number of classes: {found}.")
    return next(iter(found.values()))


def _check_networks(f: nn.Module, g: nn.Module, noise_dim: int) -> int:
    for name, value in (
        ("F.in_channels", getattr(f, "in_channels", None)),
        ("G.image_channels", getattr(g, "image_channels", None)),
    ):
        if value is not None and int(value) != 1:
            raise ValueError(f"the CAR LIDC model takes single-channel CT slices (B, 1, H, W), but {name} is {value}.")
    g_noise_dim = getattr(g, "noise_dim", None)
    if g_noise_dim is not None and int(g_noise_dim) != int(noise_dim):
        raise ValueError(f"noise_dim={noise_dim} does not match the refinement network's noise_dim={g_noise_dim}.")
    return _num_classes(f, g)


def _write_model_files(
    directory: Path,
    calibration_network: nn.Module,
    refinement_network: nn.Module,
    calibration_network_config: Any,
    refinement_network_config: Any,
    settings: dict[str, Any],
    extra_metadata: dict[str, Any],
) -> dict[str, str]:
    """Check the configs against the networks, write the weights and config files, return MLflow's artifacts."""
    configs = {
        "calibration_network": check_network_config(calibration_network_config, "calibration_network"),
        "refinement_network": check_network_config(refinement_network_config, "refinement_network"),
    }
    states = {}
    for key, network in (("calibration_network", calibration_network), ("refinement_network", refinement_network)):
        state = {name: tensor.detach().cpu().clone() for name, tensor in network.state_dict().items()}
        load_state_dict_strict(build_network(configs[key], key), state, key, f"the {key} passed to register_car_model")
        states[key] = state
    weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    torch.save(states, weights_path)
    config = {
        "format_version": CONFIG_FORMAT_VERSION,
        "car_med_version": car_med.__version__,
        **configs,
        "inference": settings,
        "extra_metadata": extra_metadata,
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {WEIGHTS_ARTIFACT: str(weights_path), CONFIG_ARTIFACT: str(config_path)}


def _model_metadata(settings: dict[str, Any], extra_metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "car_med_version": car_med.__version__,
        "input": "float32 CT in Hounsfield units (B, 1, H, W); windowed to [0, 1] inside the model",
        **settings,
        "extra_metadata": extra_metadata,
    }


def _prepare(
    directory: Path,
    calibration_network: nn.Module,
    refinement_network: nn.Module,
    calibration_network_config: Any,
    refinement_network_config: Any,
    extra_metadata: Mapping[str, Any] | None,
    pip_requirements: Sequence[str] | None,
    **inference: Any,
) -> dict[str, Any]:
    """The keyword arguments shared by ``mlflow.pyfunc.log_model`` and ``save_model``.

    ``inference`` holds the model options of :func:`~car_med.registry.model.inference_settings` (``hu_window``,
    ``noise_dim``, ...), the ``inference`` block of ``car_model.json``.
    """
    f = _unwrap(calibration_network, "calibration_network")
    g = _unwrap(refinement_network, "refinement_network")
    num_classes = _check_networks(f, g, inference["noise_dim"])
    settings = inference_settings(num_classes, **inference)
    default_num_samples = settings["default_num_samples"]
    extra = _jsonable(extra_metadata, "extra_metadata")
    artifacts = _write_model_files(
        directory, f, g, calibration_network_config, refinement_network_config, settings, extra
    )
    return dict(
        python_model=str(MODEL_CODE_PATH),
        artifacts=artifacts,
        signature=car_model_signature(num_classes, default_num_samples),
        metadata=_model_metadata(settings, extra),
        model_config={"device": "auto"},
        pip_requirements=list(pip_requirements) if pip_requirements is not None else default_pip_requirements(),
    )


@contextmanager
def _no_input_example_warning() -> Iterator[None]:
    # The signature fixes the input; an input example would need an image size that fits every F and G.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        yield


@contextmanager
def using_tracking_uri(uri: str | None) -> Iterator[None]:
    """Use ``uri`` for the duration, then put back the tracking URI (and its env var) as they were."""
    if uri is None:
        yield
        return
    # MLflow keeps an explicitly set URI apart from the MLFLOW_TRACKING_URI fallback; put back exactly that
    # (``None``: not set, so the env var or the default applies again), not the resolved URI.
    previous = getattr(_tracking_utils, "_tracking_uri", mlflow.get_tracking_uri())
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        # set_tracking_uri also exports (or unsets) MLFLOW_TRACKING_URI for subprocesses: restore the user's
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextmanager
def _run_to_log_into(
    run_id: str | None, experiment_name: str, artifact_location: str | None, model_name: str
) -> Iterator[str]:
    """Make the run the model is logged into the active MLflow run, and leave runs as they were afterwards.

    The model is logged through MLflow's fluent API, which files the LoggedModel under the active run's
    experiment; so the run is activated here rather than passed by id.
    """
    active = mlflow.active_run()
    if active is not None and run_id is not None and active.info.run_id == run_id:
        yield run_id  # the caller's own active run: use it, and leave it open
        return
    client = mlflow.MlflowClient()
    prior_status = None
    if run_id is not None:
        prior_status = client.get_run(run_id).info.status
        run = mlflow.start_run(run_id=run_id, nested=active is not None)
    else:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            experiment_id = client.create_experiment(experiment_name, artifact_location=artifact_location)
        elif experiment.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {experiment_name!r} is deleted; restore it or pass another experiment_name."
            )
        else:
            experiment_id = experiment.experiment_id
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=f"register-{model_name}", nested=active is not None
        )
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        yield run.info.run_id
    except BaseException:
        status = RunStatus.to_string(RunStatus.FAILED)
        raise
    finally:
        # a resumed run (e.g. the training run, maybe still RUNNING in MONAI's MLFlowHandler) keeps its status
        mlflow.end_run(status=prior_status or status)


@dataclass(frozen=True)
class CARModelOptions:
    """The model options stored with a CAR model, built once by :func:`save_car_model` or
    :func:`register_car_model` from their own parameters (documented there)."""

    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    noise_dim: int = 8
    noise_std: float = 1.0
    default_num_samples: int = 16
    max_batch: int = 8
    extra_metadata: Mapping[str, Any] | None = None
    max_num_samples: int = 1024
    pip_requirements: Sequence[str] | None = None
    min_component_size: int = 0


@contextmanager
def _model_files(
    calibration_network: nn.Module,
    refinement_network: nn.Module,
    calibration_network_config: Mapping[str, Any],
    refinement_network_config: Mapping[str, Any],
    options: CARModelOptions,
    work_dir: str | Path | None,
) -> Iterator[dict[str, Any]]:
    """Write F's and G's weights and configs to a temporary folder in ``work_dir`` and yield mlflow's keyword
    arguments."""
    with tempfile.TemporaryDirectory(prefix="car-model-", dir=work_dir) as tmp:
        yield _prepare(
            Path(tmp),
            calibration_network,
            refinement_network,
            calibration_network_config,
            refinement_network_config,
            extra_metadata=options.extra_metadata,
            pip_requirements=options.pip_requirements,
            hu_window=options.hu_window,
            noise_dim=options.noise_dim,
            noise_std=options.noise_std,
            default_num_samples=options.default_num_samples,
            max_batch=options.max_batch,
            max_num_samples=options.max_num_samples,
            min_component_size=options.min_component_size,
        )


def save_car_model(
    path: str | Path,
    calibration_network: nn.Module,
    refinement_network: nn.Module,
    calibration_network_config: Mapping[str, Any],
    refinement_network_config: Mapping[str, Any],
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW,
    noise_dim: int = 8,
    noise_std: float = 1.0,
    default_num_samples: int = 16,
    max_batch: int = 8,
    extra_metadata: Mapping[str, Any] | None = None,
    work_dir: str | Path | None = None,
    max_num_samples: int = 1024,
    pip_requirements: Sequence[str] | None = None,
    min_component_size: int = 0,
) -> None:
    """Write the CAR pyfunc model directory to ``path`` (must not exist) without a tracking server.

    Load it with ``mlflow.pyfunc.load_model(path)``. Its parameters after the networks' configs are the model
    options, which :func:`register_car_model` takes too.

    Args:
        path: the model directory to create.
        calibration_network: F, returning logits ``(B, C, H, W)`` (a ``DataParallel``/DDP wrapper is unwrapped).
        refinement_network: G, called ``G(image, calibration_probs, noise)``.
        calibration_network_config: ``{"_target_": "car_med.networks.SegNetCalibrationNet", **kwargs}`` that
            rebuilds F (only ``car_med.*`` classes; values must be resolved, not ``"@ref"``), or a
            ``functools.partial`` of the class, as a bundle component with ``"_mode_": "callable"`` gives.
        refinement_network_config: the same for G.
        hu_window: ``(low, high)`` HU window of the training transforms (``ScaleLIDCIntensityd``).
        noise_dim: length of G's noise vector; must equal ``refinement_network.noise_dim``.
        noise_std: std of the noise G was trained with.
        default_num_samples: M when the caller gives no ``num_samples`` param.
        max_batch: folded image-sample rows per G forward pass (bounds memory for any M).
        extra_metadata: JSON-able facts to keep with the model (dataset source, split seed, metrics, ...),
            stored in the MLmodel metadata (``extra_metadata``) and in ``car_model.json``.
        work_dir: parent folder of the temporary weight and config files; default the system temp dir.
        max_num_samples: the largest ``num_samples`` a caller may ask for (guards a served model's memory).
        pip_requirements: requirements recorded with the model; default :func:`default_pip_requirements`.
        min_component_size: the sampler's (:class:`~car_med.sampling.CARSampler`): foreground components of a
            sample under this many pixels become background; 0 (default) serves G's plain argmax.

    Raises:
        ValueError: as :func:`register_car_model`.
    """
    options = CARModelOptions(
        hu_window=hu_window,
        noise_dim=noise_dim,
        noise_std=noise_std,
        default_num_samples=default_num_samples,
        max_batch=max_batch,
        extra_metadata=extra_metadata,
        max_num_samples=max_num_samples,
        pip_requirements=pip_requirements,
        min_component_size=min_component_size,
    )
    networks = (calibration_network, refinement_network, calibration_network_config, refinement_network_config)
    with _model_files(*networks, options, work_dir) as kwargs, _no_input_example_warning():
        mlflow.pyfunc.save_model(path=str(path), **kwargs)


def register_car_model(
    calibration_network: nn.Module,
    refinement_network: nn.Module,
    calibration_network_config: Mapping[str, Any],
    refinement_network_config: Mapping[str, Any],
    model_name: str = "car-lidc",
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment_name: str = "car_lidc",
    *,
    artifact_location: str | None = None,
    await_registration_for: int = 300,
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW,
    noise_dim: int = 8,
    noise_std: float = 1.0,
    default_num_samples: int = 16,
    max_batch: int = 8,
    extra_metadata: Mapping[str, Any] | None = None,
    work_dir: str | Path | None = None,
    max_num_samples: int = 1024,
    pip_requirements: Sequence[str] | None = None,
    min_component_size: int = 0,
) -> ModelInfo:
    """Log F and G as the CAR pyfunc model (models-from-code) and register a new version of ``model_name``.

    Args:
        calibration_network: F (see :func:`save_car_model` for the networks and their configs).
        refinement_network: G.
        calibration_network_config: the config that rebuilds F.
        refinement_network_config: the config that rebuilds G.
        model_name: registered model name; each call adds a version.
        tracking_uri: tracking (and, unless set apart, registry) URI; ``None`` uses the current one.
        run_id: log into this existing run (e.g. the training run); it keeps its status. ``None`` starts a new
            run in ``experiment_name`` (nested if a run is active).
        experiment_name: experiment of the new run; created (at ``artifact_location``) if missing.
        artifact_location: artifact root of ``experiment_name`` if it has to be created (a SQLite store would
            otherwise default to ``./mlruns`` in the working directory).
        await_registration_for: seconds to wait for the new version to be READY.
        hu_window, noise_dim, noise_std, default_num_samples, max_batch, extra_metadata, work_dir,
            max_num_samples, pip_requirements, min_component_size: the model options, as :func:`save_car_model`.

    Returns:
        MLflow's ``ModelInfo``: ``registered_model_version`` (the new version number, an int), ``model_uri``
        (``models:/<model id>``), ``run_id``, ``metadata``, ``signature``. The registered model's URI is
        ``f"models:/{model_name}/{info.registered_model_version}"``.

    Example::

        info = register_car_model(f, g, f_config, g_config, tracking_uri="sqlite:////data/mlflow.db")
        model = mlflow.pyfunc.load_model(f"models:/car-lidc/{info.registered_model_version}")

    Raises:
        ValueError: a config names a target outside ``car_med`` or does not rebuild the given network, the
            networks disagree with ``noise_dim`` or are not single-channel, or a setting is out of range.
    """
    options = CARModelOptions(
        hu_window=hu_window,
        noise_dim=noise_dim,
        noise_std=noise_std,
        default_num_samples=default_num_samples,
        max_batch=max_batch,
        extra_metadata=extra_metadata,
        max_num_samples=max_num_samples,
        pip_requirements=pip_requirements,
        min_component_size=min_component_size,
    )
    networks = (calibration_network, refinement_network, calibration_network_config, refinement_network_config)
    with (
        _model_files(*networks, options, work_dir) as kwargs,
        using_tracking_uri(tracking_uri),
        _run_to_log_into(run_id, experiment_name, artifact_location, model_name),
        _no_input_example_warning(),
    ):
        info = mlflow.pyfunc.log_model(
            name=model_name,  # the LoggedModel's name, as shown in the MLflow UI
            registered_model_name=model_name,
            await_registration_for=await_registration_for,
            **kwargs,
        )
    # a SQLite store gives the version as an int, a tracking server (REST) as a str: always give an int
    if info.registered_model_version is not None:
        info.registered_model_version = int(info.registered_model_version)
    return info
