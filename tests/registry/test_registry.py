"""The registered CAR model: logged as code (no pickle), rebuilt only from car_med classes, and sampling exactly as
CARSampler does on the windowed input, reproducibly per seed."""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc.scoring_server import predictions_to_json
from mlflow.types import ParamSchema
from tiny_registry import NOISE_DIM, hu_batch, tiny_car_model, using_tracking_uri

from car_med.components import remove_small_components, small_components
from car_med.data.lidc import ScaleLIDCIntensityd
from car_med.hypotheses import DEFAULT_CONFIDENCE, DEFAULT_MIN_IOU, group_samples, hypotheses_json
from car_med.networks import NoiseInjectedUNet
from car_med.registry import (
    MODEL_CODE_PATH,
    CARPyfuncModel,
    build_network,
    car_model_signature,
    check_network_config,
    load_networks_from_model_dir,
    register_car_model,
    save_car_model,
)
from car_med.registry.model import PARAM_NAMES
from car_med.sampling import CARSampler

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # inside MLflow's SQL store

EXTRA = {
    "dataset": "LIDC-IDRI (synthetic test crops)",
    "split_seed": np.int64(7),
    "validation": {"ged": torch.tensor(0.25), "hm_iou": float("nan")},
    "splits": Path("splits.json"),
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two versions of car-lidc in a SQLite store: v1 in a new run, v2 in a RUNNING 'training' run."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    f, g, f_config, g_config = tiny_car_model()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        common = dict(noise_dim=NOISE_DIM, tracking_uri=uri, work_dir=str(root), max_num_samples=64)
        first = register_car_model(
            f, g, f_config, g_config, artifact_location=str(root / "artifacts"), extra_metadata=EXTRA, **common
        )
        client = mlflow.MlflowClient(uri)
        # a run left RUNNING by someone else, as MONAI's MLFlowHandler leaves the training run
        experiment_id = client.get_run(first.run_id).info.experiment_id
        training = client.create_run(experiment_id, run_name="training")
        second = register_car_model(f, g, f_config, g_config, run_id=training.info.run_id, **common)
        with using_tracking_uri(uri):
            model = mlflow.pyfunc.load_model("models:/car-lidc/latest")
    return SimpleNamespace(
        uri=uri, root=root, f=f, g=g, first=first, second=second, training_run_id=training.info.run_id, model=model
    )


@pytest.fixture
def tracking(registry):
    with using_tracking_uri(registry.uri):
        yield mlflow.MlflowClient(registry.uri)


def test_registered_model_returns_samples_gbar_calibration_and_entropy_as_numpy(registry):
    out = registry.model.predict(hu_batch(2, 16), params={"num_samples": 8, "seed": 0})
    assert set(out) == {"samples", "mean", "calibration", "entropy"}
    assert out["samples"].shape == (2, 8, 16, 16) and out["samples"].dtype == np.uint8
    assert set(np.unique(out["samples"])) <= {0, 1}
    for key in ("mean", "calibration"):
        assert out[key].shape == (2, 2, 16, 16) and out[key].dtype == np.float32
        np.testing.assert_allclose(out[key].sum(axis=1), 1.0, atol=1e-5)
    assert out["entropy"].shape == (2, 16, 16) and out["entropy"].dtype == np.float32
    assert (out["entropy"] >= 0).all() and (out["entropy"] <= np.log(2) + 1e-6).all()


def test_same_seed_gives_the_same_samples_and_another_seed_different_ones(registry):
    x = hu_batch(2, 16)
    a = registry.model.predict(x, params={"num_samples": 8, "seed": 0})
    b = registry.model.predict(x, params={"num_samples": 8, "seed": 0})
    c = registry.model.predict(x, params={"num_samples": 8, "seed": 1})
    assert np.array_equal(a["samples"], b["samples"]) and np.array_equal(a["mean"], b["mean"])
    assert not np.array_equal(a["samples"], c["samples"])
    np.testing.assert_array_equal(a["calibration"], c["calibration"])  # F has no noise


def test_prediction_equals_car_sampler_on_the_hu_windowed_input(registry):
    x = hu_batch(3, 16, seed=1)
    out = registry.model.predict(x, params={"num_samples": 8, "seed": 5})
    image = ScaleLIDCIntensityd(keys="image", hu_window=(-1024.0, 400.0))({"image": torch.from_numpy(x)})["image"]
    # the training window, written out: HU -1024 -> 0, 400 -> 1, clipped
    np.testing.assert_allclose(np.asarray(image), np.clip((x + 1024.0) / 1424.0, 0, 1), atol=1e-6)
    sampler = CARSampler(registry.f, registry.g, num_samples=8, noise_dim=NOISE_DIM, max_batch=8, return_probs=False)
    ref = sampler(torch.as_tensor(np.asarray(image)), generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(out["samples"], ref.samples.numpy().astype(np.uint8))
    np.testing.assert_allclose(out["mean"], ref.mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["calibration"], ref.calibration.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["entropy"], ref.entropy.numpy(), atol=1e-6)


def test_hu_outside_the_window_is_clipped_like_the_training_transform(registry):
    x = hu_batch(1, 16)
    low, high = x.copy(), x.copy()
    low[x < -1024], high[x < -1024] = -1024.0, -3000.0
    params = {"num_samples": 4, "seed": 0}
    np.testing.assert_array_equal(
        registry.model.predict(low, params=params)["mean"], registry.model.predict(high, params=params)["mean"]
    )


def test_num_samples_and_seed_default_from_the_signature(registry):
    out = registry.model.predict(hu_batch(1, 16))
    assert out["samples"].shape[1] == 16  # default_num_samples
    again = registry.model.predict(hu_batch(1, 16), params={"num_samples": 16, "seed": 0})
    np.testing.assert_array_equal(out["samples"], again["samples"])


def test_registering_twice_gives_version_2_and_a_resumed_run_keeps_its_status(registry, tracking):
    assert registry.first.registered_model_version == 1 and registry.second.registered_model_version == 2
    versions = sorted(int(v.version) for v in tracking.search_model_versions("name='car-lidc'"))
    assert versions == [1, 2]
    assert tracking.get_model_version("car-lidc", "2").run_id == registry.training_run_id
    assert tracking.get_run(registry.training_run_id).info.status == "RUNNING"
    assert tracking.get_run(registry.first.run_id).info.status == "FINISHED"
    logged = tracking.get_logged_model(registry.second.model_id)
    assert logged.experiment_id == tracking.get_run(registry.training_run_id).info.experiment_id
    assert registry.first.model_uri.startswith("models:/")


def test_register_puts_back_the_tracking_uri_and_its_env_var(tmp_path, monkeypatch):
    f, g, f_config, g_config = tiny_car_model()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    before = mlflow.get_tracking_uri()
    register_car_model(
        f, g, f_config, g_config, noise_dim=NOISE_DIM, tracking_uri=f"sqlite:///{tmp_path / 'reg.db'}",
        artifact_location=str(tmp_path / "artifacts"), work_dir=str(tmp_path),
    )  # fmt: skip
    assert mlflow.get_tracking_uri() == before == os.environ["MLFLOW_TRACKING_URI"]
    assert mlflow.active_run() is None
    assert not (tmp_path / "other.db").exists()


def test_logged_model_is_code_and_tensors_not_a_pickle(registry, tracking, tmp_path):
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/car-lidc/1", dst_path=str(tmp_path)))
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    flavor = mlflow.models.Model.load(str(model_dir)).flavors["python_function"]
    assert "python_model" not in flavor  # the key of a cloudpickled PythonModel
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "pyfunc_entry.py"
    assert (model_dir / "pyfunc_entry.py").read_text() == MODEL_CODE_PATH.read_text()
    state = torch.load(model_dir / "artifacts" / "car_weights.pt", weights_only=True)
    assert set(state) == {"calibration_network", "refinement_network"}
    config = json.loads((model_dir / "artifacts" / "car_model.json").read_text())
    assert config["calibration_network"]["_target_"] == "car_med.networks.SegNetCalibrationNet"
    assert config["inference"]["noise_dim"] == NOISE_DIM
    # loading needs no pickle deserialisation, which MLflow refuses by default
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        mlflow.pyfunc.load_model(str(model_dir))
    finally:
        del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
    f, g, _ = load_networks_from_model_dir(model_dir)
    torch.testing.assert_close(f.state_dict(), registry.f.state_dict())
    torch.testing.assert_close(g.state_dict(), registry.g.state_dict())


def test_metadata_and_signature(registry):
    meta = registry.model.metadata
    info = registry.first.metadata
    assert info["car_med_version"] == "0.1.0"
    assert info["hu_window"] == [-1024.0, 400.0] and info["num_classes"] == 2 and info["noise_dim"] == NOISE_DIM
    expected = {"dataset": EXTRA["dataset"], "split_seed": 7, "validation": {"ged": 0.25, "hm_iou": None}}
    assert info["extra_metadata"] == {**expected, "splits": "splits.json"}
    assert meta.metadata["extra_metadata"] == {}  # v2 was registered without extra metadata
    sig = meta.signature
    assert sig.to_dict() == car_model_signature(num_classes=2).to_dict()
    (spec,) = sig.inputs.inputs
    assert spec.type == np.dtype(np.float32) and spec.shape == (-1, 1, -1, -1)
    assert sig.outputs.input_names() == ["samples", "mean", "calibration", "entropy"]
    assert {p.name: p.default for p in sig.params.params} == {
        "num_samples": 16,
        "seed": 0,
        "noise_groups": [],
        "hypotheses": False,
        "min_iou": DEFAULT_MIN_IOU,
        "confidence": DEFAULT_CONFIDENCE,
    }


def test_bad_inputs_are_refused_with_a_clear_error(registry):
    x = hu_batch(2, 16)
    direct = registry.model.unwrap_python_model()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        direct.predict(None, x[:, 0])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        direct.predict(None, np.concatenate([x, x], axis=1))
    with pytest.raises(ValueError, match="float32"):
        direct.predict(None, x.astype(np.float64))
    with pytest.raises(ValueError, match="float32"):
        direct.predict(None, torch.from_numpy(x).double())
    with pytest.raises(ValueError, match="numpy array, torch tensor or nested list"):
        direct.predict(None, "x")
    bad = x.copy()
    bad[1, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"batch index \[1\].*NaN"):
        registry.model.predict(bad)
    bad[1, 0, 3, 3] = np.inf  # the window would silently clip it to 1
    with pytest.raises(ValueError, match="NaN or Inf"):
        registry.model.predict(bad)
    # through MLflow's wrapper the signature refuses wrong dtypes and shapes first
    with pytest.raises(MlflowException, match="dtype of input float64 does not match expected dtype float32"):
        registry.model.predict(x.astype(np.float64))
    with pytest.raises(MlflowException, match="does not match expected shape"):
        registry.model.predict(x[:, 0])
    for params, message in (
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 65}, r"\[1, 64\]"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ValueError, match=message):
            registry.model.predict(x, params=params)
    with pytest.raises(ValueError, match=r"unknown \['temperature'\]") as refused:
        direct.predict(None, x, params={"temperature": 2})
    assert all(f"'{name}'" in str(refused.value) for name in PARAM_NAMES)  # the message lists what is accepted


def test_model_config_chooses_the_device(registry, tracking):
    model = mlflow.pyfunc.load_model("models:/car-lidc/1", model_config={"device": "cpu"})
    assert model.unwrap_python_model().device == torch.device("cpu")


def test_lists_and_tensors_give_the_same_prediction_as_arrays_when_called_directly(registry):
    x = hu_batch(1, 16)
    direct = registry.model.unwrap_python_model()
    params = {"num_samples": 4, "seed": 3}
    ref = direct.predict(None, x, params)
    for other in (x.tolist(), torch.from_numpy(x)):
        np.testing.assert_array_equal(direct.predict(None, other, params)["samples"], ref["samples"])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"_target_": "os.system", "command": "echo"}, "must name a class under 'car_med.'"),
        ({"_target_": "car_med.registry.model.torch.nn.Linear", "in_features": 1}, "not defined under"),
        ({"_target_": "car_med.registry.model.build_network"}, "not a torch.nn.Module class"),
        ({"_target_": "car_med.networks.NoSuchNet"}, "was not found"),
        ({"_target_": "car_med.networks.NoiseInjectedUNet", "num_classes": "@num_classes"}, "unresolved"),
        ({"_target_": "car_med.networks.NoiseInjectedUNet", "noise_dim": "$8 * 2"}, "unresolved"),
        ({"_target_": "car_med.networks.NoiseInjectedUNet", "_requires_": "@x"}, "bundle directives"),
        ({"_target_": "car_med.networks.NoiseInjectedUNet", "norm": torch.nn.BatchNorm2d}, "only JSON values"),
        ({"num_classes": 2}, "'_target_'"),
    ],
)
def test_network_configs_only_rebuild_car_med_networks_from_plain_values(config, message):
    with pytest.raises(ValueError, match=message):
        build_network(config)


def test_a_bundle_callable_component_is_accepted_as_config():
    partial = functools.partial(NoiseInjectedUNet, image_channels=1, num_classes=2, noise_dim=4, channels=(8, 16))
    config = check_network_config(partial)
    assert config == {
        "_target_": "car_med.networks.refinement.NoiseInjectedUNet",
        "image_channels": 1,
        "num_classes": 2,
        "noise_dim": 4,
        "channels": [8, 16],
    }
    assert isinstance(build_network(config), NoiseInjectedUNet)


def test_register_refuses_configs_that_do_not_rebuild_the_trained_networks(tmp_path):
    f, g, f_config, g_config = tiny_car_model()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="do not fit the network rebuilt from its config"):
        register_car_model(f, g, {**f_config, "channels": [4, 8]}, g_config, noise_dim=NOISE_DIM, tracking_uri=uri)
    with pytest.raises(ValueError, match="noise_dim=8 does not match"):
        register_car_model(f, g, f_config, g_config, tracking_uri=uri)  # default noise_dim 8, G has 4
    with pytest.raises(ValueError, match="extra_metadata"):
        register_car_model(
            f, g, f_config, g_config, noise_dim=NOISE_DIM, tracking_uri=uri, extra_metadata={"x": object()}
        )
    # the model options are explicit parameters: a misspelt one is refused by name, never left at a default
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'noise_dims'"):
        register_car_model(f, g, f_config, g_config, noise_dims=NOISE_DIM, tracking_uri=uri)
    # a ninth positional argument (hu_window, in the old order) is refused, never taken as another option
    with pytest.raises(TypeError, match="positional argument"):
        register_car_model(f, g, f_config, g_config, "car-lidc", uri, None, "car_lidc", (-1000.0, 400.0))
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was logged


def test_saved_model_dir_loads_without_a_tracking_server_and_refuses_a_tampered_target(tmp_path):
    f, g, f_config, g_config = tiny_car_model(seed=1)
    path = tmp_path / "car_model"
    save_car_model(path, f, g, f_config, g_config, noise_dim=NOISE_DIM, default_num_samples=3, work_dir=tmp_path)
    out = mlflow.pyfunc.load_model(str(path)).predict(hu_batch(1, 16))
    assert out["samples"].shape == (1, 3, 16, 16)
    config_path = path / "artifacts" / "car_model.json"
    config = json.loads(config_path.read_text())
    config["refinement_network"]["_target_"] = "subprocess.Popen"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="must name a class under 'car_med.'"):
        CARPyfuncModel.from_model_dir(path)


def test_signature_params_and_outputs():
    sig = car_model_signature(num_classes=3, default_num_samples=20)
    assert [(s.name, s.type, s.shape) for s in sig.outputs.inputs] == [
        ("samples", np.dtype(np.uint8), (-1, -1, -1, -1)),
        ("mean", np.dtype(np.float32), (-1, 3, -1, -1)),
        ("calibration", np.dtype(np.float32), (-1, 3, -1, -1)),
        ("entropy", np.dtype(np.float32), (-1, -1, -1)),
    ]
    assert {p.name: (p.dtype.name, p.default) for p in sig.params.params} == {
        "num_samples": ("integer", 20),
        "seed": ("long", 0),
        "noise_groups": ("long", []),
        "hypotheses": ("boolean", False),
        "min_iou": ("double", DEFAULT_MIN_IOU),
        "confidence": ("double", DEFAULT_CONFIDENCE),
    }
    assert tuple(p.name for p in sig.params.params) == PARAM_NAMES  # the names predict accepts, in one place


def test_noise_groups_make_the_rows_of_a_group_share_their_noise(registry):
    model = registry.model
    one = hu_batch(1, 16)
    x = np.concatenate([one, one, one, one])  # the same slice four times: only the noise tells the rows apart
    params = {"num_samples": 6, "seed": 3}
    apart = model.predict(x, params=params)["samples"]
    assert not np.array_equal(apart[0], apart[1])
    grouped = model.predict(x, params={**params, "noise_groups": [7, 7, 2, 7]})["samples"]
    assert np.array_equal(grouped[0], grouped[1]) and np.array_equal(grouped[0], grouped[3])
    assert not np.array_equal(grouped[0], grouped[2])
    # the first group draws what the first row draws alone with the same seed
    assert np.array_equal(grouped[0], model.predict(one, params=params)["samples"][0])
    with pytest.raises(Exception, match="noise_groups"):
        model.predict(x, params={**params, "noise_groups": [1, 2]})


def test_a_saved_model_serves_samples_with_the_small_components_it_was_saved_with(tmp_path):
    f, g, f_config, g_config = tiny_car_model(seed=1)
    common = dict(noise_dim=NOISE_DIM, default_num_samples=4, work_dir=tmp_path)
    save_car_model(tmp_path / "plain", f, g, f_config, g_config, **common)
    save_car_model(tmp_path / "cleaned", f, g, f_config, g_config, min_component_size=5, **common)
    batch = hu_batch(2, 16)
    plain = mlflow.pyfunc.load_model(str(tmp_path / "plain")).predict(batch, params={"seed": 3})["samples"]
    cleaned = mlflow.pyfunc.load_model(str(tmp_path / "cleaned")).predict(batch, params={"seed": 3})["samples"]
    small = small_components(torch.as_tensor(plain).long(), 5)
    assert small.any(), "the untrained G should leave some stray components to remove"
    np.testing.assert_array_equal(cleaned, remove_small_components(torch.as_tensor(plain).long(), 5).numpy())
    config_path = tmp_path / "cleaned" / "artifacts" / "car_model.json"
    assert json.loads(config_path.read_text())["inference"]["min_component_size"] == 5
    # a model saved before the option existed has no key, and serves G's plain argmax
    config = json.loads(config_path.read_text())
    del config["inference"]["min_component_size"]
    config_path.write_text(json.dumps(config))
    older = mlflow.pyfunc.load_model(str(tmp_path / "cleaned")).predict(batch, params={"seed": 3})["samples"]
    np.testing.assert_array_equal(older, plain)


def _nodule_batch() -> np.ndarray:
    """A bright slice, a dark slice and a noisy one. With the tiny G (seed 0) and seed 0, the bright slice's 16
    samples split 8/7/1 on their own but 8/6/1/1 stacked with the dark slice, so the 3D grouping can be told apart
    from the first slice's (checked in the test)."""
    rng = np.random.default_rng(0)
    slices = [np.full((16, 16), 900.0), np.full((16, 16), -3000.0), rng.uniform(-1500.0, 900.0, (16, 16))]
    return np.stack(slices)[:, None].astype(np.float32)


def _check_partition(entry: dict, samples: np.ndarray) -> None:
    """Probabilities sum to 1, members partition range(M), each representative is a member and its size is true."""
    hypotheses, rows = entry["hypotheses"], entry["rows"]
    num_samples = samples.shape[1]
    assert sum(h["probability"] for h in hypotheses) == pytest.approx(1.0)
    assert sorted(m for h in hypotheses for m in h["members"]) == list(range(num_samples))
    for h in hypotheses:
        assert h["representative"] in h["members"] and h["count"] == len(h["members"])
        assert h["interval"][0] <= h["probability"] <= h["interval"][1]
        assert h["voxels"] == int((samples[rows, h["representative"]] == 1).sum())  # the lesion, over the rows


def test_hypotheses_group_a_noise_group_s_rows_as_one_volume_in_order_of_first_appearance(registry):
    x = _nodule_batch()
    params = {"num_samples": 16, "seed": 0, "noise_groups": [9, 9, 2]}
    plain = registry.model.predict(x, params=params)
    out = registry.model.predict(x, params={**params, "hypotheses": True})
    assert set(out) == {"samples", "mean", "calibration", "entropy", "hypotheses"}
    for key in ("samples", "mean", "calibration", "entropy"):
        np.testing.assert_array_equal(out[key], plain[key])  # asking for hypotheses changes no sample
    samples = out["samples"]
    nodule, single = out["hypotheses"]
    assert (nodule["group"], nodule["rows"], single["group"], single["rows"]) == (9, [0, 1], 2, [2])
    assert (nodule["num_samples"], nodule["min_iou"], nodule["confidence"]) == (16, DEFAULT_MIN_IOU, 0.95)
    for entry in (nodule, single):
        _check_partition(entry, samples)
    # group 9 is one 3D volume: sample m is the stack of rows 0 and 1's sample m, grouped as a whole
    volume = np.moveaxis(samples[[0, 1]] == 1, 0, 1)  # (M, 2, H, W)
    assert nodule["hypotheses"] == hypotheses_json(group_samples(volume))
    first_slice = [h.probability for h in group_samples(samples[0] == 1)]
    assert [h["probability"] for h in nodule["hypotheses"]] != first_slice, "the batch no longer tells 3D from 2D"
    # the whole response survives the scoring server's JSON encoder as plain lists and numbers
    buffer = io.StringIO()
    predictions_to_json(out, buffer)
    assert json.loads(buffer.getvalue())["predictions"]["hypotheses"] == out["hypotheses"]


def test_hypotheses_without_noise_groups_are_per_row_and_follow_min_iou_and_confidence(registry):
    x = _nodule_batch()
    params = {"num_samples": 16, "seed": 0, "hypotheses": True}
    out = registry.model.predict(x, params=params)
    assert [(e["group"], e["rows"]) for e in out["hypotheses"]] == [(None, [0]), (None, [1]), (None, [2])]
    for row, entry in enumerate(out["hypotheses"]):
        _check_partition(entry, out["samples"])
        assert entry["hypotheses"] == hypotheses_json(group_samples(out["samples"][row] == 1))
    bright = out["hypotheses"][0]["hypotheses"]
    assert min(h["mean_iou"] for h in bright) < 1, "the bright slice should have a hypothesis of unlike members"
    strict = registry.model.predict(x, params={**params, "min_iou": 1.0})["hypotheses"][0]
    assert strict["min_iou"] == 1.0 and all(h["mean_iou"] == 1.0 for h in strict["hypotheses"])
    assert len(strict["hypotheses"]) > len(bright)
    narrow = registry.model.predict(x, params={**params, "confidence": 0.5})["hypotheses"][0]["hypotheses"]
    width = [h["interval"][1] - h["interval"][0] for h in bright]
    assert all(h["interval"][1] - h["interval"][0] < w for h, w in zip(narrow, width))


def test_hypotheses_false_or_absent_leave_the_output_as_it_was(registry):
    x = hu_batch(2, 16)
    params = {"num_samples": 4, "seed": 1, "noise_groups": [0, 0]}
    absent = registry.model.predict(x, params=params)
    off = registry.model.predict(x, params={**params, "hypotheses": False, "min_iou": 0.9})
    direct = registry.model.unwrap_python_model().predict(None, x, params)
    for out in (absent, off, direct):
        assert set(out) == {"samples", "mean", "calibration", "entropy"}
    for key in absent:
        np.testing.assert_array_equal(absent[key], off[key])


def test_bad_hypotheses_params_are_refused_by_name(registry, monkeypatch):
    x = hu_batch(1, 16)
    direct = registry.model.unwrap_python_model()
    for params, message in (
        ({"hypotheses": "yes"}, "'hypotheses' must be a boolean"),
        ({"hypotheses": 1}, "'hypotheses' must be a boolean"),
        ({"hypotheses": True, "min_iou": 0.0}, r"'min_iou' must lie in \(0, 1\]"),
        ({"hypotheses": True, "min_iou": 1.5}, r"'min_iou' must lie in \(0, 1\]"),
        ({"min_iou": "0.5"}, "'min_iou' must be a number"),
        ({"hypotheses": True, "confidence": 1.0}, r"'confidence' must lie in \(0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            direct.predict(None, x, params)
    # through MLflow the signature refuses a non-boolean first, naming the param
    with pytest.raises(MlflowException, match="hypotheses"):
        registry.model.predict(x, params={"hypotheses": 1})
    with pytest.raises(ValueError, match="min_iou"):
        registry.model.predict(x, params={"hypotheses": True, "min_iou": 2.0})
    monkeypatch.setitem(direct.settings, "num_classes", 3)
    with pytest.raises(ValueError, match="two-class .* this model has 3 classes"):
        direct.predict(None, x, {"hypotheses": True})


def test_a_model_saved_before_the_hypotheses_params_says_how_to_get_them(tmp_path, caplog):
    f, g, f_config, g_config = tiny_car_model()
    path = tmp_path / "car_model"
    save_car_model(path, f, g, f_config, g_config, noise_dim=NOISE_DIM, default_num_samples=4, work_dir=tmp_path)
    current = car_model_signature(num_classes=2, default_num_samples=4)
    older = ParamSchema([p for p in current.params.params if p.name in ("num_samples", "seed", "noise_groups")])
    mlflow.models.set_signature(str(path), ModelSignature(current.inputs, current.outputs, params=older))
    x = hu_batch(1, 16)
    with caplog.at_level("WARNING", logger="car_med.registry.model"):
        model = mlflow.pyfunc.load_model(str(path))
    (record,) = [r for r in caplog.records if r.name == "car_med.registry.model"]
    assert "['hypotheses', 'min_iou', 'confidence']" in record.getMessage()
    assert "car_model_signature(num_classes=2, default_num_samples=4)" in record.getMessage()
    # MLflow drops the params its stored signature lacks: the old answer, without hypotheses
    assert set(model.predict(x, params={"hypotheses": True})) == {"samples", "mean", "calibration", "entropy"}
    mlflow.models.set_signature(str(path), current)  # the fix the warning names
    caplog.clear()
    with caplog.at_level("WARNING", logger="car_med.registry.model"):
        model = mlflow.pyfunc.load_model(str(path))
    assert not [r for r in caplog.records if r.name == "car_med.registry.model"]
    assert "hypotheses" in model.predict(x, params={"hypotheses": True})
