"""The LIDC bundle under the failures users hit: a kill mid-training, NaN losses, bad data, two processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from lidc_bundle_runs import REPO_ROOT, bundle_command, bundle_env, run_bundle

from car_med.data.lidc_checks import LIDCDatasetError, check_lidc_dataset
from car_med.evaluation import LidcEvaluationSettings, evaluate_lidc
from car_med.networks import build_network

pytestmark = pytest.mark.slow  # every test runs the bundle in a subprocess (a training or its refusal)


def _trainer_iteration(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["trainer"]["iteration"])


def _copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _first_item(dataset: Path, split: str = "training") -> dict:
    return _first_item_at(dataset, 0, split)


def _first_item_at(dataset: Path, index: int, split: str = "training") -> dict:
    return json.loads((dataset / "datalist.json").read_text())[split][index]


def test_sigkill_in_stage2_resumes_iteration_and_mlflow_run(tmp_path, clean_run):
    out, home = tmp_path / "run", tmp_path / "home"
    command = bundle_command(
        "training",
        ["train.json", "demo.json"],
        dataset_dir=clean_run,
        output_dir=out,
        stage1_iterations=3,
        stage2_iterations=24,
        checkpoint_interval=4,
        val_interval=12,
        register_model="False",
    )
    process = subprocess.Popen(
        command, env=bundle_env(home), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if any(_iteration_at_least(p, 8) for p in (out / "checkpoints").glob("stage2_checkpoint_iteration=*.pt")):
                break
            time.sleep(0.5)
        assert process.poll() is None, "training ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = max(_trainer_iteration(p) for p in (out / "checkpoints").glob("stage2_checkpoint_iteration=*.pt"))
    assert 8 <= killed_at < 24
    with sqlite3.connect(out / "mlflow.db") as db:
        ((run_id, status),) = db.execute("select run_uuid, status from runs").fetchall()
        assert status == "RUNNING"  # killed: nobody closed it

    result = run_bundle(
        "training",
        ["train.json", "demo.json"],
        home,
        dataset_dir=clean_run,
        output_dir=out,
        stage1_iterations=3,
        stage2_iterations=24,
        checkpoint_interval=4,
        val_interval=12,
        register_model="False",
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "stage 1 (F) finished in an earlier run" in result.stdout
    assert _trainer_iteration(out / "checkpoints" / "stage2_checkpoint_epoch=1.pt") == 24
    with sqlite3.connect(out / "mlflow.db") as db:
        assert db.execute("select run_uuid, status from runs").fetchall() == [(run_id, "FINISHED")]
        steps = [s for (s,) in db.execute("select step from metrics where key = 'loss_g' order by step")]
    # one run holds the whole stage, resumed at the checkpoint: iterations up to it were logged once (a restart
    # from 0 would log them twice), the ones after it at least once (those between it and the kill, twice)
    assert all(steps.count(step) == 1 for step in range(1, killed_at + 1))
    assert set(steps) == set(range(1, 25))
    history = json.loads((out / "validation.json").read_text())["history"]
    assert [entry["iteration"] for entry in history] == [12, 24]


def _iteration_at_least(path: Path, iteration: int) -> bool:
    try:
        return _trainer_iteration(path) >= iteration
    except Exception:  # being written right now
        return False


def test_nan_loss_in_stage2_stops_with_a_clear_message_and_keeps_checkpoints(tmp_path, clean_run):
    out = tmp_path / "run"
    result = run_bundle(
        "training",
        ["train.json", "demo.json"],
        tmp_path / "home",
        dataset_dir=clean_run,
        output_dir=out,
        stage1_iterations=3,
        lambda_cal="$float('nan')",
    )
    assert result.returncode != 0
    assert "non-finite" in result.stdout and "stage 2" in result.stdout and "loss_g" in result.stdout
    names = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert names == ["stage1_checkpoint_epoch=1.pt", "stage1_checkpoint_iteration=3.pt"]  # no NaN weights saved
    state = torch.load(out / "checkpoints" / "stage1_checkpoint_epoch=1.pt", weights_only=True)["calibration_network"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_image_in_stage1_stops_and_keeps_the_last_good_checkpoint(tmp_path, clean_run):
    data = _copy_dataset(clean_run, tmp_path / "data")
    items = json.loads((data / "datalist.json").read_text())["training"]
    for item in items:  # every training image is poisoned, so the first batch already holds NaN
        path = data / item["image"]
        img = nib.load(path)
        pixels = np.asarray(img.dataobj, dtype=np.float32)
        pixels[90, 90, 0] = np.nan
        nib.save(nib.Nifti1Image(pixels, img.affine), path)
    with pytest.raises(LIDCDatasetError, match="holds NaN values"):
        check_lidc_dataset(data, progress=False)
    out = tmp_path / "run"
    result = run_bundle(
        "training", ["train.json", "demo.json"], tmp_path / "home", dataset_dir=data, output_dir=out,
        check_label_values="False",
    )  # fmt: skip
    assert result.returncode != 0
    assert "non-finite" in result.stdout and "stage 1 (F)" in result.stdout
    assert not list((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else True


@pytest.mark.parametrize("breakage", ["missing_image", "label_value_2", "wrong_size"])
def test_bad_items_fail_before_training_naming_the_item(tmp_path, clean_run, breakage):
    data = _copy_dataset(clean_run, tmp_path / "data")
    item = _first_item(data)
    if breakage == "missing_image":
        (data / item["image"]).unlink()
        expected = "field 'image'"
    elif breakage == "label_value_2":
        path = data / item["label"][0]
        mask = nib.load(path)
        values = np.asarray(mask.dataobj).copy()
        values[0, 0, 0] = 2
        nib.save(nib.Nifti1Image(values, mask.affine), path)
        expected = "values other than 0 and 1 (2)"
    else:
        item = _first_item_at(data, 1)  # the first item sets the expected size
        path = data / item["image"]
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:150, :150], img.affine), path)
        expected = "is 150x150; expected 180x180"
    with pytest.raises(LIDCDatasetError) as raised:
        check_lidc_dataset(data, progress=False)
    message = str(raised.value)
    assert expected in message and item["patient_id"] in message, message

    out = tmp_path / "run"
    result = run_bundle("training", ["train.json", "demo.json"], tmp_path / "home", dataset_dir=data, output_dir=out)
    assert result.returncode != 0 and expected in result.stdout
    assert not (out / "checkpoints").exists()  # nothing trained


def test_missing_dataset_dir_names_the_commands_that_make_it(tmp_path):
    result = run_bundle(
        "training", ["train.json", "demo.json"], tmp_path / "home", dataset_dir=tmp_path / "nowhere",
        output_dir=tmp_path / "run",
    )  # fmt: skip
    assert result.returncode != 0
    assert "does not exist" in result.stdout and "python -m preprocessing.lidc --dicom-root" in result.stdout
    assert "python -m car_med.data.lidc_releases png" in result.stdout


def test_two_process_gloo_training_validates_like_one_process_evaluation(tmp_path, clean_run):
    out = tmp_path / "run"
    config = bundle_command(
        "training",
        ["train.json", "demo.json", "multi_gpu_train.json"],
        dataset_dir=clean_run,
        output_dir=out,
        register_model="False",
    )
    torchrun = [config[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        torchrun + config[1:], env=bundle_env(tmp_path / "home"), cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    last = json.loads((out / "validation.json").read_text())["last"]
    assert last["iteration"] == 6

    bundle = json.loads((REPO_ROOT / "bundles" / "lidc" / "train.json").read_text())
    demo = json.loads((REPO_ROOT / "bundles" / "lidc" / "demo.json").read_text())
    specs = {}
    for name in ("calibration_network_spec", "refinement_network_spec"):
        spec = dict(bundle[name])
        spec.update({k.split("#")[1]: v for k, v in demo.items() if k.startswith(name + "#")})
        specs[name] = spec
    report = evaluate_lidc(
        build_network(specs["calibration_network_spec"]),
        build_network(specs["refinement_network_spec"]),
        clean_run / "datalist.json",
        tmp_path / "one_process",
        checkpoint=out / "checkpoints" / "stage2_checkpoint_epoch=1.pt",
        settings=LidcEvaluationSettings(
            split="validation",
            ged_counts=(16,),
            hm_iou_counts=(16,),
            diversity_count=16,
            max_cases=8,
            roi_size=demo.get("roi_size", bundle["roi_size"]),
        ),
        progress=False,
    )
    for key in ("ged16", "hm_iou16", "diversity16", "ece"):
        assert report["metrics"][key] == pytest.approx(last[key], abs=1e-6), key
