"""car-med: Calibrated Adversarial Refinement (Kassapis et al., ICCV 2021) on MONAI."""

from __future__ import annotations

import os as _os

from car_med.visualize import isolate_matplotlib_config as _isolate_matplotlib_config

__version__ = "0.1.0"

# car-med promises no network access and no writes to ~. MLflow 3 sends usage telemetry and writes an
# installation id under ~/.config, and matplotlib writes its config and font cache there; both are
# redirected unless the user set them explicitly. (This only helps if car_med is imported first;
# docs/core.md says what to export when MONAI's CLI imports them earlier.)
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_isolate_matplotlib_config()
