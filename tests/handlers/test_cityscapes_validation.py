"""CityscapesSampleValidation: SampleValidation with the Cityscapes suite (GED against the 32 weighted modes, the
per-class calibration offsets), its key metric chosen among the suite's names."""

from __future__ import annotations

import json

import pytest
import torch
from stand_ins import weight_moving_engine
from tiny_car import make_tiny_nets
from torch.utils.data import DataLoader

from car_med.evaluation.cityscapes import CityscapesMetricSuite
from car_med.evaluation.sample_metrics import with_case_index
from car_med.handlers.cityscapes_validation import CityscapesSampleValidation

NUM_CLASSES = 25
NUM_SAMPLES = 3
#: sidewalk, person, car, vegetation and road (the five flippable classes), a class that never flips, void
SCENE_CLASSES = torch.tensor([1, 11, 13, 8, 0, 2, 255])


def _scenes(num: int = 4, size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    items = []
    for _ in range(num):
        label = SCENE_CLASSES[torch.randint(0, len(SCENE_CLASSES), (1, size // 4, size // 4), generator=generator)]
        label = label.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # 4x4 blocks of one class
        items.append({"image": torch.rand(1, size, size, generator=generator), "label": label})
    return DataLoader(with_case_index(items), batch_size=2)


def _validation(f, g, **kwargs) -> CityscapesSampleValidation:
    return CityscapesSampleValidation(f, g, _scenes(), interval=1, num_samples=NUM_SAMPLES, seed=1, **kwargs)


def test_the_best_checkpoint_is_the_validation_with_the_lowest_key_metric(tmp_path):
    f, g, _ = make_tiny_nets(num_classes=NUM_CLASSES)
    engine, weights = weight_moving_engine(g, step_size=0.5)
    validation = _validation(
        f,
        g,
        key_metric="g_mean_offset",
        save_dict={"refinement_network": g},
        best_checkpoint=tmp_path / "best.pt",
        history_file=tmp_path / "validation.json",
        montage_dir=tmp_path / "montages",  # the Cityscapes handler draws none
    )
    validation.attach(engine)
    engine.run(range(3), max_epochs=1)

    suite_names = CityscapesMetricSuite(ged_counts=(NUM_SAMPLES,), calibration_count=NUM_SAMPLES).names
    assert [entry["iteration"] for entry in validation.history] == [1, 2, 3]
    assert all(set(entry) == {"iteration", *suite_names} for entry in validation.history)
    offsets = [entry["g_mean_offset"] for entry in validation.history]
    assert len(set(offsets)) > 1 and all(0.0 <= value <= 1.0 for value in offsets)
    best = min(validation.history, key=lambda entry: entry["g_mean_offset"])
    summary = json.loads((tmp_path / "validation.json").read_text())
    assert (summary["key_metric"], summary["best"], summary["best_iteration"]) == (
        "g_mean_offset",
        best["g_mean_offset"],
        best["iteration"],
    )
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["validation"]["iteration"] == best["iteration"]
    for name, value in weights[best["iteration"]].items():
        assert torch.equal(saved["refinement_network"][name], value)
    # G's probabilities reach the suite: its noise response is measured (0 would be a G that ignores its noise)
    assert 0.0 < engine.state.metrics["val_g_noise_response"] <= 1.2
    assert not (tmp_path / "montages").exists()
    # the LIDC reference rows (readers' oracle, majority vote) are not scored on Cityscapes labels
    assert validation.references is None
    assert not [name for name in engine.state.metrics if name.startswith("val_ref_")]


def test_the_key_metric_is_ged_unless_told_otherwise_and_must_be_a_suite_metric():
    f, g, _ = make_tiny_nets(num_classes=NUM_CLASSES)
    validation = _validation(f, g)
    assert validation.key_metric == f"ged{NUM_SAMPLES}" and validation.higher_is_better is False
    assert _validation(f, g, key_metric="f_offset_person").key_metric == "f_offset_person"
    with pytest.raises(ValueError, match="key_metric must be one of") as raised:
        _validation(f, g, key_metric="hm_iou3")  # an LIDC metric: not in the Cityscapes suite
    assert "g_mean_offset" in str(raised.value)
