"""Stage-1 batch preparation: F's target by key (car_med.engines.batches)."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer

from car_med.engines import PrepareBatchWithTarget, calibration_target_batch, calibration_target_shares_key
from car_med.losses import PixelwiseCrossEntropyLoss


def _batches(n: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        readers = (torch.rand(4, 4, 8, 8, generator=g) > 0.7).long()
        shares = torch.nn.functional.one_hot(readers, 2).float().mean(1).movedim(-1, 1)
        yield {"image": torch.rand(4, 1, 8, 8, generator=g), "label": readers[:, :1], "label_shares": shares}


def test_stage1_trainer_fits_the_target_the_key_names():
    batch = next(_batches(1))
    image, target = calibration_target_batch("readers_mean")(batch)
    assert image is batch["image"] and torch.equal(target, batch["label_shares"])
    image, target = calibration_target_batch("one_reader")(batch)
    assert torch.equal(target, batch["label"])
    assert calibration_target_shares_key("one_reader") is None
    assert calibration_target_shares_key("readers_mean") == "label_shares"

    # a SupervisedTrainer with it computes the loss on the shares, not on the drawn reader
    net = torch.nn.Conv2d(1, 2, 1)
    seen = []

    def loss(logits, target):
        seen.append(target.shape[1])
        return PixelwiseCrossEntropyLoss()(logits, target)

    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=list(_batches(3)),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=loss,
        prepare_batch=calibration_target_batch("readers_mean"),
        decollate=False,
    )
    trainer.run()
    assert seen == [2, 2, 2]


def test_bad_target_names_are_clear():
    with pytest.raises(ValueError, match=r"f_target must be one of \['one_reader', 'readers_mean'\], got 'mean'"):
        calibration_target_batch("mean")
    with pytest.raises(ValueError, match="f_target must be one of"):
        calibration_target_shares_key("shares")
    with pytest.raises(KeyError, match=r"no \['label_shares'\].*shares_key='label_shares'"):
        PrepareBatchWithTarget("label_shares")({"image": torch.zeros(1), "label": torch.zeros(1)})
