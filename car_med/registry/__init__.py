"""The trained CAR LIDC model as an MLflow pyfunc (models-from-code): register, load, serve.

See docs/registry.md. ``register_car_model`` logs F and G with :mod:`car_med.registry.pyfunc_entry` as the model
code and registers a version; ``mlflow.pyfunc.load_model("models:/car-lidc/<version>")`` then gives a model whose
``predict(hu_batch, params={"num_samples": M, "seed": s})`` returns samples, Gbar, F(x) and its entropy.
"""

from __future__ import annotations

from car_med.registry.model import (
    CARPyfuncModel,
    build_network,
    car_model_signature,
    check_network_config,
    load_networks_from_model_dir,
)
from car_med.registry.register import MODEL_CODE_PATH, default_pip_requirements, register_car_model, save_car_model

__all__ = [
    "MODEL_CODE_PATH",
    "CARPyfuncModel",
    "build_network",
    "car_model_signature",
    "check_network_config",
    "default_pip_requirements",
    "load_networks_from_model_dir",
    "register_car_model",
    "save_car_model",
]
