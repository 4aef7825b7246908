"""The models-from-code file of the CAR pyfunc model.

``register_car_model`` passes this file's path as ``python_model=`` to ``mlflow.pyfunc.log_model``. MLflow copies
it next to the model's ``MLmodel`` and runs it when the model is loaded, so loading runs only this import of the
installed ``car_med`` (no cloudpickle of a Python object). Keep it to these lines: whatever it does runs at every
load and at logging time.
"""

import mlflow

from car_med.registry.model import CARPyfuncModel

mlflow.models.set_model(CARPyfuncModel())
