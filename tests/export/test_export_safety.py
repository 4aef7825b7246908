"""Export safety: no overwrite without --overwrite, no partial file after SIGKILL, per-case errors, safe paths."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from export_cohort import EXPORT_PATIENTS, NUM_SAMPLES, split_of

from car_med.export import export_cases
from car_med.export.__main__ import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def _hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_a_second_export_without_overwrite_changes_no_file_and_says_so(exported, caplog):
    before = _hashes(exported["dir"])
    summaries = []
    with caplog.at_level("INFO", logger="car_med.export"):
        for patient in EXPORT_PATIENTS:
            summaries.append(
                export_cases(
                    exported["uri"],
                    exported["datalist"],
                    exported["dir"],
                    split=split_of(exported["datalist"], patient),
                    cases=[patient],
                    num_samples=NUM_SAMPLES,
                    seed=0,
                    dicom_root=exported["dicom_root"],
                    full_volume=True,
                    dicom_seg=True,
                    tracking_uri=exported["tracking_uri"],
                    progress=False,
                )
            )
    assert _hashes(exported["dir"]) == before
    assert all(not s.exported and s.existing and s.exit_code == 0 for s in summaries)
    assert "not overwritten (pass --overwrite)" in caplog.text


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--seed", "1", "seed 0"),
        ("--min-iou", "0.7", "min_iou 0.5"),  # the hypotheses would be grouped otherwise than the folder's
        ("--confidence", "0.9", "confidence 0.95"),
    ],
)
def test_another_seed_or_grouping_into_the_same_folder_is_refused_with_the_settings_named(
    exported, capsys, option, value, named
):
    before = _hashes(exported["dir"])
    code = main(
        [
            "--model", exported["uri"], "--tracking-uri", exported["tracking_uri"],
            "--datalist", str(exported["datalist"]), "--split", split_of(exported["datalist"], EXPORT_PATIENTS[0]),
            "--cases", EXPORT_PATIENTS[0], "--num-samples", str(NUM_SAMPLES), option, value,
            "--output-dir", str(exported["dir"]), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert named in error and "--overwrite" in error
    assert _hashes(exported["dir"]) == before


@pytest.mark.parametrize(("option", "value"), [("--min-iou", "0"), ("--min-iou", "1.5"), ("--confidence", "1")])
def test_a_min_iou_or_confidence_out_of_range_is_a_usage_error(tmp_path, capsys, option, value):
    out = tmp_path / "exp"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "models:/none/1", "--datalist", "d.json", "--output-dir", str(out), option, value])
    assert exit_info.value.code == 2 and f"{option} must lie in" in capsys.readouterr().err
    assert not out.exists()


def _readable(path: Path) -> None:
    if path.name.endswith(".nii.gz"):
        np.asarray(nib.load(path).dataobj)
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".png":
        from PIL import Image

        Image.open(path).load()
    elif path.suffix == ".csv":
        list(csv.reader(path.open()))


@pytest.mark.slow  # two export subprocesses, the second over a whole split
def test_sigkill_mid_export_leaves_no_partial_file_and_a_rerun_finishes(clean_run, export_model, tmp_path, lidc_home):
    datalist = clean_run / "datalist.json"
    # the smallest split that still leaves cases after the kill (test: 9 crops), so the rerun exports few
    sizes = {s: len(items) for s, items in json.loads(datalist.read_text()).items() if isinstance(items, list)}
    split = min((s for s in ("training", "validation", "test") if sizes[s] >= 5), key=sizes.get)
    total = sizes[split]
    out = tmp_path / "exp"
    command = [
        sys.executable, "-m", "car_med.export", "--model", export_model["uri"],
        "--tracking-uri", export_model["tracking_uri"], "--datalist", str(datalist), "--split", split,
        "--num-samples", "8", "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(lidc_home)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*/*/case.json"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(out.glob("*/*/case.json")))
    assert 2 <= done < total, "the export must be killed midway for this test to mean anything"
    for path in out.rglob("*"):
        if path.is_file() and ".incomplete" not in path.parts:
            _readable(path)  # every file under its final name is whole
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(out.glob("*/*/case.json"))) == total
    assert f"{total - done} cases exported" in result.stdout
    assert not (out / ".incomplete").exists()
    with open(out / "manifest.csv") as handle:
        assert len(list(csv.DictReader(handle))) == total


@pytest.fixture
def bad_datalist(clean_run, tmp_path):
    """A datalist whose items are: fine; image missing; image holding NaN; a patient id that tries to escape."""
    content = json.loads((clean_run / "datalist.json").read_text())
    items = [dict(item) for item in content["training"][:4]]
    for item in items:
        item["image"] = str(clean_run / item["image"])
        item["label"] = [str(clean_run / p) for p in item["label"]]
    items[1]["image"] = str(tmp_path / "gone_image.nii.gz")
    source = nib.load(items[2]["image"])
    broken = np.asarray(source.dataobj).astype(np.float32)
    broken[5, 5, 0] = np.nan
    nib.save(nib.Nifti1Image(broken, source.affine), tmp_path / "nan_image.nii.gz")
    items[2]["image"] = str(tmp_path / "nan_image.nii.gz")
    items[3]["patient_id"] = "../../escaped"
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items, "validation": [], "test": []}))
    return path, items


def test_bad_cases_fail_in_the_manifest_and_the_others_still_export(bad_datalist, export_model, tmp_path):
    path, items = bad_datalist
    out = tmp_path / "exp"
    summary = export_cases(
        export_model["uri"], path, out, split="training", num_samples=NUM_SAMPLES,
        tracking_uri=export_model["tracking_uri"], progress=False,
    )  # fmt: skip
    assert summary.exit_code == 1 and len(summary.exported) == 2 and len(summary.failed) == 2
    with open(out / "manifest.csv") as handle:
        rows = {r["patient_id"]: r for r in csv.DictReader(handle)}
    failed = [r for r in rows.values() if r["status"] == "error"]
    assert sorted(r["error"].split(" ")[0] for r in failed) == ["image", "image"]
    assert any("does not exist" in r["error"] and "gone_image" in r["error"] for r in failed)
    assert any("NaN or Inf" in r["error"] for r in failed)
    escaped = rows["../../escaped"]
    assert escaped["status"] == "ok" and escaped["folder"].startswith("escaped/")
    assert (out / escaped["folder"] / "samples.nii.gz").is_file()
    assert not (tmp_path.parent / "escaped").exists()
