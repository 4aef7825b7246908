"""Two-stage CAR training on a tiny ambiguous task: F's CE falls, G/D train, checkpoints round-trip,
gradients stay out of F, the baseline is one switch, and a NaN stops training cleanly."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver
from tiny_car import RandomAnnotatorBatches, ambiguous_discs, make_stage2_trainer, make_tiny_nets, mean_ce
from torch.utils.data import DataLoader

from car_med.engines import (
    CARKeys,
    CARTrainer,
    DiscriminatorSchedule,
    NonFiniteLossError,
    NonFiniteLossGuard,
    latest_checkpoint,
    load_network_checkpoint,
)
from car_med.losses import PixelwiseCrossEntropyLoss, pixelwise_cross_entropy


def test_two_stage_training_lowers_ce_and_checkpoints_load_back(tmp_path):
    torch.manual_seed(0)
    f, g, d = make_tiny_nets()
    items = ambiguous_discs(16)
    loader = DataLoader(RandomAnnotatorBatches(items), batch_size=8, shuffle=True)
    ce_before = mean_ce(f, items)
    stage1 = SupervisedTrainer(
        device="cpu",
        max_epochs=15,
        train_data_loader=loader,
        network=f,
        optimizer=torch.optim.Adam(f.parameters(), 3e-3),
        loss_function=PixelwiseCrossEntropyLoss(),
        train_handlers=[NonFiniteLossGuard()],
        decollate=False,
    )
    stage1.run()
    ce_after = mean_ce(f, items)
    assert ce_after < 0.6 * ce_before, (ce_before, ce_after)

    f_before = {k: v.clone() for k, v in f.state_dict().items()}
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=3, lambda_cal=1.0)
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
    assert mean_ce(f2, items) == pytest.approx(ce_after, rel=1e-6)


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
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(4)), batch_size=4)
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2)
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
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(4)), batch_size=4)
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2, regulariser="cross_entropy")
    trainer.run()
    assert "loss_ce" in trainer.state.output and "loss_cal" not in trainer.state.output
    assert trainer.state.output["loss_ce"] > 0


def test_discriminator_schedule_gates_d_steps():
    schedule = DiscriminatorSchedule(period=250, active=50, max_accuracy=0.85)
    assert schedule.should_step(1, None) and schedule.should_step(50, 0.5)
    assert not schedule.should_step(51, 0.5) and schedule.should_step(251, 0.5)
    assert not schedule.should_step(10, 0.9)
    f, g, d = make_tiny_nets()
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(8)), batch_size=2)
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2, d_schedule=DiscriminatorSchedule(period=2, active=1))
    stepped = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stepped.append(e.state.output["d_stepped"]))
    trainer.run()
    assert stepped == [1.0, 0.0, 1.0, 0.0]


def test_accuracy_gate_reopens_when_d_falls_behind():
    """A gated D is still measured in its window, so it steps again once its accuracy drops."""
    f, g, d = make_tiny_nets()
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(12)), batch_size=2)
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2, d_schedule=DiscriminatorSchedule(max_accuracy=0.75))
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
        trainer = make_stage2_trainer(f, g, d, [{"image": image, "label": label}], num_samples=2)
        with pytest.raises(ValueError, match=message):
            trainer.run()


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
            device="cpu",
            max_epochs=1,
            train_data_loader=[],
            calibration_network=f,
            refinement_network=g,
            discriminator=d,
            g_optimizer=torch.optim.Adam(g.parameters()),
            d_optimizer=torch.optim.Adam(d.parameters()),
            noise_dim=g.noise_dim,
            **args,
        )


# ------------------------------------------------------------------------------------------------------------
# What CAR promises in one stage-2 iteration (SPEC 1.2-1.3), observed through hooks on F, G and D.


class _Recorder:
    """Forward hooks that keep every call's inputs and output, detached."""

    def __init__(self, *modules):
        self.calls = {id(m): [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook(id(m))) for m in modules]

    def _hook(self, key):
        def hook(module, inputs, output):
            self.calls[key].append(
                {
                    "inputs": [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs],
                    "output": output.detach().clone(),
                    "training": module.training,
                }
            )

        return hook

    def of(self, module):
        return self.calls[id(module)]


def _distinct_batch(num: int = 3, seed: int = 0, ignore_value: int | None = None):
    items = ambiguous_discs(num, seed=seed)
    image = torch.stack([it["image"] for it in items])
    label = torch.stack([it["labels"][1:2] for it in items])
    if ignore_value is not None:
        label[:, :, :6, :] = ignore_value  # a band of void pixels at the top of every image
    return {"image": image, "label": label}


def _one_iteration(f, g, d, batch, **kwargs):
    trainer = make_stage2_trainer(f, g, d, [batch], **kwargs)
    recorder = _Recorder(f, g, d)
    trainer.run()
    return trainer, recorder


def test_d_sees_g_soft_samples_and_l_adv_averages_all_m_samples():
    f, g, d = make_tiny_nets()
    batch, m = _distinct_batch(3), 4
    trainer, rec = _one_iteration(f, g, d, batch, num_samples=m)
    out = trainer.state.output
    g_out = rec.of(g)[0]["output"]  # (B*M, C, H, W), row b*M + j is sample j of image b
    g_step, d_real, d_fake = rec.of(d)  # G step's D call, then the D step's real and fake calls
    # D scores every one of the B*M soft samples in the G step, and L_adv averages over all of them
    assert g_step["inputs"][1].shape[0] == 3 * m
    torch.testing.assert_close(g_step["inputs"][1], g_out)
    soft = ((g_out > 1e-3) & (g_out < 1 - 1e-3)).float().mean()
    assert soft > 0.9, "D must see G's softmax, not argmax one-hots"
    expected_adv = torch.nn.functional.softplus(-g_step["output"]).mean()
    assert float(out["loss_adv"]) == pytest.approx(float(expected_adv), rel=1e-5)
    # the D step: real one-hot labels, and sample 0 of each image next to its own image
    real = torch.nn.functional.one_hot(batch["label"][:, 0], 2).movedim(-1, 1).float()
    torch.testing.assert_close(d_real["inputs"][1], real)
    torch.testing.assert_close(d_fake["inputs"][1], g_out[::m])
    torch.testing.assert_close(d_fake["inputs"][0], batch["image"])
    assert not torch.allclose(d_fake["inputs"][1], g_out[:3]), "rows 0..B-1 are samples of image 0, not one per image"


def test_d_fake_samples_all_shows_every_sample_with_its_image():
    f, g, d = make_tiny_nets()
    batch, m = _distinct_batch(2), 3
    _, rec = _one_iteration(f, g, d, batch, num_samples=m, d_fake_samples="all")
    g_out = rec.of(g)[0]["output"]
    d_fake = rec.of(d)[2]
    torch.testing.assert_close(d_fake["inputs"][1], g_out)
    torch.testing.assert_close(d_fake["inputs"][0], batch["image"].repeat_interleave(m, dim=0))


def _g_gradients(adversarial_weight, lambda_cal, seed=0):
    f, g, d = make_tiny_nets()
    trainer = make_stage2_trainer(
        f, g, d, [_distinct_batch(2)], num_samples=3, adversarial_weight=adversarial_weight, lambda_cal=lambda_cal
    )
    grads = {}
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: grads.update({n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}),
    )
    torch.manual_seed(seed)
    trainer.run()
    return grads, trainer.state.output


def test_adversarial_weight_and_lambda_weight_g_loss_and_its_gradient():
    g1, out1 = _g_gradients(adversarial_weight=1.0, lambda_cal=0.0)
    g3, out3 = _g_gradients(adversarial_weight=3.0, lambda_cal=0.0)
    assert float(out3["loss_g"]) == pytest.approx(3 * float(out3["loss_adv"]), rel=1e-6)
    assert float(out3["loss_adv"]) == pytest.approx(float(out1["loss_adv"]), rel=1e-6)
    for name, grad in g1.items():
        torch.testing.assert_close(g3[name], 3 * grad, rtol=1e-4, atol=1e-7)
    _, mixed = _g_gradients(adversarial_weight=2.0, lambda_cal=0.5)
    expected = 2.0 * float(mixed["loss_adv"]) + 0.5 * float(mixed["loss_cal"])
    assert float(mixed["loss_g"]) == pytest.approx(expected, rel=1e-6)
    g0, _ = _g_gradients(adversarial_weight=0.0, lambda_cal=1.0)
    gcal, _ = _g_gradients(adversarial_weight=0.0, lambda_cal=2.0)
    for name, grad in g0.items():
        torch.testing.assert_close(gcal[name], 2 * grad, rtol=1e-4, atol=1e-7)


def test_frozen_f_runs_in_eval_mode_and_its_eval_output_is_the_target():
    f, g, d = make_tiny_nets(f_dropout=0.5)
    f.train()
    buffers = {k: v.clone() for k, v in f.state_dict().items()}
    batch, m = _distinct_batch(2), 3
    trainer, rec = _one_iteration(f, g, d, batch, num_samples=m)
    assert [call["training"] for call in rec.of(f)] == [False]
    for k, v in f.state_dict().items():
        assert torch.equal(v, buffers[k]), f"stage 2 changed F's {k}"
    with torch.no_grad():
        target = torch.softmax(f.eval()(batch["image"]), dim=1)
    torch.testing.assert_close(trainer.state.output["calibration"], target)
    torch.testing.assert_close(rec.of(g)[0]["inputs"][1], target.repeat_interleave(m, dim=0))


def _reference_l_cal(samples, calibration, valid, clamp=1e-3):
    """KL(Gbar || F) written out: clamp both, sum over classes, average over valid pixels."""
    gbar = samples.mean(dim=1).clamp(clamp, 1 - clamp)
    f = calibration.clamp(clamp, 1 - clamp)
    kl = (gbar * (gbar / f).log()).sum(dim=1)
    return float(kl[valid].mean())


def test_l_cal_averages_over_valid_pixels_only():
    f, g, d = make_tiny_nets()
    batch = _distinct_batch(2, ignore_value=2)
    trainer, _ = _one_iteration(f, g, d, batch, num_samples=3, ignore_index=2)
    out = trainer.state.output
    valid = batch["label"][:, 0] != 2
    expected = _reference_l_cal(out["samples"], out["calibration"], valid)
    everywhere = _reference_l_cal(out["samples"], out["calibration"], torch.ones_like(valid))
    assert abs(expected - everywhere) > 1e-3 * expected, "the test needs ignore pixels that change L_cal"
    assert float(out["loss_cal"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("num_classes", [2, 3], ids=["ignore-outside-classes", "ignore-has-a-channel"])
def test_d_cannot_tell_real_from_fake_at_ignore_pixels(num_classes):
    f, g, d = make_tiny_nets(num_classes=num_classes)
    ignore = 2
    batch, m = _distinct_batch(2, ignore_value=ignore), 3
    _, rec = _one_iteration(f, g, d, batch, num_samples=m, ignore_index=ignore, num_classes=num_classes)
    g_step, d_real, d_fake = rec.of(d)
    void = (batch["label"][:, 0] == ignore).unsqueeze(1).expand_as(d_real["inputs"][1])
    real = d_real["inputs"][1]
    # at void pixels the real map is the one-hot of the ignore class (or background when it has no channel)
    shown_class = ignore if num_classes > ignore else 0
    assert torch.all(real.argmax(1)[void[:, 0]] == shown_class)
    assert torch.equal(d_fake["inputs"][1][void], real[void])
    void_folded = void.repeat_interleave(m, dim=0)
    assert torch.equal(g_step["inputs"][1][void_folded], real.repeat_interleave(m, dim=0)[void_folded])
    # elsewhere D still sees G's own soft output
    g_out = rec.of(g)[0]["output"]
    torch.testing.assert_close(g_step["inputs"][1][~void_folded], g_out[~void_folded])


def test_r1_is_taken_on_real_inputs_only_and_r1_half_halves_it():
    values = {}
    for half in (False, True):
        f, g, d = make_tiny_nets()
        batch = _distinct_batch(2)
        trainer = make_stage2_trainer(f, g, d, [batch], num_samples=2, r1_gamma=10.0, r1_half=half)
        snapshot = {}

        # after G's backward and before any D update: D as the D step sees it
        def keep_d(engine, snapshot=snapshot, d=d):
            snapshot["d"] = {k: v.clone() for k, v in d.state_dict().items()}

        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, keep_d)
        trainer.run()
        reference = make_tiny_nets()[2]
        reference.load_state_dict(snapshot["d"])
        image = batch["image"].clone().requires_grad_(True)
        real = torch.nn.functional.one_hot(batch["label"][:, 0], 2).movedim(-1, 1).float().requires_grad_(True)
        grads = torch.autograd.grad(reference(image, real).sum(), [image, real])
        expected = 10.0 * sum(gr.pow(2).flatten(1).sum(1) for gr in grads).mean()
        values[half] = float(trainer.state.output["loss_r1"])
        assert values[half] == pytest.approx(float(expected) * (0.5 if half else 1.0), rel=1e-4)
    assert values[True] == pytest.approx(values[False] / 2, rel=1e-4)


class _SwitchableDiscriminator(torch.nn.Module):
    """Tells real (exact one-hot) from fake perfectly while ``sharp``; calls everything fake otherwise.

    Its logits still pass through one parameter and the inputs, so R1 and the optimiser work on it.
    """

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.sharp = True

    def forward(self, x, y):
        is_real = ((y == 0) | (y == 1)).flatten(1).all(dim=1, keepdim=True).float()
        tie = 0.0 * (x.mean() + y.mean())
        sign = 2 * is_real - 1 if self.sharp else -torch.ones_like(is_real)
        return self.weight * 5.0 * sign + tie


def test_accuracy_gate_reopens_on_the_accuracy_it_measures():
    f, g, _ = make_tiny_nets()
    d = _SwitchableDiscriminator()
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(8)), batch_size=2)
    trainer = make_stage2_trainer(
        f, g, d, loader, num_samples=2, r1_gamma=0.0, d_schedule=DiscriminatorSchedule(max_accuracy=0.85)
    )
    log = []

    def record(engine):
        log.append((engine.state.output["d_stepped"], engine.state.output["d_accuracy"]))
        if engine.state.iteration == 2:
            d.sharp = False  # D now errs on every real label: its measured accuracy drops to 0.5

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    # 1: steps, measures 1.0 -> 2: gated (measured 1.0 again) -> 3: still gated, measures 0.5 -> 4: steps
    assert log == [(1.0, 1.0), (0.0, 1.0), (0.0, 0.5), (1.0, 0.5)]


def test_joint_f_trains_on_its_own_loss_only_and_g_sees_a_detached_copy():
    import copy

    f, g, d = make_tiny_nets()
    batch = _distinct_batch(2)
    f_before = copy.deepcopy(f)
    f_optimizer = torch.optim.SGD(f.parameters(), lr=0.0)  # keeps the weights, so the gradients can be compared
    trainer = make_stage2_trainer(
        f,
        g,
        d,
        [batch],
        num_samples=3,
        calibration_optimizer=f_optimizer,
        calibration_loss_function=PixelwiseCrossEntropyLoss(),
    )
    recorder = _Recorder(f, g)
    trainer.run()
    assert [call["training"] for call in recorder.of(f)] == [True]
    f_before.train()
    logits = f_before(batch["image"])
    loss_f = pixelwise_cross_entropy(logits, batch["label"])
    loss_f.backward()
    # F's gradient is CE's alone: G's L_adv + L_cal contributed nothing through the calibration map
    for (name, p), (_, q) in zip(f.named_parameters(), f_before.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert float(trainer.state.output["loss_f"]) == pytest.approx(float(loss_f.detach()), rel=1e-6)
    torch.testing.assert_close(trainer.state.output["calibration"], torch.softmax(logits.detach(), 1))


# ------------------------------------------------------------------------------------------------------------
# A MONAI trainer like any other: iteration events, output keys, postprocessing, handlers.


def test_events_fire_in_monai_order_with_the_output_each_stage_promises():
    f, g, d = make_tiny_nets()
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(4)), batch_size=2)
    seen = []
    posts = []

    def postprocessing(data):
        posts.append(sorted(k for k in data if k.startswith("loss")))
        return data

    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2, postprocessing=postprocessing)
    first = next(g.parameters())

    def on(event):
        def handler(engine):
            output = engine.state.output
            seen.append((engine.state.iteration, event.name, first.grad is not None))
            if event == IterationEvents.FORWARD_COMPLETED:
                assert output[CARKeys.SAMPLES].shape == (2, 2, 2, 32, 32) and CARKeys.LOSS_G not in output
                torch.testing.assert_close(output[CARKeys.PRED], output[CARKeys.SAMPLES].mean(1))
            if event == IterationEvents.LOSS_COMPLETED:
                assert output[CARKeys.LOSS_G].requires_grad and output[CARKeys.LOSS] is output[CARKeys.LOSS_G]
                assert CARKeys.LOSS_D not in output
            if event == IterationEvents.MODEL_COMPLETED:
                assert {CARKeys.LOSS_D, CARKeys.LOSS_R1, CARKeys.D_ACCURACY, CARKeys.D_STEPPED} <= set(output)
                assert not output[CARKeys.LOSS_G].requires_grad

        return handler

    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(event, on(event))
    trainer.run()
    names = [name for _, name, _ in seen]
    assert names == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"] * 2
    # gradients appear at BACKWARD_COMPLETED (zeroed with set_to_none before G's backward)
    assert [has_grad for _, name, has_grad in seen if name == "BACKWARD_COMPLETED"] == [True, True]
    assert posts == [["loss", "loss_adv", "loss_cal", "loss_d", "loss_g", "loss_r1"]] * 2


def test_monai_handlers_attach_to_car_trainer_as_to_supervised_trainer():
    from monai.handlers import StatsHandler, from_engine

    f, g, d = make_tiny_nets()
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(4)), batch_size=2)
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2)
    losses = []
    StatsHandler(iteration_log=False, epoch_log=False, output_transform=from_engine(["loss"], first=True)).attach(
        trainer
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(from_engine(["loss", "pred"])(e.state.output))
    )
    trainer.run()
    assert len(losses) == 2 and all(loss.ndim == 0 and pred.shape == (2, 2, 32, 32) for loss, pred in losses)
    assert trainer.network is g and trainer.optimizer is trainer.g_optimizer


def test_non_finite_loss_guard_stops_stage_2_like_stage_1():
    f, g, d = make_tiny_nets()
    loader = DataLoader(RandomAnnotatorBatches(ambiguous_discs(4), poison_index=2), batch_size=1)
    trainer = make_stage2_trainer(f, g, d, loader, num_samples=2)
    NonFiniteLossGuard(output_keys=("loss_g", "loss_adv", "loss_cal"), name="stage 2 (G)").attach(trainer)
    weights = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: weights.update(g={k: v.clone() for k, v in g.state_dict().items()})
    )
    with pytest.raises(NonFiniteLossError, match=r"stage 2 \(G\): non-finite loss at iteration 3"):
        trainer.run()
    for k, v in g.state_dict().items():
        assert torch.equal(v, weights["g"][k]), k  # neither weights nor BatchNorm statistics saw the NaN
