"""Find and load the CAR model an export samples from: an MLflow model URI, or a bundle output folder."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelSource", "load_export_model", "resolve_model_source"]

REGISTRATION_FILE = "registered_model.json"


@dataclass(frozen=True)
class ModelSource:
    """Where the export's model comes from; all of it goes into ``export.json``.

    Attributes:
        uri: the MLflow model URI loaded (``models:/<name>/<version>``, ``runs:/...`` or a local folder).
        tracking_uri: the tracking/registry URI it was resolved against (``None``: MLflow's default).
        name: registered model name, when known.
        version: registered model version, when known.
        run_id: the MLflow run that logged the model, when known.
        bundle_dir: the bundle output folder, when MODEL was one.
    """

    uri: str
    tracking_uri: str | None = None
    name: str | None = None
    version: int | None = None
    run_id: str | None = None
    bundle_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _bundle_source(folder: Path, tracking_uri: str | None) -> ModelSource:
    record_path = folder / REGISTRATION_FILE
    if not record_path.is_file():
        hint = (
            "its training has not finished (the model is registered at the end of stage 2): rerun "
            "`python -m monai.bundle run training ...` with the same --output_dir to finish it"
        )
        raise ValueError(f"bundle output folder {folder} has no {REGISTRATION_FILE}; {hint}.")
    try:
        record = json.loads(record_path.read_text())
        name, version = str(record["model_name"]), int(record["version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{record_path} is not a registration record ({err}).") from err
    uri = tracking_uri or record.get("tracking_uri") or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    return ModelSource(
        uri=f"models:/{name}/{version}",
        tracking_uri=uri,
        name=name,
        version=version,
        run_id=record.get("run_id"),
        bundle_dir=str(folder.resolve()),
    )


def resolve_model_source(model: str | os.PathLike, tracking_uri: str | None = None) -> ModelSource:
    """Turn the ``--model`` argument into a pinned :class:`ModelSource`.

    Args:
        model: ``models:/<name>/<version>``, ``models:/<name>/latest`` or ``models:/<name>@<alias>``,
            ``runs:/<run id>/<path>``, a local MLflow model folder (with ``MLmodel``), or a bundle output
            folder (with ``registered_model.json``, as ``run training`` leaves it).
        tracking_uri: tracking/registry URI; default the bundle's own store for a bundle folder, else
            ``MLFLOW_TRACKING_URI`` or MLflow's default.

    Returns:
        The source, with ``latest`` and aliases resolved to a version number so the export names the exact
        model version.

    Raises:
        ValueError: the folder is neither a model nor a bundle output, or the name/version is unknown.
    """
    text = str(model)
    if not text.startswith(("models:/", "runs:/")):
        folder = Path(text)
        if (folder / "MLmodel").is_file():
            return ModelSource(uri=str(folder.resolve()))
        if folder.is_dir():
            return _bundle_source(folder, tracking_uri)
        raise ValueError(
            f"--model {text!r} is neither an MLflow model URI (models:/NAME/VERSION, runs:/RUN/PATH) nor a folder."
        )
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not text.startswith("models:/"):
        return ModelSource(uri=text, tracking_uri=tracking_uri, run_id=text[len("runs:/") :].split("/")[0])
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    spec = text[len("models:/") :]
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            found = client.get_model_version_by_alias(name, alias)
        elif "/" in spec:
            name, version = spec.split("/", 1)
            if version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise ValueError(f"registered model {name!r} has no versions at {tracking_uri}.")
                found = max(versions, key=lambda v: int(v.version))
            else:
                found = client.get_model_version(name, version)
        else:
            # models:/<logged model id>: not a registry entry, no version to pin
            return ModelSource(uri=text, tracking_uri=tracking_uri)
    except MlflowException as err:
        raise ValueError(f"--model {text!r}: {err.message}") from err
    return ModelSource(
        uri=f"models:/{found.name}/{found.version}",
        tracking_uri=tracking_uri,
        name=found.name,
        version=int(found.version),
        run_id=found.run_id,
    )


def load_export_model(source: ModelSource, device: str = "cpu"):
    """Download (if remote) and load the model as :class:`car_med.registry.CARPyfuncModel`.

    The model is rebuilt by car_med's own code from the logged network configs and tensors (see
    :mod:`car_med.registry.model`), exactly as ``mlflow.pyfunc.load_model`` would, but without MLflow's
    wrapper, so ``predict`` returns the arrays directly.
    """
    from car_med.registry import CARPyfuncModel

    if not source.uri.startswith(("models:/", "runs:/")):
        return CARPyfuncModel.from_model_dir(source.uri, device=device)
    import mlflow

    from car_med.registry.register import using_tracking_uri

    with tempfile.TemporaryDirectory(prefix="car-export-model-") as tmp, using_tracking_uri(source.tracking_uri):
        # MLflow resolves models:/ URIs against its global registry; the context puts the user's URI back
        local = mlflow.artifacts.download_artifacts(artifact_uri=source.uri, dst_path=tmp)
        return CARPyfuncModel.from_model_dir(local, device=device)
