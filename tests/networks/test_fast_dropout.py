"""FastDropout: nn.Dropout's distribution and values with cheaper CPU masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from car_med.networks import NoiseInjectedUNet
from car_med.networks.dropout import FastDropout, apply_keep_mask, fill_keep_mask_


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_drop_frequency_matches_p_in_every_lane(p):
    """Every element of a 64-bit draw (four 16-bit lanes) drops with probability p: a biased lane fails."""
    torch.manual_seed(0)
    n = 4 * 250_000
    mask = fill_keep_mask_(torch.empty(n, dtype=torch.bool), p)
    dropped = (~mask).float().view(-1, 4)
    # binomial standard error at 250k draws is at most 0.001
    assert abs(dropped.mean().item() - p) < 0.003
    for lane in range(4):
        assert abs(dropped[:, lane].mean().item() - p) < 0.005, f"lane {lane}"
    # neighbouring decisions are independent: P(both dropped) = p^2
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()
    assert abs(both - p * p) < 0.005


def test_values_are_nn_dropouts_for_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 7, 9)
    drop = FastDropout(0.3).train()
    torch.manual_seed(2)
    y = drop(x)
    kept = y != 0
    expected = torch.where(kept, x / (1 - 0.3), 0.0)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)
    # the mask is the one fill_keep_mask_ draws from the same seed
    torch.manual_seed(2)
    mask = fill_keep_mask_(torch.empty_like(x, dtype=torch.bool), 0.3)
    assert torch.equal(y, apply_keep_mask(x, mask, 0.3))
    assert 0.2 < 1 - kept.float().mean().item() < 0.4


def test_identity_in_eval_and_at_p_zero_zeros_at_p_one():
    x = torch.randn(4, 6)
    assert torch.equal(FastDropout(0.5).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.count_nonzero(FastDropout(1.0).train()(x)) == 0


def test_same_seed_same_mask_and_gradient_flows_through_kept_elements():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    drop = FastDropout(0.25).train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    assert torch.equal(a, b)
    a.sum().backward()
    expected = (a != 0).float() / 0.75
    torch.testing.assert_close(x.grad, expected)


def test_channels_last_masks_are_drawn_in_memory_order():
    """A channels-last input gets, element by element in memory, the masks a contiguous one would."""
    x = torch.randn(2, 3, 4, 5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    drop = FastDropout(0.5).train()
    torch.manual_seed(3)
    y_cl = drop(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    # the same memory, read as NHWC and contiguous
    nhwc = x_cl.permute(0, 2, 3, 1).contiguous()
    torch.manual_seed(3)
    y_nhwc = drop(nhwc)
    assert torch.equal(y_cl.permute(0, 2, 3, 1), y_nhwc)


def test_bad_masks_are_refused():
    with pytest.raises(TypeError, match="torch.bool"):
        fill_keep_mask_(torch.empty(4), 0.1)
    with pytest.raises(ValueError, match="dense"):
        fill_keep_mask_(torch.empty(4, 4, dtype=torch.bool)[:, :2], 0.1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fill_keep_mask_(torch.empty(4, dtype=torch.bool), 1.5)


def test_refinement_net_uses_it_and_keeps_nn_dropouts_state_dict():
    g = NoiseInjectedUNet(channels=(4, 8, 8), noise_dim=2, dropout=0.1)
    drops = [m for m in g.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 6 and all(type(m) is FastDropout and m.p == 0.1 for m in drops)
    plain = NoiseInjectedUNet(channels=(4, 8, 8), noise_dim=2, dropout=0.1)
    for block in [*plain.down, *plain.up]:
        block.adn.D = nn.Dropout(0.1)
    assert g.state_dict().keys() == plain.state_dict().keys()
    off = NoiseInjectedUNet(channels=(4, 8, 8), noise_dim=2, dropout=0.0)
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, nn.Dropout))
