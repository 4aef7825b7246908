"""A NaN or Inf loss stops either stage before the optimiser step; weights and checkpoints stay good.

(car_med.engines.guards)
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver
from tiny_car import RandomAnnotatorBatches, ambiguous_discs, make_stage2_trainer, make_tiny_nets
from torch.utils.data import DataLoader

from car_med.engines import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    latest_checkpoint,
    load_network_checkpoint,
)
from car_med.losses import PixelwiseCrossEntropyLoss


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    f, g, d = make_tiny_nets()
    items = ambiguous_discs(6)
    loader = DataLoader(RandomAnnotatorBatches(items, poison_index=4), batch_size=1, shuffle=False)
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2)
    save_dict = {"refinement_network": g, "discriminator": d}
    CheckpointSaver(
        str(tmp_path), save_dict, file_prefix="stage2", epoch_level=False, save_interval=1, n_saved=1
    ).attach(trainer)
    seen = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.update({e.state.iteration: {k: v.clone() for k, v in g.state_dict().items()}}),
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 5 .*checkpoint are intact"):
        trainer.run()
    path = latest_checkpoint(tmp_path, "stage2")
    assert path.endswith("=4.pt")
    restored = make_tiny_nets(seed=9)[1]
    load_network_checkpoint(restored, path, key="refinement_network")
    for k, v in restored.state_dict().items():
        assert torch.isfinite(v.float()).all(), k
        assert torch.equal(v, seen[4][k]), k
    # the weights in memory were never touched by the NaN either
    for k, v in g.state_dict().items():
        assert torch.equal(v, seen[4][k]), k


def test_stage1_guard_stops_on_nan_before_the_step():
    f, _, _ = make_tiny_nets()
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(3), poison_index=1), batch_size=1)
    stage1 = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader,
        network=f,
        optimizer=torch.optim.SGD(f.parameters(), 0.1),
        loss_function=PixelwiseCrossEntropyLoss(),
        train_handlers=[NonFiniteLossGuard(name="stage 1 (F)")],
        decollate=False,
    )
    with pytest.raises(NonFiniteLossError, match="stage 1 \\(F\\): non-finite loss at iteration 2"):
        stage1.run()
    assert all(torch.isfinite(p).all() for p in f.parameters())
