"""ECE, reliability data and plot, and the stochastic-class calibration offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from car_med.metrics import (
    CITYSCAPES_STOCHASTIC_CLASSES,
    ExpectedCalibrationError,
    ReliabilityData,
    StochasticClassCalibration,
    calibration_bin_statistics,
    class_calibration_offsets,
    expected_calibration_error,
    plot_reliability_diagram,
)


def _binary_probs(p0):
    p0 = torch.as_tensor(p0, dtype=torch.float64)
    return torch.stack([p0, 1.0 - p0], dim=0)  # (C=2, pixels)


def test_ece_is_zero_for_perfectly_calibrated_probabilities():
    # per bin: 20 pixels at confidence k/20 (k = 11..19) of which exactly k are right, so accuracy == confidence
    probs, target = [], []
    for k in range(11, 20):
        conf = k / 20
        for i in range(20):
            correct = i < k
            probs.append(conf if i % 2 else 1 - conf)  # predict class 0 or class 1 alternately
            pred = 0 if i % 2 else 1
            target.append(pred if correct else 1 - pred)
    p = _binary_probs(probs).reshape(2, 9, 20).unsqueeze(0)  # (1, 2, 9, 20)
    t = torch.tensor(target).reshape(1, 9, 20)
    ece, data = expected_calibration_error(p, t)
    assert float(ece) == pytest.approx(0.0, abs=1e-12)
    nonempty = data.count > 0
    torch.testing.assert_close(data.accuracy[nonempty], data.confidence[nonempty])
    assert int(data.count.sum()) == 180


def test_ece_matches_a_hand_computation():
    # confidences 0.92, 0.81, 0.67, 0.57, 0.95 with predictions 0, 0, 1, 0, 0 and targets 0, 1, 1, 1, 0
    p = _binary_probs([0.92, 0.81, 0.33, 0.57, 0.95]).reshape(1, 2, 5)
    t = torch.tensor([[0, 1, 1, 1, 0]])
    ece, data = expected_calibration_error(p, t)
    # bin (0.9, 1]: 2 pixels, conf 0.935, acc 1; (0.8, 0.9]: conf .81 acc 0; (0.6, 0.7]: .67 vs 1; (0.5, 0.6]: .57 vs 0
    expected = (2 * abs(1 - 0.935) + 0.81 + 0.33 + 0.57) / 5
    assert float(ece) == pytest.approx(expected, abs=1e-12)
    assert data.count.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 1, 2]
    assert float(data.confidence[9]) == pytest.approx(0.935)
    assert float(data.accuracy[6]) == 1.0
    assert torch.isnan(data.confidence[0])


def test_bins_are_right_closed_as_in_guo():
    p = _binary_probs([0.5, 0.7, 1.0, 0.6]).reshape(1, 2, 4)
    stats = calibration_bin_statistics(p, torch.zeros(1, 4, dtype=torch.long))
    # 0.5 -> (0.4, 0.5], 0.7 -> (0.6, 0.7], 1.0 -> (0.9, 1.0], 0.6 -> (0.5, 0.6]
    assert stats[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 1]


def test_integer_one_hot_and_soft_targets():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 6, 5), dim=1)
    target = torch.randint(0, 4, (2, 6, 5))
    ece, data = expected_calibration_error(probs, target)
    one_hot = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    ece_oh, _ = expected_calibration_error(probs, one_hot)
    ece_ch, _ = expected_calibration_error(probs, target.unsqueeze(1))
    torch.testing.assert_close(ece, ece_oh)
    torch.testing.assert_close(ece, ece_ch)
    # a soft target credits the mass it puts on the predicted class
    soft = torch.full_like(probs, 0.25)
    _, soft_data = expected_calibration_error(probs, soft)
    nonempty = soft_data.count > 0
    torch.testing.assert_close(soft_data.accuracy[nonempty], torch.full_like(soft_data.accuracy[nonempty], 0.25))


def test_ignore_index_excludes_pixels():
    probs = _binary_probs([0.9, 0.8, 0.7]).reshape(1, 2, 3)
    t = torch.tensor([[0, 255, 1]])
    ece, data = expected_calibration_error(probs, t, ignore_index=255)
    assert int(data.count.sum()) == 2
    assert float(ece) == pytest.approx((0.1 + 0.7) / 2)


def test_ece_metric_pools_bins_over_batches_not_per_image_means():
    torch.manual_seed(1)
    probs = torch.softmax(3 * torch.randn(5, 3, 8, 8), dim=1)
    target = torch.randint(0, 3, (5, 8, 8))
    target[0, :4] = 255  # images with different numbers of valid pixels make pooled != mean of per-image
    metric = ExpectedCalibrationError(n_bins=10, ignore_index=255)
    metric(y_pred=probs[:2], y=target[:2])
    metric(y_pred=probs[2:], y=target[2:])
    pooled, data = expected_calibration_error(probs, target, ignore_index=255)
    torch.testing.assert_close(metric.aggregate(), pooled)
    torch.testing.assert_close(metric.reliability().count, data.count)
    per_image = metric.aggregate("none")
    assert per_image.shape == (5,)
    for b in range(5):
        single, _ = expected_calibration_error(probs[b : b + 1], target[b : b + 1], ignore_index=255)
        torch.testing.assert_close(per_image[b], single)
    assert abs(float(per_image.mean()) - float(pooled)) > 1e-4


def test_ece_bad_inputs_raise_value_errors_naming_shapes():
    probs = torch.softmax(torch.randn(2, 3, 4, 4), dim=1)
    with pytest.raises(ValueError, match="float labels") as err:
        expected_calibration_error(probs, torch.zeros(2, 1, 4, 4))
    assert "(2, 1, 4, 4)" in str(err.value)
    with pytest.raises(ValueError, match="does not match") as err:
        expected_calibration_error(probs, torch.zeros(1, 4, 4, dtype=torch.long))
    assert "(1, 4, 4)" in str(err.value) and "(2, 3, 4, 4)" in str(err.value)
    with pytest.raises(ValueError, match="does not match"):
        expected_calibration_error(probs, torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="class id out of range") as err:
        expected_calibration_error(probs, torch.full((2, 4, 4), 3))
    assert "C=3" in str(err.value)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(probs * 3, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="C >= 2"):
        expected_calibration_error(probs[:, :1], torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(probs, probs * 0.5)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(probs, torch.zeros(2, 4, 4, dtype=torch.long), n_bins=0)


def test_reliability_diagram_plot(tmp_path):
    count = [0, 0, 0, 0, 5, 10, 10, 20, 30, 50]
    conf_sum = [0, 0, 0, 0, 2.3, 5.5, 6.4, 15, 25.5, 47.5]
    acc_sum = [0, 0, 0, 0, 2, 5, 6, 13, 24, 47]
    data = ReliabilityData.from_bin_sums(torch.tensor([count, conf_sum, acc_sum], dtype=torch.float64))
    path = tmp_path / "sub" / "reliability.png"
    fig = plot_reliability_diagram(data, path)
    assert path.exists() and path.stat().st_size > 1000
    ax = fig.axes[0]
    assert "ECE" in ax.get_title()
    # ten accuracy bars plus one gap bar per non-empty bin
    assert len(ax.patches) == 10 + 6


def _cityscapes_batch():
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[:, :2] = 1  # sidewalk: 16 px per image
    label[:, 2:4] = 11  # person
    label[:, 4:6] = 13  # car
    label[:, 6, :] = 8  # vegetation
    label[:, 7, :] = 5  # pole: never counted
    label[1, 0, :] = 19  # already flipped sidewalk still has base class sidewalk
    return label


def test_class_calibration_offsets_for_probs_and_samples():
    label = _cityscapes_batch()
    probs = torch.zeros(2, 25, 8, 8)
    probs[:, 0] = 1.0
    pred_flip = {19: 0.5, 20: 7 / 17, 21: 0.2, 22: 0.0, 23: 0.9}
    for base, flipped, _ in CITYSCAPES_STOCHASTIC_CLASSES:
        region = (label == base) | (label == flipped)
        probs[:, flipped][region] = pred_flip[flipped]
        probs[:, 0][region] = 1.0 - pred_flip[flipped]
    # 17 samples: sidewalk flipped in 8 of them (calibrated), person in all of them, car never
    samples = label.unsqueeze(1).repeat(1, 17, 1, 1)
    sidewalk = ((label == 1) | (label == 19)).unsqueeze(1)
    samples[:, :8][sidewalk.expand(-1, 8, -1, -1)] = 19
    samples[:, 8:][sidewalk.expand(-1, 9, -1, -1)] = 1
    samples[(label == 11).unsqueeze(1).expand(-1, 17, -1, -1)] = 20

    res = class_calibration_offsets(label, probs=probs, samples=samples)
    f, g = res["probs"], res["samples"]
    true = torch.tensor([p for _, _, p in CITYSCAPES_STOCHASTIC_CLASSES], dtype=torch.float64)
    torch.testing.assert_close(f.true_probs, true)
    assert f.pixel_count.tolist() == [32, 32, 32, 16, 0]
    torch.testing.assert_close(f.predicted[:4], torch.tensor([0.5, 7 / 17, 0.2, 0.0], dtype=torch.float64))
    assert torch.isnan(f.predicted[4])  # no road pixel: undefined, left out of the mean
    predicted = torch.tensor([0.5, 7 / 17, 0.2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(f.offsets[:4], (predicted - true[:4]).abs())
    assert f.mean_offset == pytest.approx(float(f.offsets[:4].mean()))
    assert g.pixel_count.tolist() == [32 * 17, 32 * 17, 32 * 17, 16 * 17, 0]
    torch.testing.assert_close(g.predicted[:4], torch.tensor([8 / 17, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert float(g.offsets[0]) == pytest.approx(0.0, abs=1e-12)


def test_stochastic_class_metric_pools_and_custom_pairs():
    label = _cityscapes_batch()
    probs = torch.softmax(torch.randn(2, 25, 8, 8), dim=1)
    metric = StochasticClassCalibration(source="probs", reduction="none")
    metric(y_pred=probs[:1], y=label[:1])
    metric(y_pred=probs[1:], y=label[1:].unsqueeze(1))
    expected = class_calibration_offsets(label, probs=probs)["probs"]
    torch.testing.assert_close(metric.aggregate(), expected.offsets, equal_nan=True)
    assert float(metric.aggregate("mean")) == pytest.approx(expected.mean_offset)

    custom = class_calibration_offsets(label, probs=probs[:, :3], stochastic_classes=[(1, 2, 0.25)])["probs"]
    region = (label == 1) | (label == 2)
    assert float(custom.predicted[0]) == pytest.approx(float(probs[:, 2][region].double().mean()))
    assert custom.base_classes == (1,) and custom.flipped_classes == (2,)


def test_class_calibration_bad_inputs():
    label = _cityscapes_batch()
    with pytest.raises(ValueError, match="class id out of range"):
        class_calibration_offsets(label, probs=torch.full((2, 10, 8, 8), 0.1))
    with pytest.raises(ValueError, match="does not match") as err:
        class_calibration_offsets(label[:, :4], samples=torch.zeros(2, 16, 8, 8, dtype=torch.long))
    assert "(2, 4, 8)" in str(err.value) and "(2, 16, 8, 8)" in str(err.value)
    with pytest.raises(ValueError, match="integer label maps"):
        class_calibration_offsets(label, samples=torch.zeros(2, 16, 8, 8))
    with pytest.raises(ValueError, match="probability"):
        class_calibration_offsets(
            label, samples=torch.zeros(2, 16, 8, 8, dtype=torch.long), stochastic_classes=[(1, 19, 1.5)]
        )
    with pytest.raises(ValueError, match="needs probs"):
        class_calibration_offsets(label)


def test_reliability_data_requires_three_rows():
    with pytest.raises(ValueError, match=r"\(3, n_bins\)"):
        ReliabilityData.from_bin_sums(torch.zeros(2, 10))
    assert np.isnan(ReliabilityData.from_bin_sums(torch.zeros(3, 10)).ece)
