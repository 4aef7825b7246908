"""hypotheses.json per crop and per nodule: the groups partition the M samples, every two members overlap with
IoU >= min_iou, and the file records how it was made; a rerun never mixes two groupings.

Every check recomputes from the exported samples files with numpy, never with the library's grouping.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from export_cohort import EXPORT_PATIENTS, NUM_SAMPLES, split_of

from car_med.export import export_cases
from car_med.hypotheses import DEFAULT_CONFIDENCE, DEFAULT_MIN_IOU


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _crop_samples(case_dir: Path) -> np.ndarray:
    """``(M, I, J)`` booleans of a case's samples.nii.gz."""
    data = np.asarray(nib.load(case_dir / "samples.nii.gz").dataobj)
    return np.moveaxis(data[:, :, 0, :] > 0, -1, 0)


def _nodule_samples(root: Path, payload: dict) -> np.ndarray:
    """``(M, D, I, J)``: the nodule's cases' samples stacked in the order hypotheses.json lists them."""
    folders = {json.loads(p.read_text())["case_id"]: p.parent for p in root.glob("*/*/case.json")}
    return np.stack([_crop_samples(folders[case]) for case in payload["samples"]["cases"]], axis=1)


def assert_hypotheses_file(
    path: Path,
    samples: np.ndarray,
    *,
    num_samples: int,
    seed: int,
    model_uri: str,
    min_iou: float = DEFAULT_MIN_IOU,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """Check one hypotheses.json against the samples it was made from; return its content."""
    payload = json.loads(path.read_text())
    assert payload["num_samples"] == num_samples == samples.shape[0]
    assert payload["seed"] == seed and payload["model"]["uri"] == model_uri
    assert payload["min_iou"] == min_iou and payload["confidence"] == confidence
    assert payload["sample_numbering"].startswith("0-based")
    rows = payload["hypotheses"]
    assert [row["rank"] for row in rows] == list(range(1, len(rows) + 1))
    assert math.isclose(sum(row["probability"] for row in rows), 1.0)
    members = sorted(m for row in rows for m in row["members"])
    assert members == list(range(num_samples))  # a partition of the sample numbers, each once
    probabilities = [row["probability"] for row in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    voxel = math.prod(payload["samples"]["spacing_mm"])
    size_key = "volume_mm3" if samples.ndim == 4 else "area_mm2"
    for row in rows:
        group = row["members"]
        assert row["representative"] in group
        assert row["count"] == len(group) and row["probability"] == len(group) / num_samples
        low, high = row["interval"]
        assert 0 <= low <= row["probability"] <= high <= 1
        ious = [_iou(samples[a], samples[b]) for i, a in enumerate(group) for b in group[i + 1 :]]
        assert all(iou >= min_iou for iou in ious), (path, row)  # complete linkage: every pair, not a chain
        assert row["mean_iou"] == pytest.approx(np.mean(ious) if ious else 1.0, abs=1e-6)
        drawn = int(samples[row["representative"]].sum())
        assert row["voxels"] == drawn and row["no_lesion"] == (drawn == 0)
        assert row[size_key] == pytest.approx(drawn * voxel, abs=1e-3)
    # two groups could not be one: some pair across any two of them overlaps less than min_iou
    for i, first in enumerate(rows):
        for second in rows[i + 1 :]:
            across = [_iou(samples[a], samples[b]) for a in first["members"] for b in second["members"]]
            assert min(across) < min_iou, (path, first["rank"], second["rank"])
    return payload


def test_every_crop_and_nodule_has_hypotheses_json_that_partition_its_samples(exported):
    root = exported["dir"]
    cases = sorted(p.parent for p in root.glob("*/*/case.json"))
    assert cases
    for case_dir in cases:
        record = json.loads((case_dir / "case.json").read_text())
        payload = assert_hypotheses_file(
            case_dir / "hypotheses.json", _crop_samples(case_dir), num_samples=NUM_SAMPLES, seed=0,
            model_uri=exported["uri"],
        )  # fmt: skip
        assert payload["level"] == "crop" and payload["case_seed"] == record["case_seed"]
        assert record["files"]["hypotheses.json"] == "hypotheses.json"
        assert record["hypotheses"] == [row["label"] for row in payload["hypotheses"]]
    nodule_files = sorted(root.glob("*/series_*/nodule_*/hypotheses.json"))
    records = [json.loads((c / "case.json").read_text()) for c in cases]
    assert len(nodule_files) == len({(r["patient_id"], r["series_uid"], r["nodule_id"]) for r in records})
    for path in nodule_files:
        payload = json.loads(path.read_text())
        samples = _nodule_samples(root, payload)
        assert samples.shape == (NUM_SAMPLES, len(payload["samples"]["cases"]), 128, 128)
        assert_hypotheses_file(path, samples, num_samples=NUM_SAMPLES, seed=0, model_uri=exported["uri"])
        assert payload["level"] == "nodule" and payload["shared_noise"] is True
        # the nodule's crops, in z order, are the ones whose case.json points at this file
        mine = [r for r in records if r["nodule_hypotheses"] == path.relative_to(root).as_posix()]
        assert payload["samples"]["cases"] == [r["case_id"] for r in sorted(mine, key=lambda r: r["slice_z"])]
        assert payload["samples"]["slices_z"] == sorted(r["slice_z"] for r in mine)
        # voxel spacing in the samples' axis order: slice spacing, then the model grid's 0.5 mm pixels
        spacing = payload["samples"]["spacing_mm"]
        assert spacing[1:] == pytest.approx([0.5, 0.5]) and spacing[0] > 0
        for row in payload["hypotheses"]:
            assert (path.parent / row["strip"]).is_file() and row["strip"] == f"strip_m{row['representative']:02d}.png"
    settings = json.loads((root / "export.json").read_text())
    assert settings["hypotheses"]["min_iou"] == DEFAULT_MIN_IOU
    assert settings["hypotheses"]["confidence"] == DEFAULT_CONFIDENCE


def test_the_manifest_lists_each_crop_s_hypotheses(exported):
    import csv

    with open(exported["dir"] / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        payload = json.loads((exported["dir"] / row["folder"] / "hypotheses.json").read_text())
        assert row["hypotheses"] == "; ".join(h["label"] for h in payload["hypotheses"])


def test_bad_min_iou_or_confidence_is_refused_before_anything_is_written(exported, tmp_path):
    for arguments, message in (({"min_iou": 0.0}, "--min-iou must lie in"), ({"confidence": 1.0}, "--confidence")):
        out = tmp_path / "exp"
        with pytest.raises(ValueError, match=message):
            export_cases(
                exported["uri"], exported["datalist"], out, cases=[EXPORT_PATIENTS[0]], num_samples=NUM_SAMPLES,
                tracking_uri=exported["tracking_uri"], progress=False, **arguments,
            )  # fmt: skip
        assert not out.exists()


def test_overwrite_with_another_min_iou_regroups_every_case_and_drops_segs_naming_the_old_groups(exported, tmp_path):
    root = tmp_path / "exp"
    shutil.copytree(exported["dir"], root)
    assert list(root.glob("*/series_*/nodule_*/seg.dcm"))
    patient = EXPORT_PATIENTS[0]
    summary = export_cases(
        exported["uri"], exported["datalist"], root, split=split_of(exported["datalist"], patient), cases=[patient],
        num_samples=NUM_SAMPLES, overwrite=True, min_iou=0.99, tracking_uri=exported["tracking_uri"], progress=False,
    )  # fmt: skip
    assert summary.exit_code == 0
    files = sorted(root.glob("*/*/hypotheses.json")) + sorted(root.glob("*/series_*/nodule_*/hypotheses.json"))
    patients = {p.relative_to(root).parts[0] for p in files}
    assert patients == set(EXPORT_PATIENTS)  # the other patient's cases were not exported again, but regrouped
    assert all(json.loads(p.read_text())["min_iou"] == 0.99 for p in files)
    # no SEG was rebuilt by this run, and the old ones name groups made with min_iou 0.5: none may stay
    assert not list(root.glob("*/series_*/nodule_*/*seg.dcm"))
    assert json.loads((root / "export.json").read_text())["hypotheses"]["min_iou"] == 0.99
