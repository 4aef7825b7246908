"""The steps of an LIDC evaluation, each on its own: the 2D draw and scores, the 3D draw, the report files."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_car import make_tiny_nets

from car_med.data.lidc import load_lidc_datalist
from car_med.evaluation import (
    LidcEvaluationSettings,
    draw_nodule_volumes,
    evaluate_lidc,
    score_split,
    with_case_index,
    write_lidc_report_files,
)
from car_med.evaluation.volumes import NoduleVolumes
from car_med.sampling import SamplerOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from lidc_synth import write_item  # noqa: E402

ROI = (64, 64)
SETTINGS = LidcEvaluationSettings(
    ged_counts=(4,), hm_iou_counts=(4,), diversity_count=4, volume_samples=4, roi_size=ROI
)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    """A test split of three crops: nodule 1 on two slices of one image (z -1.5 and -0.5), nodule 2 on one."""
    root = tmp_path_factory.mktemp("lidc_steps")
    first = write_item(root, "n1_z0", 1, "LIDC-IDRI-0001")
    second = {**write_item(root, "n1_z1", 1, "LIDC-IDRI-0001"), "slice_z": first["slice_z"] + 1.0}
    other = write_item(root, "n2_z0", 2, "LIDC-IDRI-0001")
    path = root / "datalist.json"
    path.write_text(json.dumps({"test": [first, second, other]}))
    return path


@pytest.fixture(scope="module")
def started(datalist):
    f, g, _ = make_tiny_nets(seed=3)
    cases = with_case_index(load_lidc_datalist(datalist, "test"))
    return SamplerOptions(max_batch=8).sampler(f, g), cases


def test_score_split_scores_every_crop_beside_the_reference_rows_in_order(started):
    sampler, cases = started
    volumes = NoduleVolumes(4)
    scored = score_split(sampler, cases, SETTINGS, montage_cases=2, volumes=volumes)

    assert [row["case_index"] for row in scored.rows] == [0, 1, 2]
    assert [row["nodule_id"] for row in scored.rows] == [1, 1, 2]
    assert {"ged4", "hm_iou4", "diversity4", "ece"} <= set(scored.metrics)
    assert all(0.0 <= scored.metrics[name] <= 1.0 for name in ("hm_iou4", "ece"))
    assert set(scored.reference_metrics()) == set(SETTINGS.reference_rows)
    # the readers' own outlines are far closer to the readers than an untrained G's
    assert scored.reference_metrics()["readers_oracle"]["ged4"] < 0.5 * scored.metrics["ged4"]
    assert len(scored.per_case()["ged4"]) == 3 and len(scored.montage) == 2
    # noise="case": the 3D volumes come from this same draw, one per nodule
    assert [row["num_slices"] for row in volumes.per_nodule()] == [2, 1]
    again = score_split(sampler, cases, SETTINGS)
    assert again.metrics == scored.metrics  # seeded per case


def test_draw_nodule_volumes_gives_a_nodules_slices_one_noise(started):
    sampler, cases = started
    volumes = draw_nodule_volumes(sampler, cases, SETTINGS)
    stacks = {key[2]: (count, samples) for key, count, samples, _ in volumes.stacks()}
    assert sorted(stacks) == ["1", "2"]
    count, samples = stacks["1"]
    assert count == 2 and samples.shape[:2] == (4, 2)
    # both slices of nodule 1 show one image: with one noise vector per sample they are drawn alike
    assert torch.equal(samples[:, 0], samples[:, 1])
    # the per-crop draw gives each slice its own noise, so some sample differs between the two slices
    per_crop = NoduleVolumes(4)
    score_split(sampler, cases, SETTINGS, volumes=per_crop)
    crop_samples = next(s for key, _, s, _ in per_crop.stacks() if key[2] == "1")
    assert not torch.equal(crop_samples[:, 0], crop_samples[:, 1])


def test_report_files_are_written_and_the_card_records_settings_and_sampler(started, datalist, tmp_path):
    sampler, cases = started
    scored = score_split(sampler, cases, SETTINGS)
    volumes = draw_nodule_volumes(sampler, cases, SETTINGS)
    options = SamplerOptions(max_batch=8, min_component_size=3)
    report = write_lidc_report_files(
        tmp_path, scored, volumes, SETTINGS, datalist=datalist, sampler_options=options, checkpoint=None,
        model_label="tiny",
    )  # fmt: skip
    for name in ("per_case.csv", "per_nodule.csv", "reliability.png", "presence.png", "hypotheses_reliability.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "montage.png").is_file() and not (tmp_path / "metrics.json").exists()
    assert report["model"] == "tiny" and report["num_cases"] == 3 and report["split"] == "test"
    assert report["volumes"]["num_nodules"] == 2
    card = report["protocol"]
    assert (card["min_component_size"], card["volume_samples"], card["roi_size"]) == (3, 4, list(ROI))
    assert card["sample_counts"] == {"ged": [4], "hm_iou": [4], "diversity": 4}
    assert {k: v for k, v in report["metrics"].items() if k in scored.metrics} == scored.metrics
    assert "hypothesis_ece" in report["metrics"] and "hypothesis_ece" in report["references"]["majority_vote"]
    with open(tmp_path / "per_nodule.csv") as handle:
        per_nodule = list(csv.DictReader(handle))
    assert [row["nodule_id"] for row in per_nodule] == ["1", "2"]
    assert {"ged4_3d", "hm_iou4_3d", "hypotheses", "readers_covered"} <= set(per_nodule[0])


def test_evaluate_lidc_is_its_steps(started, datalist, tmp_path):
    sampler, cases = started
    f, g = sampler.calibration_network, sampler.refinement_network
    report = evaluate_lidc(f, g, datalist, tmp_path, settings=SETTINGS, progress=False)
    scored = score_split(sampler, cases, SETTINGS)
    assert {k: report["metrics"][k] for k in scored.metrics} == pytest.approx(scored.metrics, abs=1e-12)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == report["metrics"]


def test_settings_are_checked_before_any_sampling_and_lists_become_tuples():
    with pytest.raises(ValueError, match="noise must be one of"):
        LidcEvaluationSettings(noise="slice")
    with pytest.raises(ValueError, match="volume_samples=8 must be between 1 and the 4 samples"):
        LidcEvaluationSettings(ged_counts=[4], hm_iou_counts=[4], diversity_count=4, volume_samples=8)
    with pytest.raises(ValueError, match="min_iou"):
        LidcEvaluationSettings(hypothesis_min_iou=1.5)
    settings = LidcEvaluationSettings(ged_counts=[16], roi_size=[64, 64])
    assert settings.ged_counts == (16,) and settings.roi_size == (64, 64)
    with pytest.raises(TypeError, match="hm_iou_count"):
        LidcEvaluationSettings(hm_iou_count=(16,))
