"""Acceptance: the training bundle registers on a real `mlflow server`, and `mlflow models serve` answers REST,
with hypotheses on request."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from lidc_bundle_runs import run_bundle
from mlflow_servers import http_json, mlflow_cli, mlflow_model_server, mlflow_tracking_server

from car_med.hypotheses import group_samples, hypotheses_json

pytestmark = [
    pytest.mark.slow,  # a tracking server, a bundle training and a model server, each a subprocess
    pytest.mark.skipif(mlflow_cli() is None, reason="the `mlflow` CLI is not installed (pip install mlflow)"),
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy"),
]


def test_bundle_registers_on_a_tracking_server_and_the_model_is_served(tmp_path, clean_run):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1024.0, 400.0, size=(2, 1, 64, 64)).astype(np.float32)
    params = {"num_samples": 4, "seed": 0}
    with mlflow_tracking_server(tmp_path / "tracking") as tracking:
        result = run_bundle(
            "training", ["train.json", "demo.json"], tmp_path / "home", dataset_dir=clean_run,
            output_dir=tmp_path / "run", tracking_uri=tracking.url, stage1_iterations=2, stage2_iterations=2,
            val_interval=2,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:]
        assert "Created version '1' of model 'car-lidc'" in result.stdout
        assert not (tmp_path / "run" / "mlflow.db").exists()  # everything went to the server
        # artifacts went through the server's proxy into its --artifacts-destination
        assert list((tmp_path / "tracking" / "artifacts").rglob("car_weights.pt"))
        mlflow.set_tracking_uri(tracking.url)
        try:
            local = mlflow.pyfunc.load_model("models:/car-lidc/1").predict(x, params=params)
        finally:
            mlflow.set_tracking_uri(None)

        with mlflow_model_server("models:/car-lidc/1", tmp_path / "serve", tracking.url) as serving:
            status, body = http_json(serving.url + "/invocations", {"inputs": x.tolist(), "params": params})
            assert status == 200, body
            predictions = body["predictions"]  # the dict of arrays, as nested lists
            assert set(predictions) == {"samples", "mean", "calibration", "entropy"}
            samples = np.asarray(predictions["samples"])
            assert samples.shape == (2, 4, 64, 64)
            np.testing.assert_array_equal(samples, local["samples"])  # same seed, same samples
            # the server runs 1 thread, this test 2: reductions may differ in the last bit
            np.testing.assert_allclose(np.asarray(predictions["mean"], dtype=np.float32), local["mean"], atol=1e-5)
            assert np.asarray(predictions["entropy"]).shape == (2, 64, 64)

            # the two slices as one nodule: its samples grouped in 3D, each hypothesis with its probability
            grouped = {**params, "noise_groups": [5, 5], "hypotheses": True}
            status, body = http_json(serving.url + "/invocations", {"inputs": x.tolist(), "params": grouped})
            assert status == 200, body
            served = np.asarray(body["predictions"]["samples"])
            (nodule,) = body["predictions"]["hypotheses"]
            assert (nodule["group"], nodule["rows"], nodule["num_samples"]) == (5, [0, 1], 4)
            volume = np.moveaxis(served == 1, 0, 1)  # (M, 2, H, W): sample m across both slices
            assert nodule["hypotheses"] == hypotheses_json(group_samples(volume))
            assert sum(h["probability"] for h in nodule["hypotheses"]) == pytest.approx(1.0)
            assert sorted(m for h in nodule["hypotheses"] for m in h["members"]) == [0, 1, 2, 3]
            assert all(h["representative"] in h["members"] for h in nodule["hypotheses"])
            status, body = http_json(serving.url + "/invocations", {"inputs": x.tolist(), "params": {"hypotheses": 1}})
            assert status == 400 and "hypotheses" in body["message"]

            status, body = http_json(serving.url + "/invocations", {"inputs": x[:, 0].tolist()})
            assert status == 400 and "does not match expected shape" in body["message"]
            bad = x.copy()
            bad[1, 0, 0, 0] = np.nan
            status, body = http_json(serving.url + "/invocations", {"inputs": bad.tolist()})
            assert status == 400 and "NaN or Inf" in str(body)
