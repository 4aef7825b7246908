"""Per-case seeded sampling: a case's samples do not depend on its batch, its neighbours or their order."""

from __future__ import annotations

import torch
from tiny_car import make_tiny_nets

from car_med.evaluation import sample_cases
from car_med.sampling import CARSampler


def _batches(images: torch.Tensor, order: list[list[int]]) -> list[dict]:
    return [{"image": images[idx], "case_index": torch.tensor(idx)} for idx in order]


def test_each_case_gets_the_same_samples_in_any_batching_and_order():
    torch.manual_seed(0)
    f, g, _ = make_tiny_nets()
    sampler = CARSampler(f, g, num_samples=6)
    images = torch.rand(4, 1, 32, 32)

    def by_case(order):
        out = {}
        for batch, drawn in sample_cases(sampler, _batches(images, order), num_samples=6, seed=3):
            for row, case in enumerate(batch["case_index"].tolist()):
                out[case] = (drawn.samples[row], drawn.noise[row])
        return out

    together = by_case([[0, 1, 2, 3]])
    apart = by_case([[3], [1, 0], [2]])
    for case in range(4):
        assert torch.equal(together[case][0], apart[case][0]) and torch.equal(together[case][1], apart[case][1])
    # different cases and different seeds draw different noise
    assert all(not torch.equal(together[a][1], together[b][1]) for a in range(4) for b in range(a + 1, 4))
    other_seed = {}
    for _batch, drawn in sample_cases(sampler, _batches(images, [[0, 1, 2, 3]]), num_samples=6, seed=4):
        other_seed = dict(enumerate(drawn.noise))
    assert all(not torch.equal(together[c][1], other_seed[c]) for c in range(4))
