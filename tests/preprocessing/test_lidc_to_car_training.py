"""End to end: DICOM cohort -> preprocessing -> car_med.data.lidc loaders -> stage 1 and stage 2 -> samples."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from tiny_car import make_stage2_trainer, make_tiny_nets

from car_med.data.lidc import lidc_dataset
from car_med.engines import NonFiniteLossGuard
from car_med.losses import PixelwiseCrossEntropyLoss
from car_med.sampling import CARSampler


@pytest.mark.slow
def test_preprocessed_crops_train_both_stages_and_sample(clean_run):
    torch.manual_seed(0)
    datalist = clean_run / "datalist.json"
    train = lidc_dataset(datalist, "training", mode="train")
    loader = DataLoader(train, batch_size=4, shuffle=True)
    f, g, d = make_tiny_nets()
    stage1 = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=loader,
        network=f,
        optimizer=torch.optim.Adam(f.parameters(), 1e-3),
        loss_function=PixelwiseCrossEntropyLoss(),
        train_handlers=[NonFiniteLossGuard(name="stage 1 (F)")],
        decollate=False,
    )
    stage1.run()
    assert math.isfinite(float(stage1.state.output["loss"].detach()))

    f_state = {k: v.clone() for k, v in f.state_dict().items()}
    stage2 = make_stage2_trainer(f, g, d, loader, num_samples=2, epoch_length=2)
    stage2.run()
    out = stage2.state.output
    assert out["image"].shape == (4, 1, 128, 128) and out["label"].shape == (4, 1, 128, 128)
    assert out["samples"].shape == (4, 2, 2, 128, 128)
    assert all(math.isfinite(float(out[k])) for k in ("loss_g", "loss_adv", "loss_cal", "loss_d", "loss_r1"))
    assert all(torch.equal(v, f_state[k]) for k, v in f.state_dict().items())

    # evaluation items keep every reader; the sampler draws M samples per crop from them
    evaluation = lidc_dataset(datalist, "test", mode="eval")
    batch = next(iter(DataLoader(evaluation, batch_size=1)))
    drawn = CARSampler(f, g, num_samples=3)(batch["image"], generator=torch.Generator().manual_seed(0))
    assert drawn.samples.shape == (1, 3, 128, 128) and batch["label"].shape[2:] == (128, 128)
