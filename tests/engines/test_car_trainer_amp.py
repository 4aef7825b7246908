"""CARTrainer(amp=True): F, G and D run in bfloat16 under autocast; losses, parameters and optimisers stay float32.

Autocast on CPU takes the same code path as on a GPU, so this runs without one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_car import ambiguous_discs, make_stage2_trainer, make_tiny_nets
from torch import nn

from car_med.engines import CARKeys

LOSSES = (CARKeys.LOSS_G, CARKeys.LOSS_ADV, CARKeys.LOSS_CAL, CARKeys.LOSS_D, CARKeys.LOSS_R1)


def _batch() -> dict[str, torch.Tensor]:
    items = ambiguous_discs(4, size=32, seed=3)
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["labels"][i % 2 : i % 2 + 1] for i, it in enumerate(items)]),
    }


def _run(nets, amp: bool, iterations: int = 1):
    f, g, d = nets
    conv_dtypes: dict[str, set] = {"F": set(), "G": set(), "D": set()}
    hooks = [
        conv.register_forward_hook(lambda _m, _i, out, key=key: conv_dtypes[key].add(out.dtype))
        for key, net in zip(conv_dtypes, nets)
        for conv in net.modules()
        if isinstance(conv, nn.Conv2d)
    ]
    before = {n: p.detach().clone() for n, p in g.named_parameters()}
    trainer = make_stage2_trainer(f, g, d, [_batch()] * iterations, num_samples=3, lambda_cal=5.0, amp=amp)
    torch.manual_seed(11)
    trainer.run()
    for h in hooks:
        h.remove()
    return trainer.state.output, conv_dtypes, before


def test_amp_runs_the_networks_in_bfloat16_and_keeps_float32_losses_and_parameters():
    nets = make_tiny_nets(seed=2)
    out, dtypes, _ = _run(copy.deepcopy(nets), amp=True, iterations=2)
    assert dtypes == {"F": {torch.bfloat16}, "G": {torch.bfloat16}, "D": {torch.bfloat16}}
    for key in LOSSES:
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key
    assert out[CARKeys.SAMPLES].dtype == torch.float32


def test_amp_keeps_float32_parameters_and_trains_them():
    nets = make_tiny_nets(seed=2)
    _, _, before = _run(nets, amp=True)
    g = nets[1]
    assert all(p.dtype == torch.float32 for p in g.parameters())
    moved = [n for n, p in g.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > 0.9 * len(before)


def test_amp_step_is_close_to_the_float32_step():
    """Same seed, same batch: bfloat16 changes the losses by rounding only (8 bits of mantissa)."""
    nets = make_tiny_nets(seed=2)
    plain, dtypes_plain, _ = _run(copy.deepcopy(nets), amp=False)
    mixed, _, _ = _run(copy.deepcopy(nets), amp=True)
    assert dtypes_plain == {"F": {torch.float32}, "G": {torch.float32}, "D": {torch.float32}}
    for key in (CARKeys.LOSS_G, CARKeys.LOSS_ADV, CARKeys.LOSS_CAL, CARKeys.LOSS_D):
        torch.testing.assert_close(mixed[key], plain[key], rtol=0.05, atol=0.02, msg=key)
    torch.testing.assert_close(mixed[CARKeys.SAMPLES], plain[CARKeys.SAMPLES], rtol=0, atol=0.05)
    assert not torch.equal(mixed[CARKeys.SAMPLES], plain[CARKeys.SAMPLES])


def test_amp_changes_g_parameters_like_the_float32_step():
    nets = make_tiny_nets(seed=4)
    g_plain, g_mixed = copy.deepcopy(nets), copy.deepcopy(nets)
    _, _, start = _run(g_plain, amp=False)
    _run(g_mixed, amp=True)
    for name, p in g_mixed[1].named_parameters():
        if p.ndim < 2:
            continue  # a bias before BatchNorm has a zero gradient: its sign is rounding noise
        moved_mixed = p.detach() - start[name]
        moved_plain = dict(g_plain[1].named_parameters())[name].detach() - start[name]
        # Adam's first step moves every parameter by about lr in the gradient's sign direction
        agree = (torch.sign(moved_mixed) == torch.sign(moved_plain)).float().mean().item()
        assert agree > 0.8, name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"amp": True, "amp_dtype": torch.float16}, "bfloat16"),
        ({"amp": True, "amp_dtype": "float16"}, "bfloat16"),
        ({"amp": True, "memory_saving": "chunked"}, "chunked"),
    ],
)
def test_amp_refuses_what_it_cannot_do(kwargs, match):
    f, g, d = make_tiny_nets()
    with pytest.raises(ValueError, match=match):
        make_stage2_trainer(f, g, d, [_batch()], **kwargs)


def test_amp_dtype_accepts_its_name():
    f, g, d = make_tiny_nets()
    trainer = make_stage2_trainer(f, g, d, [_batch()], amp=True, amp_dtype="bfloat16")
    assert trainer.amp_dtype is torch.bfloat16
