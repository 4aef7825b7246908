"""NoiseInjection's arithmetic and G's use of one eps per sample at every site (car_med.networks.refinement)."""

from __future__ import annotations

import pytest
import torch

from car_med.networks import NoiseInjectedUNet, NoiseInjection


@pytest.mark.parametrize("scale_offset", [1e-5, 0.5])
def test_noise_injection_is_conv1x1_of_f_plus_r_times_s_plus_offset(scale_offset):
    torch.manual_seed(0)
    block = NoiseInjection(2, channels=3, noise_dim=4, out_channels=5, scale_offset=scale_offset)
    features, noise = torch.randn(2, 3, 6, 7), torch.randn(2, 4)
    r = noise @ block.residual.weight.T + block.residual.bias  # (B, C)
    s = noise @ block.scale.weight.T + block.scale.bias
    modulated = (features + r[:, :, None, None]) * (s[:, :, None, None] + scale_offset)
    weight, bias = block.proj.conv.weight[:, :, 0, 0], block.proj.conv.bias  # (out, C), (out,)
    expected = torch.einsum("oc,bchw->bohw", weight, modulated) + bias[None, :, None, None]
    torch.testing.assert_close(block(features, noise), expected, rtol=1e-5, atol=1e-6)


def test_initialisation_gives_zero_mean_scale_and_noise_dependent_output():
    torch.manual_seed(0)
    block = NoiseInjection(2, channels=8, noise_dim=8, out_channels=8)
    assert torch.equal(block.scale.bias, torch.zeros(8)) and torch.equal(block.residual.bias, torch.zeros(8))
    features = torch.randn(1, 8, 4, 4).expand(2, -1, -1, -1)
    out = block(features, torch.randn(2, 8))
    assert (out[0] - out[1]).abs().mean() > 0.1 * out.abs().mean()


@pytest.mark.parametrize("injection", ["paper", "code"])
def test_every_site_of_one_sample_gets_the_same_noise(injection):
    torch.manual_seed(0)
    g = NoiseInjectedUNet(1, 2, noise_dim=3, channels=(4, 8, 8), injection=injection).eval()
    seen = []
    handles = [
        m.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone())) for m in g.inject.values()
    ]
    noise = torch.randn(2, 3)
    g(torch.randn(2, 1, 16, 16), torch.softmax(torch.randn(2, 2, 16, 16), 1), noise)
    for h in handles:
        h.remove()
    assert len(seen) == len(g.inject) and all(torch.equal(s, noise) for s in seen)


def test_refinement_constants_are_arguments():
    g = NoiseInjectedUNet(
        1, 2, noise_dim=3, channels=(4, 8), negative_slope=0.1, norm="instance", noise_scale_offset=0.3
    )
    assert g.act.negative_slope == 0.1
    assert all(block.scale_offset == 0.3 for block in g.inject.values())
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in g.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    slopes = {m.negative_slope for m in g.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.1}
