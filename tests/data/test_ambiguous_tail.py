"""The 2D problem with known ambiguity and its mode statistics (car_med.data.ambiguous_tail)."""

from __future__ import annotations

import pytest
import torch

from car_med.data.ambiguous_tail import AmbiguousTailDataset, tail_mode_statistics


def test_annotator_draws_add_the_whole_tail_with_its_probability():
    data = AmbiguousTailDataset(4, size=32, tail_probability=0.3, seed=0)
    draws = [data[i % 4] for i in range(4000)]
    with_tail = []
    for item in draws:
        label, disc, tail = item["label"][0].bool(), item["disc"], item["tail"]
        assert torch.equal(label & disc, disc), "every draw labels the whole disc"
        on_tail = (label & tail).sum()
        assert on_tail in (0, tail.sum()), "a draw has the whole tail or none of it"
        assert not (label & ~(disc | tail)).any()
        with_tail.append(bool(on_tail))
    assert sum(with_tail) / len(with_tail) == pytest.approx(0.3, abs=0.025)


def test_the_tail_is_invisible_and_the_images_are_fixed_by_the_seed():
    a, b = AmbiguousTailDataset(3, seed=5), AmbiguousTailDataset(3, seed=5)
    for i in range(3):
        assert torch.equal(a.images[i], b.images[i])
        image, disc, tail = a.images[i][0], a.discs[i], a.tails[i]
        assert tail.sum() >= 12 and not (tail & disc).any()
        # the tail region looks like background: same mean intensity within noise
        assert abs(float(image[tail].mean()) - float(image[~(disc | tail)].mean())) < 0.1
        assert float(image[disc].mean()) > 0.8
    assert not torch.equal(AmbiguousTailDataset(3, seed=6).images[0], a.images[0])


def test_mode_statistics_count_whole_partial_and_omitted_tails():
    data = AmbiguousTailDataset(2, size=32, seed=0)
    batch = data.batch()
    disc, tail = batch["disc"], batch["tail"]
    whole = (disc | tail).long()
    none = disc.long()
    half = none.clone()
    half_mask = tail & (
        torch.cumsum(tail.flatten(1).long(), 1).view_as(tail) <= tail.flatten(1).sum(1).view(-1, 1, 1) // 2
    )
    half[half_mask] = 1
    samples = torch.stack([whole, whole, none, half], dim=1)  # (B=2, M=4, S, S)
    stats = tail_mode_statistics(samples, tail, disc)
    assert stats["tail_frequency"] == pytest.approx(0.5)
    assert stats["partial_share"] == pytest.approx(0.25)
    assert stats["omitted_share"] == pytest.approx(0.25)
    assert stats["disc_recall"] == pytest.approx(1.0)
    assert stats["background_false_positive"] == 0.0
    assert stats["per_image_frequency_std"] == pytest.approx(0.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="tail_probability"):
        AmbiguousTailDataset(2, tail_probability=1.5)
    with pytest.raises(ValueError, match="size > "):
        AmbiguousTailDataset(2, size=12)
