"""Shape, noise, gradient-isolation and validation tests for F, G and D (car_med.networks)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from car_med.networks import (
    BlackBoxCalibrationNet,
    Discriminator,
    NoiseInjectedUNet,
    NoiseInjection,
    SegNetCalibrationNet,
)

SIZES = [(128, 128), (180, 180), (256, 512)]
SMALL_SEGNET = {"channels": (4, 8, 8, 8, 8)}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {
        "segnet": SegNetCalibrationNet().eval(),
        "blackbox": BlackBoxCalibrationNet().eval(),
        "g_paper": NoiseInjectedUNet().eval(),
        "g_code": NoiseInjectedUNet(injection="code").eval(),
        "d_avg": Discriminator().eval(),
        "d_patch": Discriminator(head="patch").eval(),
    }


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_net_returns_exact_shape(nets, size):
    torch.manual_seed(1)
    b = 2 if size[0] * size[1] <= 180 * 180 else 1
    x = torch.rand(b, 1, *size)
    with torch.no_grad():
        logits = nets["segnet"](x)
        assert logits.shape == (b, 2, *size)
        assert torch.isfinite(logits).all()

        bb = nets["blackbox"](torch.rand(b, 3, *size), torch.rand(b, 25, *size))
        assert bb.shape == (b, 25, *size)

        calibration = torch.softmax(logits, dim=1)
        for key in ("g_paper", "g_code"):
            probs = nets[key](x, calibration, torch.randn(b, 8))
            assert probs.shape == (b, 2, *size)
            assert torch.allclose(probs.sum(dim=1), torch.ones(b, *size), atol=1e-5)
            assert probs.min() >= 0.0

        for key in ("d_avg", "d_patch"):
            score = nets[key](x, probs)
            assert score.shape == (b, 1)
            assert torch.isfinite(score).all()


@pytest.mark.parametrize("injection", ["paper", "code"])
def test_refinement_output_depends_on_noise_at_init(nets, injection):
    g = nets[f"g_{injection}"]
    torch.manual_seed(2)
    x = torch.rand(2, 1, 64, 64)
    calibration = torch.softmax(torch.randn(2, 2, 64, 64), dim=1)
    eps1, eps2 = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        p1, p1_again, p2 = g(x, calibration, eps1), g(x, calibration, eps1), g(x, calibration, eps2)
    assert torch.equal(p1, p1_again)  # eval mode: eps is the only source of randomness
    diff = (p1 - p2).abs().mean().item()
    assert diff > 1e-4, diff


@pytest.mark.parametrize("injection,expected", [("paper", [8, 4, 2, 1]), ("code", [4, 2, 1])])
def test_injection_sites(injection, expected):
    g = NoiseInjectedUNet(injection=injection).eval()
    seen = []
    for module in g.modules():
        if isinstance(module, NoiseInjection):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-1], out.shape[1])))
    with torch.no_grad():
        g(torch.rand(1, 1, 64, 64), torch.full((1, 2, 64, 64), 0.5), torch.randn(1, 8))
    # Sites at H/8 (paper only), H/4, H/2 and H; the last one is the 2-class output head.
    assert [64 // w for w, _ in seen] == expected
    assert seen[-1][1] == 2
    assert [c for _, c in seen[:-1]] == {"paper": [128, 64, 32], "code": [64, 32]}[injection]


@pytest.mark.parametrize("calibration_net", ["segnet", "blackbox"])
def test_no_gradient_from_refinement_reaches_calibration_net(calibration_net):
    torch.manual_seed(3)
    if calibration_net == "segnet":
        f = SegNetCalibrationNet(**SMALL_SEGNET)
        x = torch.rand(2, 1, 64, 64)
        calibration = torch.softmax(f(x), dim=1)
        image = x
    else:
        f = BlackBoxCalibrationNet(image_channels=1, num_classes=2, channels=8)
        x = torch.rand(2, 1, 64, 64)
        onehot = nn.functional.one_hot(torch.randint(0, 2, (2, 64, 64)), 2).permute(0, 3, 1, 2).float()
        calibration = torch.softmax(f(x, onehot), dim=1)
        image = x
    assert calibration.requires_grad  # the isolation must come from G, not from the caller
    g = NoiseInjectedUNet(channels=(8, 16, 16, 16)).train()
    probs = g(image, calibration, torch.randn(2, 8))
    # Class 0 only: the sum over classes is constant and would give zero gradient everywhere.
    probs[:, 0].mean().backward()

    for name, p in f.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    g_params = dict(g.named_parameters())
    without_grad = [n for n, p in g_params.items() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert without_grad == []
    assert sum(p.grad.abs().sum().item() for p in g_params.values()) > 0


def test_segnet_round_trips_odd_sizes():
    net = SegNetCalibrationNet(**SMALL_SEGNET).eval()
    pooled = []
    net.pool.register_forward_hook(lambda m, args, out: pooled.append(tuple(out[0].shape[2:])))
    with torch.no_grad():
        out = net(torch.rand(1, 1, 180, 180))
    assert out.shape == (1, 2, 180, 180)
    assert pooled == [(90, 90), (45, 45), (22, 22), (11, 11), (5, 5)]
    with torch.no_grad():
        assert net(torch.rand(1, 1, 181, 97)).shape == (1, 2, 181, 97)


def test_odd_sizes_for_refinement_and_discriminator():
    g = NoiseInjectedUNet(channels=(8, 16, 16, 16)).eval()
    d = Discriminator(channels=(8, 16, 16, 16)).eval()
    with torch.no_grad():
        for size in [(181, 97), (33, 17)]:
            x = torch.rand(2, 1, *size)
            probs = g(x, torch.full((2, 2, *size), 0.5), torch.randn(2, 8))
            assert probs.shape == (2, 2, *size)
            assert d(x, probs).shape == (2, 1)


def _shape_error(expected: str, given: tuple[int, ...]) -> str:
    return re.escape(f"expected {expected}, got {given}")


def test_refinement_rejects_wrong_shapes():
    g = NoiseInjectedUNet()
    x, cal, eps = torch.rand(2, 1, 64, 64), torch.rand(2, 2, 64, 64), torch.randn(2, 8)
    with pytest.raises(ValueError, match=_shape_error("image of shape (B, 1, H, W)", (2, 3, 64, 64))):
        g(torch.rand(2, 3, 64, 64), cal, eps)
    full_message = r"NoiseInjectedUNet expected image of shape \(B, 1, H, W\), got \(1, 64, 64\)"
    with pytest.raises(ValueError, match=full_message):
        g(torch.rand(1, 64, 64), cal, eps)
    with pytest.raises(ValueError, match=_shape_error("calibration of shape (B=2, 2, H=64, W=64)", (2, 3, 64, 64))):
        g(x, torch.rand(2, 3, 64, 64), eps)
    with pytest.raises(ValueError, match=_shape_error("calibration of shape (B=2, 2, H=64, W=64)", (2, 2, 32, 64))):
        g(x, torch.rand(2, 2, 32, 64), eps)
    with pytest.raises(ValueError, match=_shape_error("noise of shape (B=2, 8)", (2, 4))):
        g(x, cal, torch.randn(2, 4))
    with pytest.raises(ValueError, match=_shape_error("noise of shape (B=2, 8)", (3, 8))):
        g(x, cal, torch.randn(3, 8))
    with pytest.raises(ValueError, match="injection must be 'paper' or 'code'"):
        NoiseInjectedUNet(injection="everywhere")


def test_calibration_nets_and_discriminator_reject_wrong_shapes():
    segnet = SegNetCalibrationNet(**SMALL_SEGNET)
    with pytest.raises(ValueError, match=_shape_error("image of shape (B, 1, H, W)", (2, 3, 64, 64))):
        segnet(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=_shape_error("image of shape (B, 1, H, W)", (64, 64))):
        segnet(torch.rand(64, 64))

    bb = BlackBoxCalibrationNet(channels=4)
    with pytest.raises(ValueError, match=_shape_error("image of shape (B, 3, H, W)", (1, 1, 32, 32))):
        bb(torch.rand(1, 1, 32, 32), torch.rand(1, 25, 32, 32))
    expected_onehot = "blackbox_onehot of shape (B=1, 25, H=32, W=32)"
    with pytest.raises(ValueError, match=_shape_error(expected_onehot, (1, 19, 32, 32))):
        bb(torch.rand(1, 3, 32, 32), torch.rand(1, 19, 32, 32))

    d = Discriminator(channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match=_shape_error("image of shape (B, 1, H, W)", (2, 2, 32, 32))):
        d(torch.rand(2, 2, 32, 32), torch.rand(2, 2, 32, 32))
    with pytest.raises(ValueError, match=_shape_error("label map of shape (B=2, 2, H=32, W=32)", (2, 2, 32))):
        d(torch.rand(2, 1, 32, 32), torch.rand(2, 2, 32))
    with pytest.raises(ValueError, match="head must be"):
        Discriminator(head="fc")


def test_return_logits_and_forward_samples_agree_with_forward():
    torch.manual_seed(4)
    g = NoiseInjectedUNet(channels=(8, 16, 16, 16)).eval()
    x, cal = torch.rand(2, 1, 45, 45), torch.softmax(torch.randn(2, 2, 45, 45), dim=1)
    eps = torch.randn(2, 3, 8)
    with torch.no_grad():
        samples = g.forward_samples(x, cal, eps)
        assert samples.shape == (2, 3, 2, 45, 45)
        for m in range(3):
            single = g(x, cal, eps[:, m])
            assert torch.allclose(samples[:, m], single, atol=1e-5)
            logits = g(x, cal, eps[:, m], return_logits=True)
            assert torch.allclose(torch.softmax(logits, dim=1), single, atol=1e-6)
    with pytest.raises(ValueError, match=_shape_error("noise of shape (B=2, M, 8)", (2, 8))):
        g.forward_samples(x, cal, torch.randn(2, 8))


def test_discriminator_heads_and_input_gradient():
    torch.manual_seed(5)
    x = torch.rand(2, 1, 48, 48)
    y = torch.softmax(torch.randn(2, 2, 48, 48), dim=1).requires_grad_(True)
    for head in ("global_avg", "patch"):
        d = Discriminator(channels=(8, 16, 16, 16), head=head)
        assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in d.modules())
        score = d(x, y)
        assert score.shape == (2, 1)
        # R1 needs the gradient of D with respect to its (real) input.
        (grad,) = torch.autograd.grad(score.sum(), y)
        assert grad.shape == y.shape and grad.abs().sum() > 0


def _fake_torchvision_vgg_bn(channels, convs_per_block, in_channels=3):
    """A state dict laid out like torchvision's vgg.features (conv, bn, relu, ..., maxpool)."""
    layers, c_in = [], in_channels
    for c, n in zip(channels, convs_per_block):
        for _ in range(n):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        layers.append(nn.MaxPool2d(2))
    features = nn.Sequential(*layers)
    for m in features.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # ignored by the loader
    return state, features


def test_segnet_loads_local_weights(tmp_path):
    torch.manual_seed(6)
    cfg = {"channels": (4, 8, 8), "convs_per_block": (2, 2, 4)}
    state, features = _fake_torchvision_vgg_bn(cfg["channels"], cfg["convs_per_block"])
    path = tmp_path / "vgg.pt"
    torch.save(state, path)

    net = SegNetCalibrationNet(in_channels=3, pretrained_weights=str(path), **cfg)
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    norms = [m for m in features if isinstance(m, nn.BatchNorm2d)]
    blocks = [b for stage in net.encoder for b in stage]
    assert len(blocks) == len(convs) == 8
    for block, conv, norm in zip(blocks, convs, norms):
        assert torch.equal(block.conv.weight, conv.weight)
        assert torch.equal(block.adn.N.running_var, norm.running_var)

    with pytest.warns(UserWarning, match="keeping it randomly initialised"):
        gray = SegNetCalibrationNet(in_channels=1, pretrained_weights=str(path), **cfg)
    assert gray.encoder[0][0].conv.weight.shape[1] == 1
    assert torch.equal(gray.encoder[0][1].conv.weight, convs[1].weight)

    own = tmp_path / "own.pt"
    torch.save({"state_dict": net.state_dict()}, own)
    again = SegNetCalibrationNet(in_channels=3, pretrained_weights=str(own), **cfg).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), net.eval()(x))

    with pytest.raises(ValueError, match="expected shape"):
        SegNetCalibrationNet(
            in_channels=3, channels=(4, 8, 16), convs_per_block=(2, 2, 4), pretrained_weights=str(path)
        )
    with pytest.raises(ValueError, match="conv blocks"):
        SegNetCalibrationNet(in_channels=3, channels=(4, 8), convs_per_block=(2, 2), pretrained_weights=str(path))


def test_volumetric_variants():
    torch.manual_seed(7)
    size = (32, 24, 20)
    x = torch.rand(1, 1, *size)
    with torch.no_grad():
        f = SegNetCalibrationNet(channels=(4, 4, 4), convs_per_block=(1, 1, 1), spatial_dims=3).eval()
        cal = torch.softmax(f(x), dim=1)
        assert cal.shape == (1, 2, *size)
        bb = BlackBoxCalibrationNet(image_channels=1, num_classes=2, channels=4, spatial_dims=3).eval()
        assert bb(x, cal).shape == (1, 2, *size)
        g = NoiseInjectedUNet(channels=(4, 8, 8, 8), spatial_dims=3).eval()
        probs = g(x, cal, torch.randn(1, 8))
        assert probs.shape == (1, 2, *size)
        d = Discriminator(channels=(4, 4, 4), spatial_dims=3).eval()
        assert d(x, probs).shape == (1, 1)
    with pytest.raises(ValueError, match=re.escape("image of shape (B, 1, D, H, W)")):
        g(torch.rand(1, 1, 32, 32), cal, torch.randn(1, 8))


def test_too_small_inputs_name_the_network_and_its_minimum():
    segnet = SegNetCalibrationNet(**SMALL_SEGNET).eval()
    msg = "SegNetCalibrationNet needs every spatial dim >= 32 with channels=(4, 8, 8, 8, 8), got (31, 64)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        segnet(torch.rand(1, 1, 31, 64))
    assert segnet(torch.rand(1, 1, 32, 33)).shape == (1, 2, 32, 33)

    d = Discriminator()
    msg = "Discriminator needs every spatial dim >= 16 with channels=(64, 128, 256, 512), got (8, 8)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        d(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8))
    small_d = Discriminator(channels=(4, 4, 4), spatial_dims=3)
    msg = "Discriminator needs every spatial dim >= 8 with channels=(4, 4, 4), got (8, 7, 8)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        small_d(torch.rand(1, 1, 8, 7, 8), torch.rand(1, 2, 8, 7, 8))
    # Odd kernels with "same"-style padding never shrink a map to nothing, so no minimum applies.
    odd_d = Discriminator(channels=(4, 4), kernel_size=3)
    assert odd_d(torch.rand(1, 1, 1, 1), torch.rand(1, 2, 1, 1)).shape == (1, 1)

    g = NoiseInjectedUNet(channels=(4, 8, 8, 8)).train()
    cal, eps = torch.full((1, 2, 16, 16), 0.5), torch.randn(1, 8)
    msg = (
        "NoiseInjectedUNet needs a spatial dim >= 17 with channels=(4, 8, 8, 8) when training with batch size 1 "
        "(BatchNorm needs more than one value per channel after 4 stride-2 stages), got (16, 16)"
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        g(torch.rand(1, 1, 16, 16), cal, eps)
    with pytest.raises(ValueError, match=re.escape(msg)):
        g.forward_samples(torch.rand(1, 1, 16, 16), cal, torch.randn(1, 3, 8))
    # Rounding-up stride-2 convs keep any size alive: a batch of two, a wider dim or eval mode all work.
    assert g(torch.rand(2, 1, 16, 16), cal.expand(2, -1, -1, -1), torch.randn(2, 8)).shape == (2, 2, 16, 16)
    assert g(torch.rand(1, 1, 16, 17), torch.full((1, 2, 16, 17), 0.5), eps).shape == (1, 2, 16, 17)
    with torch.no_grad():
        assert g.eval()(torch.rand(1, 1, 3, 3), torch.full((1, 2, 3, 3), 0.5), eps).shape == (1, 2, 3, 3)


def test_integer_images_are_rejected_with_a_clear_message():
    img = torch.randint(0, 255, (2, 1, 32, 32))
    cal = torch.full((2, 2, 32, 32), 0.5)
    onehot = nn.functional.one_hot(torch.randint(0, 2, (2, 32, 32)), 2).permute(0, 3, 1, 2)  # int64 is fine
    cases = [
        ("SegNetCalibrationNet", lambda: SegNetCalibrationNet(channels=(4, 4), convs_per_block=(1, 1))(img)),
        ("BlackBoxCalibrationNet", lambda: BlackBoxCalibrationNet(1, 2, channels=4)(img, onehot)),
        ("NoiseInjectedUNet", lambda: NoiseInjectedUNet(channels=(4, 8, 8, 8))(img, cal, torch.randn(2, 8))),
        ("Discriminator", lambda: Discriminator(channels=(4, 4))(img, onehot)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=re.escape(f"{name} expected a floating-point image, got torch.int64")):
            call()
    # Integer one-hot label maps are still accepted and cast to the image's dtype.
    assert Discriminator(channels=(4, 4))(img.float(), onehot).shape == (2, 1)


def test_full_resolution_skip_feeds_f_to_the_output_site_and_keeps_sampling_consistent():
    from car_med.sampling import CARSampler

    torch.manual_seed(5)
    g = NoiseInjectedUNet(channels=(8, 16, 16, 16), full_resolution_skip=True).eval()
    plain = NoiseInjectedUNet(channels=(8, 16, 16, 16)).eval()
    # the output site takes the last up block's channels plus the image and F's 2 classes
    assert g.inject["3"].residual.out_features == 8 + 1 + 2
    assert plain.inject["3"].residual.out_features == 8
    x, cal = torch.rand(2, 1, 45, 45), torch.softmax(torch.randn(2, 2, 45, 45), dim=1)
    eps = torch.randn(2, 3, 8)
    with torch.no_grad():
        samples = g.forward_samples(x, cal, eps)
        for m in range(3):
            torch.testing.assert_close(samples[:, m], g(x, cal, eps[:, m]), atol=1e-5, rtol=1e-5)
        # a one-pixel change of F reaches the output at that pixel through the skip, not only via H/2 features
        bumped = cal.clone()
        bumped[:, :, 20, 20] = torch.tensor([0.0, 1.0])[None]
        diff = (g(x, bumped, eps[:, 0], return_logits=True) - g(x, cal, eps[:, 0], return_logits=True)).abs()
        assert diff[:, :, 20, 20].min() > 10 * diff[:, :, 30:, 30:].max()

        class F(nn.Module):
            def forward(self, image):
                return torch.log(cal[: image.shape[0]])

        sampler = CARSampler(F(), g, num_samples=3, max_batch=2)  # chunks split an image's samples
        drawn = sampler(x, noise=eps)
        torch.testing.assert_close(drawn.probs, samples, atol=1e-5, rtol=1e-5)
    *skips, g_input = g.encode(x, cal)
    with pytest.raises(ValueError, match="one row per noise row"):  # the skips repeated for M=2, G's input not
        g.decode([f.repeat_interleave(2, dim=0) for f in skips] + [g_input], torch.randn(4, 8))


def test_chunked_memory_saving_refuses_the_full_resolution_skip():
    from car_med.engines.chunked_step import chunked_refinement_forward

    g = NoiseInjectedUNet(channels=(8, 16, 16, 16), full_resolution_skip=True)
    x, cal = torch.rand(2, 1, 32, 32), torch.softmax(torch.randn(2, 2, 32, 32), dim=1)
    with pytest.raises(ValueError, match="memory_saving='none'"):
        chunked_refinement_forward(g, x, cal, torch.randn(2, 8), chunk_size=1)


def test_resize_upsampling_has_no_checkerboard_on_a_constant_input():
    # A constant image and F give constant features down to the deepest block; a 2x2 transposed convolution then
    # paints each 2x2 output cell with its 4 kernel weights (a checkerboard), nearest-neighbour resize does not.
    torch.manual_seed(6)
    x, cal = torch.full((1, 1, 64, 64), 0.5), torch.full((1, 2, 64, 64), 0.5)
    eps = torch.randn(1, 8)
    for upsample, periodic in (("deconv", True), ("resize", False)):
        g = NoiseInjectedUNet(channels=(8, 16, 16, 16), upsample=upsample, dropout=0.0).eval()
        with torch.no_grad():
            logits = g(x, cal, eps, return_logits=True)[0, 1, 8:-8, 8:-8]  # away from the zero-padded border
        row_pattern = (logits[0::2] - logits[1::2]).abs().mean()
        assert (row_pattern > 1e-3) == periodic, (upsample, float(row_pattern))
    with pytest.raises(ValueError, match="upsample must be 'deconv' or 'resize'"):
        NoiseInjectedUNet(upsample="bilinear")
