"""A nodule's crops as one volume (car_med.evaluation.volumes): alignment, 3D metrics, shared noise."""

from __future__ import annotations

import math

import pytest
import torch

from car_med.evaluation.sample_metrics import sample_cases
from car_med.evaluation.volumes import NoduleVolumes, adjacent_slice_dice, with_nodule_noise
from car_med.metrics import generalized_energy_distance


def _disc(size: int, centre: tuple[int, int], radius: float) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2) <= radius**2).to(torch.uint8)


def _affine(shift: tuple[int, int], z: float) -> torch.Tensor:
    affine = torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0], dtype=torch.float64))
    affine[0, 3], affine[1, 3], affine[2, 3] = 0.5 * shift[0], 0.5 * shift[1], z
    return affine


def test_adjacent_slice_dice_counts_only_informative_pairs():
    a = _disc(16, (8, 8), 4)
    empty = torch.zeros_like(a)
    stack = torch.stack([torch.stack([a, a, empty, empty]), torch.stack([a, empty, a, empty])])
    dice = adjacent_slice_dice(stack)
    # first map: (a, a) = 1, (a, empty) = 0, (empty, empty) left out -> 0.5; second: 0, 0, 0 -> 0
    assert dice.tolist() == pytest.approx([0.5, 0.0])
    assert math.isnan(float(adjacent_slice_dice(torch.zeros(1, 3, 4, 4))[0]))


def test_crops_are_aligned_by_their_affines_before_stacking():
    """One ball seen in three crops whose windows shift: aligned, the slices of every map coincide."""
    volumes = NoduleVolumes(num_samples=4)
    for k, shift in enumerate([(0, 0), (3, -2), (-1, 4)]):
        crop = _disc(24, (12 - shift[0], 12 - shift[1]), 5)  # the same world disc, seen from a shifted window
        samples, readers = crop.expand(4, -1, -1), crop.expand(2, -1, -1)
        item = {"patient_id": "P", "series_uid": "S", "nodule_id": 1, "slice_z": 2.0 * k}
        volumes.add(item, samples, readers, _affine(shift, 2.0 * k))
    [row] = volumes.per_nodule()
    assert row["num_slices"] == 3
    assert row["adjacent_dice"] == pytest.approx(1.0) and row["readers_adjacent_dice"] == pytest.approx(1.0)
    assert row["ged4_3d"] == pytest.approx(0.0, abs=1e-6) and row["hm_iou4_3d"] == pytest.approx(1.0)


def test_3d_ged_is_the_ged_of_the_stacked_volumes():
    gen = torch.Generator().manual_seed(0)
    volumes = NoduleVolumes(num_samples=8)
    slices = []
    for k in range(3):
        samples = (torch.rand(8, 12, 12, generator=gen) > 0.6).to(torch.uint8)
        readers = (torch.rand(4, 12, 12, generator=gen) > 0.6).to(torch.uint8)
        slices.append((samples, readers))
        volumes.add(
            {"patient_id": "P", "series_uid": "S", "nodule_id": 2, "slice_z": 5.0 - k},
            samples,
            readers,
            _affine((0, 0), 5.0 - k),
        )
    order = [2, 1, 0]  # stacked by z
    expected = generalized_energy_distance(
        torch.stack([slices[k][0] for k in order], 1)[None], torch.stack([slices[k][1] for k in order], 1)[None]
    )
    assert volumes.aggregate()["ged8_3d"] == pytest.approx(float(expected[0]), abs=1e-6)


def test_nodule_noise_gives_a_nodule_one_draw_and_other_nodules_others():
    items = [
        {"case_index": i, "patient_id": "P", "series_uid": "S", "nodule_id": n} for i, n in enumerate([1, 1, 2, 1])
    ]
    assert [i["noise_index"] for i in with_nodule_noise(items)] == [0, 0, 2, 0]
    assert [i["noise_index"] for i in with_nodule_noise(items, "case")] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="noise must be one of"):
        with_nodule_noise(items, "slice")

    class Recorder:
        noise_dim = 3

        def draw_noise(self, batch, num_samples, device, generator):
            return torch.randn(batch, num_samples, self.noise_dim, generator=generator)

        def __call__(self, image, noise):
            return noise

    batch = {
        "image": torch.zeros(4, 1, 2, 2),
        **{k: torch.tensor([i[k] for i in with_nodule_noise(items)]) for k in ("case_index", "noise_index")},
    }
    [(_, noise)] = list(sample_cases(Recorder(), [batch], num_samples=5, seed=0))
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[0], noise[3])  # sample m: one vector per nodule
    assert not torch.equal(noise[0], noise[2])
