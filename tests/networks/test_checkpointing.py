"""G's blocks under torch.utils.checkpoint: the plain step's output, gradients and BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from car_med.networks import NoiseInjectedUNet


def _step(g: NoiseInjectedUNet, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(6, 1, 32, 32, generator=gen)
    calibration = torch.softmax(torch.randn(6, 2, 32, 32, generator=gen), 1)
    noise = torch.randn(6, 8, generator=gen)
    torch.manual_seed(seed)  # dropout's masks
    out = g(image, calibration, noise)
    (out[:, 1] * torch.linspace(0, 1, 32)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in g.named_parameters()}


@pytest.mark.parametrize("upsample", ["deconv", "resize"])
def test_checkpointed_blocks_match_the_plain_step(upsample):
    torch.manual_seed(0)
    plain = NoiseInjectedUNet(1, 2, 8, channels=(8, 16, 16), dropout=0.3, upsample=upsample).train()
    saving = copy.deepcopy(plain)
    saving.checkpoint_blocks = True
    out_plain, grads_plain = _step(plain, seed=5)
    out_saving, grads_saving = _step(saving, seed=5)
    assert torch.allclose(out_saving, out_plain, atol=1e-6)  # same dropout masks on the rerun
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_saving[name], grad, atol=1e-5, rtol=1e-4), name
    # BatchNorm's running statistics moved once, not once more on the recomputation
    buffers_plain = dict(plain.named_buffers())
    for name, buffer in saving.named_buffers():
        assert torch.equal(buffer, buffers_plain[name]) or torch.allclose(buffer, buffers_plain[name], atol=1e-7), name
    counts = [b for n, b in saving.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 1 for c in counts)
    # out of training, or without gradients, nothing is checkpointed and nothing changes
    with torch.no_grad():
        saving.eval()
        plain.eval()
        gen = torch.Generator().manual_seed(2)
        x, c, z = torch.rand(2, 1, 32, 32, generator=gen), torch.rand(2, 2, 32, 32, generator=gen), torch.randn(2, 8)
        assert torch.allclose(saving(x, c, z), plain(x, c, z), atol=1e-6)
