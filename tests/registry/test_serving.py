"""A model registered on a real `mlflow server` answers REST requests from `mlflow models serve`."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow_servers import http_json, mlflow_cli, mlflow_model_server, mlflow_tracking_server
from tiny_registry import NOISE_DIM, hu_batch, tiny_car_model, using_tracking_uri

from car_med.registry import register_car_model

pytestmark = [
    pytest.mark.skipif(mlflow_cli() is None, reason="the `mlflow` CLI is not installed (pip install mlflow)"),
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy"),
]


def test_model_registered_on_a_tracking_server_is_served_over_rest(tmp_path):
    f, g, f_config, g_config = tiny_car_model()
    x = hu_batch(2, 16)
    params = {"num_samples": 4, "seed": 0}
    with mlflow_tracking_server(tmp_path / "tracking") as tracking:
        info = register_car_model(
            f, g, f_config, g_config, noise_dim=NOISE_DIM, tracking_uri=tracking.url, work_dir=str(tmp_path)
        )
        assert info.registered_model_version == 1
        # artifacts went through the server's proxy into its --artifacts-destination, not into this cwd
        assert list((tmp_path / "tracking" / "artifacts").rglob("car_weights.pt"))
        with using_tracking_uri(tracking.url):
            local = mlflow.pyfunc.load_model("models:/car-lidc/1").predict(x, params=params)

        with mlflow_model_server("models:/car-lidc/1", tmp_path / "serve", tracking.url) as serving:
            status, body = http_json(serving.url + "/invocations", {"inputs": x.tolist(), "params": params})
            assert status == 200, body
            predictions = body["predictions"]  # the dict of arrays, as nested lists
            assert set(predictions) == {"samples", "mean", "calibration", "entropy"}
            samples = np.asarray(predictions["samples"])
            assert samples.shape == (2, 4, 16, 16)
            np.testing.assert_array_equal(samples, local["samples"])  # same seed, same samples
            # the server runs 1 thread, this test 2: reductions may differ in the last bit
            np.testing.assert_allclose(np.asarray(predictions["mean"], dtype=np.float32), local["mean"], atol=1e-6)
            assert np.asarray(predictions["entropy"]).shape == (2, 16, 16)

            status, body = http_json(serving.url + "/invocations", {"inputs": x[:, 0].tolist()})
            assert status == 400 and "does not match expected shape" in body["message"]
            bad = x.copy()
            bad[1, 0, 0, 0] = np.nan
            status, body = http_json(serving.url + "/invocations", {"inputs": bad.tolist()})
            assert status == 400 and "NaN or Inf" in str(body)
