"""The sampler folds M draws into the batch; results must equal a per-sample loop."""

from __future__ import annotations

import pytest
import torch

from car_med.networks import ToyCalibrationMLP, ToyRefinementMLP
from car_med.sampling import CARSampler


def test_folded_sampling_equals_loop_over_same_noise(tiny_nets):
    f, g, _ = tiny_nets
    image = torch.randn(3, 1, 32, 32)
    sampler = CARSampler(f, g, num_samples=5, max_batch=4)  # 15 folded rows in chunks of 4
    noise = torch.randn(3, 5, g.noise_dim)
    out = sampler(image, noise=noise)
    assert out.samples.shape == (3, 5, 32, 32) and out.samples.dtype == torch.long
    assert out.probs.shape == (3, 5, 2, 32, 32)
    f.eval(), g.eval()
    with torch.no_grad():
        calib = torch.softmax(f(image), 1)
        loop = torch.stack([g(image, calib, noise[:, m]) for m in range(5)], dim=1)
    torch.testing.assert_close(out.probs, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean, loop.mean(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.samples, loop.argmax(2))
    torch.testing.assert_close(out.calibration, calib)
    entropy = -(calib * calib.log()).sum(1)
    torch.testing.assert_close(out.entropy, entropy, atol=1e-5, rtol=1e-5)


def test_sampler_without_probs_keeps_the_same_mean_and_samples(tiny_nets):
    f, g, _ = tiny_nets
    image = torch.randn(2, 1, 32, 32)
    noise = torch.randn(2, 7, g.noise_dim)
    full = CARSampler(f, g, max_batch=3)(image, noise=noise)
    lean = CARSampler(f, g, max_batch=5, return_probs=False)(image, noise=noise)
    assert lean.probs is None
    torch.testing.assert_close(lean.mean, full.mean, atol=1e-6, rtol=1e-5)
    assert torch.equal(lean.samples, full.samples)


def test_sampler_is_reproducible_with_a_generator_and_restores_train_mode(tiny_nets):
    f, g, _ = tiny_nets
    f.train(), g.train()
    image = torch.randn(1, 1, 32, 32)
    sampler = CARSampler(f, g, num_samples=4)
    a = sampler(image, generator=torch.Generator().manual_seed(1))
    b = sampler(image, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.noise, b.noise)
    assert f.training and g.training


def test_sampler_regression_mode():
    f, g = ToyCalibrationMLP(), ToyRefinementMLP()
    x = torch.linspace(0, 1, 11)[:, None]
    out = CARSampler(f, g, num_samples=6, output_type="continuous")(x)
    assert out.samples.shape == (11, 6, 1)
    torch.testing.assert_close(out.mean, out.samples.mean(1))
    assert out.entropy is None and out.probs is None


@pytest.mark.parametrize("bad", [0, -3])
def test_sampler_rejects_non_positive_sample_counts(tiny_nets, bad):
    f, g, _ = tiny_nets
    with pytest.raises(ValueError, match="M must be an integer >= 1"):
        CARSampler(f, g, num_samples=bad)
    with pytest.raises(ValueError, match="M must be an integer >= 1"):
        CARSampler(f, g)(torch.randn(1, 1, 32, 32), num_samples=bad)


def test_sampler_rejects_wrong_image_rank_and_channels(tiny_nets):
    f, g, _ = tiny_nets
    sampler = CARSampler(f, g, num_samples=2)
    with pytest.raises(ValueError, match=r"expected .*\(B, 1, H, W\)"):
        sampler(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)|batched image"):
        sampler(torch.randn(32, 32))
    with pytest.raises(ValueError, match="noise must have shape"):
        sampler(torch.randn(2, 1, 32, 32), noise=torch.randn(2, 3, g.noise_dim + 1))


@pytest.mark.parametrize("max_batch", [4, 8, 64])
def test_each_image_is_encoded_once_whatever_m_and_chunking(tiny_nets, max_batch):
    f, g, _ = tiny_nets
    rows = []
    handle = g.down[0].register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    try:
        out = CARSampler(f, g, num_samples=5, max_batch=max_batch)(torch.randn(3, 1, 32, 32))
    finally:
        handle.remove()
    assert sum(rows) == 3, f"the encoder saw {sum(rows)} rows for 3 images"
    assert out.samples.shape == (3, 5, 32, 32)


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_images_are_refused_naming_the_batch_index(tiny_nets, bad, kind):
    f, g, _ = tiny_nets
    image = torch.randn(4, 1, 32, 32)
    image[2, 0, 5, 7] = bad
    with pytest.raises(ValueError, match=rf"batch index 2 \({kind}\)"):
        CARSampler(f, g, num_samples=2)(image)


def test_noise_is_drawn_on_the_generator_device_then_moved(tiny_nets):
    f, g, _ = tiny_nets
    sampler = CARSampler(f, g, num_samples=3, noise_std=0.5)
    # the meta device stands in for an accelerator: a CPU generator's draw must still be possible
    noise = sampler.draw_noise(2, 3, torch.device("meta"), torch.Generator().manual_seed(4))
    assert noise.device.type == "meta" and noise.shape == (2, 3, g.noise_dim)
    cpu = sampler.draw_noise(2, 3, torch.device("cpu"), torch.Generator().manual_seed(4))
    torch.testing.assert_close(cpu, 0.5 * torch.randn(2, 3, g.noise_dim, generator=torch.Generator().manual_seed(4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cpu_generator_gives_the_same_samples_on_cuda(tiny_nets):
    f, g, _ = tiny_nets
    image = torch.randn(2, 1, 32, 32)
    on_cpu = CARSampler(f, g, num_samples=3)(image, generator=torch.Generator().manual_seed(0))
    f, g = f.cuda(), g.cuda()
    on_gpu = CARSampler(f, g, num_samples=3)(image.cuda(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(on_gpu.noise.cpu(), on_cpu.noise)
    torch.testing.assert_close(on_gpu.mean.cpu(), on_cpu.mean, atol=1e-4, rtol=1e-4)


def test_a_batch_of_meta_tensors_samples_and_reports_bad_rows(tiny_nets):
    from monai.data import MetaTensor
    from monai.data.utils import list_data_collate

    f, g, _ = tiny_nets
    items = [
        {"image": MetaTensor(torch.randn(1, 32, 32), meta={"filename_or_obj": f"case{i}.nii.gz"})} for i in range(3)
    ]
    batch = list_data_collate(items)["image"]
    out = CARSampler(f, g, num_samples=2)(batch, generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (3, 2, 32, 32) and not isinstance(out.samples, MetaTensor)
    batch[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch index 1 \(NaN\)"):
        CARSampler(f, g, num_samples=2)(batch)
