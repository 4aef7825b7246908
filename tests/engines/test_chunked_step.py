"""CARTrainer(memory_saving="chunked") takes the same G step as the folded batch: losses, G and D gradients and
BatchNorm running statistics agree with memory_saving="none" (to float rounding), dropout included."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.engines.utils import IterationEvents
from tiny_car import ambiguous_discs, make_stage2_trainer, make_tiny_nets
from torch import nn

from car_med.engines import CARKeys
from car_med.engines.chunked_step import chunk_slices, chunked_refinement_forward
from car_med.networks import (
    Discriminator,
    NoiseInjectedUNet,
    ToyCalibrationMLP,
    ToyDiscriminatorMLP,
    ToyRefinementMLP,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
LOSS_KEYS = (CARKeys.LOSS_G, CARKeys.LOSS_ADV, CARKeys.LOSS_D, CARKeys.LOSS_R1)


def _batch(num: int = 4, size: int = 32, ignore_index: int | None = None) -> dict[str, torch.Tensor]:
    items = ambiguous_discs(num, size=size, seed=3)
    image = torch.stack([it["image"] for it in items])
    label = torch.stack([it["labels"][i % 2 : i % 2 + 1] for i, it in enumerate(items)])
    if ignore_index is not None:
        label[:, :, :3] = ignore_index  # a void border, as Cityscapes has
    return {"image": image, "label": label}


def _step(nets, batch, seed: int, **kwargs) -> dict:
    """One stage-2 iteration; G's gradients as they stand after its backward pass, before its step."""
    f, g, d = nets
    trainer = make_stage2_trainer(f, g, d, [batch], lambda_cal=5.0, adversarial_weight=10.0, **kwargs)
    grads_g = {}

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _keep(_engine):
        grads_g.update({n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None})

    torch.manual_seed(seed)
    trainer.run()
    return {
        "out": trainer.state.output,
        "grads_g": grads_g,
        "grads_d": {n: p.grad.clone() for n, p in d.named_parameters()},
        "buffers_g": {n: b.clone() for n, b in g.named_buffers()},
        "rng": torch.rand(3),  # the same random numbers were drawn in the same order
    }


def _assert_same_step(plain: dict, chunked: dict, reg_key: str = CARKeys.LOSS_CAL) -> None:
    for key in (*LOSS_KEYS, reg_key):
        torch.testing.assert_close(chunked["out"][key], plain["out"][key], **TOL, msg=key)
    torch.testing.assert_close(chunked["out"][CARKeys.SAMPLES], plain["out"][CARKeys.SAMPLES], **TOL)
    assert chunked["out"][CARKeys.D_ACCURACY] == plain["out"][CARKeys.D_ACCURACY]
    for group in ("grads_g", "grads_d", "buffers_g"):
        assert plain[group].keys() == chunked[group].keys(), group
        assert plain[group] or group == "buffers_g", group
        for name, value in plain[group].items():
            torch.testing.assert_close(chunked[group][name].float(), value.float(), **TOL, msg=f"{group} {name}")
    assert torch.equal(chunked["rng"], plain["rng"])


@pytest.mark.parametrize("chunk_size", [5])
def test_chunked_step_equals_plain_step_on_tiny_nets(chunk_size):
    nets = make_tiny_nets(seed=1)
    batch = _batch()
    plain = _step(copy.deepcopy(nets), batch, seed=7, num_samples=3)
    chunked = _step(copy.deepcopy(nets), batch, seed=7, num_samples=3, memory_saving="chunked", chunk_size=chunk_size)
    _assert_same_step(plain, chunked)


@pytest.mark.parametrize(
    "regulariser, ignore_index",
    [("calibration", None), ("calibration", 2), ("cross_entropy", None)],
    ids=["cal", "cal-ignore", "ce-baseline"],
)
def test_chunked_step_equals_plain_step_on_batchnorm_unet_with_dropout(regulariser, ignore_index):
    """A NoiseInjectedUNet with BatchNorm and dropout 0.2: the chunked step draws the very same dropout masks."""
    f, _, _ = make_tiny_nets(seed=2)
    torch.manual_seed(2)
    g = NoiseInjectedUNet(image_channels=1, num_classes=2, noise_dim=4, channels=(4, 8, 8, 16), dropout=0.2)
    for m in g.modules():  # BatchNorm affine away from its (1, 0) start, so its gradients matter
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    d = Discriminator(image_channels=1, num_classes=2, channels=(8, 16), full_resolution_convs=1)
    batch = _batch(num=3, ignore_index=ignore_index)
    kwargs = {"num_samples": 4, "regulariser": regulariser, "ignore_index": ignore_index}
    plain = _step(copy.deepcopy((f, g, d)), batch, seed=11, **kwargs)
    chunked = _step(copy.deepcopy((f, g, d)), batch, seed=11, memory_saving="chunked", chunk_size=2, **kwargs)
    reg_key = CARKeys.LOSS_CAL if regulariser == "calibration" else CARKeys.LOSS_CE
    _assert_same_step(plain, chunked, reg_key)
    # the running statistics moved, once
    assert all(int(chunked["buffers_g"][n]) == 1 for n in chunked["buffers_g"] if n.endswith("num_batches_tracked"))
    # torch.utils.checkpoint over G's blocks takes the same step too
    checkpointed = _step(copy.deepcopy((f, g, d)), batch, seed=11, memory_saving="checkpoint", **kwargs)
    _assert_same_step(plain, checkpointed, reg_key)
    assert all(int(v) == 1 for n, v in checkpointed["buffers_g"].items() if n.endswith("num_batches_tracked"))


def test_chunked_step_equals_plain_step_with_any_refinement_net():
    """A G other than NoiseInjectedUNet runs as usual; D still scores the samples in chunks."""
    torch.manual_seed(0)
    nets = (ToyCalibrationMLP(hidden=8), ToyRefinementMLP(hidden=8), ToyDiscriminatorMLP(hidden=8))
    batch = {"image": torch.rand(10, 1), "label": torch.randn(10, 1)}
    kwargs = {"num_samples": 3, "output_type": "continuous", "num_classes": None}
    plain = _step(copy.deepcopy(nets), batch, seed=5, **kwargs)
    chunked = _step(copy.deepcopy(nets), batch, seed=5, memory_saving="chunked", chunk_size=4, **kwargs)
    _assert_same_step(plain, chunked)


@pytest.mark.parametrize("injection, size", [("code", 23), ("paper", 33)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_chunked_forward_equals_unet_forward(injection, size, train):
    """Odd sizes (cropping), both injection layouts, batch and running statistics, momentum=None."""
    torch.manual_seed(4)
    g = NoiseInjectedUNet(channels=(4, 8, 8, 8), noise_dim=3, dropout=0.1, injection=injection)
    g.down[1].adn.N.momentum = None  # cumulative average of the running statistics
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    g.train(train)
    g2 = copy.deepcopy(g)
    x, noise = torch.randn(6, 1, size, size), torch.randn(6, 3)
    calibration = torch.softmax(torch.randn(6, 2, size, size), 1)
    weight = torch.randn(6, 2, size, size)
    torch.manual_seed(9)
    out = g(x, calibration, noise)
    (out * weight).mean().backward()
    torch.manual_seed(9)
    out2 = chunked_refinement_forward(g2, x, calibration, noise, chunk_size=2)
    (out2 * weight).mean().backward()
    torch.testing.assert_close(out2, out, **TOL)
    for (name, p), p2 in zip(g.named_parameters(), g2.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, **TOL, msg=name)
    for (name, b), b2 in zip(g.named_buffers(), g2.buffers()):
        torch.testing.assert_close(b2.float(), b.float(), **TOL, msg=name)


def test_chunk_slices_cover_the_rows_once():
    assert chunk_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert chunk_slices(4, 8) == [slice(0, 4)]


def test_chunked_option_rejects_what_it_cannot_keep_exact():
    f, g, _ = make_tiny_nets()
    d_bn = nn.Sequential()  # any D with BatchNorm: its statistics would see one chunk at a time
    d_bn.norm = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="BatchNorm"):
        make_stage2_trainer(f, g, d_bn, [], memory_saving="chunked")
    g_bad = NoiseInjectedUNet(channels=(4, 8, 8, 8), noise_dim=4, dropout=0.0)
    g_bad.up[0].adn.D = nn.Dropout2d(0.1)
    with pytest.raises(ValueError, match="up\\[0\\].*Dropout2d"):
        make_stage2_trainer(f, g_bad, Discriminator(channels=(8, 16)), [], memory_saving="chunked")
    with pytest.raises(ValueError, match="memory_saving must be one of"):
        make_stage2_trainer(f, g, Discriminator(channels=(8, 16)), [], memory_saving="offload")
    with pytest.raises(ValueError, match="checkpoint_blocks switch"):
        no_switch = nn.Conv2d(3, 2, 1)
        no_switch.noise_dim = 4
        make_stage2_trainer(f, no_switch, Discriminator(channels=(8, 16)), [], memory_saving="checkpoint")
    with pytest.raises(ValueError, match="chunk_size"):
        make_stage2_trainer(f, g, Discriminator(channels=(8, 16)), [], memory_saving="chunked", chunk_size=0)


def test_chunked_forward_keeps_channels_last_and_its_dropout_masks():
    """With the bundle's channels_last switch, the masks are drawn in nn.Dropout's (channels-last) order."""
    cl = torch.channels_last
    torch.manual_seed(4)
    g = NoiseInjectedUNet(channels=(4, 8, 8, 8), noise_dim=3, dropout=0.2).to(memory_format=cl)
    g2 = copy.deepcopy(g)
    x = torch.randn(6, 1, 32, 32).contiguous(memory_format=cl)
    calibration = torch.softmax(torch.randn(6, 2, 32, 32), 1).contiguous(memory_format=cl)
    noise, weight = torch.randn(6, 3), torch.randn(6, 2, 32, 32)
    torch.manual_seed(9)
    (g(x, calibration, noise) * weight).mean().backward()
    torch.manual_seed(9)
    (chunked_refinement_forward(g2, x, calibration, noise, chunk_size=2) * weight).mean().backward()
    for (name, p), p2 in zip(g.named_parameters(), g2.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, **TOL, msg=name)
