"""Two-stage CAR training on a tiny ambiguous task: F's CE falls, G/D train, checkpoints round-trip,
gradients stay out of F, the baseline is one switch, and a NaN stops training cleanly."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver
from torch.utils.data import DataLoader

from car_med.engines import CARTrainer, DiscriminatorSchedule, NonFiniteLossError, NonFiniteLossGuard
from car_med.engines import latest_checkpoint, load_network_checkpoint
from car_med.losses import PixelwiseCrossEntropyLoss, pixelwise_cross_entropy

from .conftest import ambiguous_discs, make_tiny_nets


class _RandomAnnotatorBatches(torch.utils.data.Dataset):
    """Items with one annotator's mask chosen per item, seeded, as the LIDC training transform does."""

    def __init__(self, items, seed=0, poison_index=None):
        self.items, self.seed, self.poison_index = items, seed, poison_index

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        k = int(torch.randint(0, item["labels"].shape[0], (1,), generator=torch.Generator().manual_seed(self.seed + i)))
        image = item["image"].clone()
        if self.poison_index is not None and i == self.poison_index:
            image[:] = float("nan")
        return {"image": image, "label": item["labels"][k : k + 1]}


def _mean_ce(f, items):
    f.eval()
    with torch.no_grad():
        image = torch.stack([it["image"] for it in items])
        label = torch.stack([it["labels"][0:1] for it in items])
        return float(pixelwise_cross_entropy(f(image), label))


def _stage2(f, g, d, loader, **kwargs):
    return CARTrainer(
        device="cpu",
        max_epochs=kwargs.pop("max_epochs", 1),
        train_data_loader=loader,
        calibration_network=f,
        refinement_network=g,
        discriminator=d,
        g_optimizer=torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.99)),
        d_optimizer=torch.optim.Adam(d.parameters(), 1e-5, betas=(0.5, 0.99)),
        noise_dim=g.noise_dim,
        num_classes=2,
        **kwargs,
    )


def test_two_stage_training_lowers_ce_and_checkpoints_load_back(tmp_path):
    torch.manual_seed(0)
    f, g, d = make_tiny_nets()
    items = ambiguous_discs(16)
    loader = DataLoader(_RandomAnnotatorBatches(items), batch_size=8, shuffle=True)
    ce_before = _mean_ce(f, items)
    stage1 = SupervisedTrainer(
        device="cpu", max_epochs=15, train_data_loader=loader, network=f,
        optimizer=torch.optim.Adam(f.parameters(), 3e-3), loss_function=PixelwiseCrossEntropyLoss(),
        train_handlers=[NonFiniteLossGuard()], decollate=False,
    )
    stage1.run()
    ce_after = _mean_ce(f, items)
    assert ce_after < 0.6 * ce_before, (ce_before, ce_after)

    f_before = {k: v.clone() for k, v in f.state_dict().items()}
    trainer = _stage2(f, g, d, loader, num_samples=3, lambda_cal=1.0)
    save_dict = {"calibration_network": f, "refinement_network": g, "discriminator": d}
    CheckpointSaver(str(tmp_path), save_dict, file_prefix="stage2", save_final=True).attach(trainer)
    trainer.run()
    out = trainer.state.output
    assert {"loss_g", "loss_adv", "loss_cal", "loss_d", "loss_r1", "d_accuracy"} <= set(out)
    assert out["loss_cal"] >= 0 and out["loss_r1"] >= 0
    # stage 2 never changes F
    for k, v in f.state_dict().items():
        assert torch.equal(v, f_before[k]), k

    path = latest_checkpoint(tmp_path, "stage2")
    assert path is not None
    f2, g2, d2 = make_tiny_nets(seed=123)
    load_network_checkpoint(g2, path, key="refinement_network")
    load_network_checkpoint(f2, path, key="calibration_network")
    for k, v in g.state_dict().items():
        assert torch.equal(v, g2.state_dict()[k]), k
    assert _mean_ce(f2, items) == pytest.approx(ce_after, rel=1e-6)


def test_generator_loss_gradients_reach_g_and_never_f():
    """L_G = L_adv + lambda * L_cal built on F's *differentiable* output: nothing may flow back into F."""
    from car_med.losses import categorical_calibration_loss, generator_adversarial_loss
    from car_med.sampling import fold_for_sampling

    f, g, d = make_tiny_nets()
    f.train(), g.train()
    image = torch.stack([it["image"] for it in ambiguous_discs(2)])
    calibration = torch.softmax(f(image), dim=1)  # graph to F's weights kept on purpose
    assert calibration.requires_grad
    image_folded, calibration_folded = fold_for_sampling(image, calibration, 3)
    fake = g(image_folded, calibration_folded, torch.randn(6, g.noise_dim))
    loss_g = generator_adversarial_loss(d(image_folded, fake)) + categorical_calibration_loss(
        fake.reshape(2, 3, *fake.shape[1:]), calibration
    )
    loss_g.backward()
    assert all(p.grad is None for p in f.parameters())
    g_grads = [p.grad for p in g.parameters()]
    assert all(gr is not None for gr in g_grads) and sum(float(gr.abs().sum()) for gr in g_grads) > 0


def test_trainer_leaves_f_without_gradients():
    f, g, d = make_tiny_nets()
    loader = DataLoader(_RandomAnnotatorBatches(ambiguous_discs(4)), batch_size=4)
    trainer = _stage2(f, g, d, loader, num_samples=2)
    grads = {}

    def grab(engine):
        grads["f"] = [p.grad for p in f.parameters()]
        grads["g"] = [p.grad for p in g.parameters()]

    trainer.add_event_handler(Events.ITERATION_COMPLETED, grab)
    trainer.run()
    assert all(gr is None or gr.abs().sum() == 0 for gr in grads["f"])
    assert sum(float(gr.abs().sum()) for gr in grads["g"] if gr is not None) > 0


def test_cross_entropy_baseline_is_one_switch():
    f, g, d = make_tiny_nets()
    loader = DataLoader(_RandomAnnotatorBatches(ambiguous_discs(4)), batch_size=4)
    trainer = _stage2(f, g, d, loader, num_samples=2, regulariser="cross_entropy")
    trainer.run()
    assert "loss_ce" in trainer.state.output and "loss_cal" not in trainer.state.output
    assert trainer.state.output["loss_ce"] > 0


def test_discriminator_schedule_gates_d_steps():
    schedule = DiscriminatorSchedule(period=250, active=50, max_accuracy=0.85)
    assert schedule.should_step(1, None) and schedule.should_step(50, 0.5)
    assert not schedule.should_step(51, 0.5) and schedule.should_step(251, 0.5)
    assert not schedule.should_step(10, 0.9)
    f, g, d = make_tiny_nets()
    loader = DataLoader(_RandomAnnotatorBatches(ambiguous_discs(8)), batch_size=2)
    trainer = _stage2(f, g, d, loader, num_samples=2, d_schedule=DiscriminatorSchedule(period=2, active=1))
    stepped = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stepped.append(e.state.output["d_stepped"]))
    trainer.run()
    assert stepped == [1.0, 0.0, 1.0, 0.0]


def test_accuracy_gate_reopens_when_d_falls_behind():
    """A gated D is still measured in its window, so it steps again once its accuracy drops."""
    f, g, d = make_tiny_nets()
    loader = DataLoader(_RandomAnnotatorBatches(ambiguous_discs(12)), batch_size=2)
    trainer = _stage2(f, g, d, loader, num_samples=2, d_schedule=DiscriminatorSchedule(max_accuracy=0.75))
    log = []

    def record(engine):
        log.append((engine.state.output["d_stepped"], engine.state.output["d_accuracy"]))
        # force the measured accuracy up or down: alternate a "too good" and a "too weak" D
        trainer._last_d_accuracy = 0.9 if engine.state.iteration % 2 == 1 else 0.1

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    stepped = [s for s, _ in log]
    assert stepped == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert all(0.0 <= acc <= 1.0 for _, acc in log)


def test_stage2_rejects_bad_labels_with_clear_messages():
    f, g, d = make_tiny_nets()
    image = torch.randn(2, 1, 32, 32)
    cases = [
        (torch.full((2, 1, 32, 32), 0.7), "non-integer floats"),
        (torch.full((2, 1, 32, 32), 3), r"label values must be in \[0, 1\]"),
        (torch.zeros(2, 4, 32, 32, dtype=torch.long), r"expected one class-index map per image"),
    ]
    for label, message in cases:
        trainer = _stage2(f, g, d, [{"image": image, "label": label}], num_samples=2)
        with pytest.raises(ValueError, match=message):
            trainer.run()


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    f, g, d = make_tiny_nets()
    items = ambiguous_discs(6)
    loader = DataLoader(_RandomAnnotatorBatches(items, poison_index=4), batch_size=1, shuffle=False)
    trainer = _stage2(f, g, d, loader, num_samples=2)
    save_dict = {"refinement_network": g, "discriminator": d}
    CheckpointSaver(str(tmp_path), save_dict, file_prefix="stage2", epoch_level=False, save_interval=1, n_saved=1).attach(trainer)
    seen = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.update({e.state.iteration: {k: v.clone() for k, v in g.state_dict().items()}})
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
    loader = DataLoader(_RandomAnnotatorBatches(ambiguous_discs(3), poison_index=1), batch_size=1)
    stage1 = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=loader, network=f,
        optimizer=torch.optim.SGD(f.parameters(), 0.1), loss_function=PixelwiseCrossEntropyLoss(),
        train_handlers=[NonFiniteLossGuard(name="stage 1 (F)")], decollate=False,
    )
    with pytest.raises(NonFiniteLossError, match="stage 1 \\(F\\): non-finite loss at iteration 2"):
        stage1.run()
    assert all(torch.isfinite(p).all() for p in f.parameters())


def test_loading_a_checkpoint_of_the_wrong_network_says_what_was_expected(tmp_path):
    f, g, d = make_tiny_nets()
    path = tmp_path / "ckpt.pt"
    torch.save({"refinement_network": g.state_dict(), "discriminator": d.state_dict()}, path)
    with pytest.raises(ValueError, match="does not hold a Discriminator"):
        load_network_checkpoint(make_tiny_nets()[2], path, key="refinement_network")
    wider = make_tiny_nets()[1].__class__(image_channels=1, num_classes=2, noise_dim=g.noise_dim + 3, channels=(8, 16, 16, 16))
    with pytest.raises(ValueError, match="wrong shape"):
        load_network_checkpoint(wider, path, key="refinement_network")
    with pytest.raises(ValueError, match="no entry 'generator'"):
        load_network_checkpoint(g, path, key="generator")
    with pytest.raises(FileNotFoundError):
        load_network_checkpoint(g, tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"regulariser": "dice"}, "regulariser"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_car_trainer_rejects_bad_settings(kwargs, message):
    f, g, d = make_tiny_nets()
    args = {"num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        CARTrainer(
            device="cpu", max_epochs=1, train_data_loader=[], calibration_network=f, refinement_network=g,
            discriminator=d, g_optimizer=torch.optim.Adam(g.parameters()), d_optimizer=torch.optim.Adam(d.parameters()),
            noise_dim=g.noise_dim, **args,
        )
