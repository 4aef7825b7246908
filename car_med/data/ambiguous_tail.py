"""A 2D segmentation problem with known ambiguity: a visible disc whose label may add an invisible tail.

Every image shows a bright disc on a noisy background. Each annotator draw labels the disc, and with
probability ``tail_probability`` also a rectangular "tail" attached to the disc's right side that the
image does not show. So the true label distribution has exactly two modes per image (disc, or disc
plus whole tail), and a calibrated F predicts ``tail_probability`` on every tail pixel. A model that
samples coherently draws the whole tail in that share of its samples and never a part of it.

This is the segmentation counterpart of the paper's 1D toy (Fig. 3): it checks that CAR's sample
frequencies match the mode probability, which no shape test can. ``tail_mode_statistics`` scores a
set of samples against the known modes.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["AmbiguousTailDataset", "tail_mode_statistics"]


class AmbiguousTailDataset(Dataset):
    """Images of a disc with a hidden tail; each ``__getitem__`` draws a fresh annotator label.

    Items are dicts: ``image`` ``(1, S, S)`` float, ``label`` ``(1, S, S)`` long (one annotator draw),
    ``disc`` and ``tail`` ``(S, S)`` bool masks of the two parts (for scoring). The images (disc
    positions and noise) are fixed by ``seed``; the label draws come from a generator seeded by
    ``seed`` and advanced on every call, so an epoch never repeats the previous one's draws.

    Args:
        num_images: distinct images.
        size: image side S in pixels.
        tail_probability: chance that a draw includes the tail (the minority mode).
        radius: disc radius in pixels.
        tail_length: tail length in pixels, to the right of the disc.
        tail_width: tail height in pixels, centred on the disc.
        noise_std: std of the Gaussian pixel noise.
        seed: fixes the images and the first label draws.
    """

    def __init__(
        self,
        num_images: int,
        size: int = 32,
        tail_probability: float = 0.3,
        radius: float = 4.0,
        tail_length: int = 6,
        tail_width: int = 3,
        noise_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= tail_probability <= 1.0:
            raise ValueError(f"tail_probability must be in [0, 1], got {tail_probability}.")
        margin = int(radius) + 1
        span = size - 2 * margin - tail_length
        if num_images < 1 or span < 1:
            raise ValueError(
                f"AmbiguousTailDataset needs num_images >= 1 and size > 2 * (radius + 1) + tail_length "
                f"(= {2 * margin + tail_length}), got num_images={num_images}, size={size}."
            )
        self.tail_probability = tail_probability
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.images, self.discs, self.tails = [], [], []
        for _ in range(num_images):
            cy = int(torch.randint(margin, size - margin, (1,), generator=g))
            cx = int(torch.randint(margin, margin + span, (1,), generator=g))
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2).float() <= radius**2
            half = tail_width // 2
            tail = (xx > cx + radius) & (xx <= cx + radius + tail_length) & (yy >= cy - half) & (yy <= cy + half)
            tail &= ~disc
            image = disc.float() + noise_std * torch.randn(size, size, generator=g)
            self.images.append(image[None])
            self.discs.append(disc)
            self.tails.append(tail)
        self._label_generator = torch.Generator().manual_seed(seed + 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with_tail = bool(torch.rand((), generator=self._label_generator) < self.tail_probability)
        label = self.discs[index] | (self.tails[index] if with_tail else torch.zeros_like(self.discs[index]))
        return {
            "image": self.images[index],
            "label": label[None].long(),
            "disc": self.discs[index],
            "tail": self.tails[index],
        }

    def batch(self, indices: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The images and part masks of ``indices`` (all by default), stacked, without a label draw."""
        indices = list(range(len(self))) if indices is None else indices
        return {
            "image": torch.stack([self.images[i] for i in indices]),
            "disc": torch.stack([self.discs[i] for i in indices]),
            "tail": torch.stack([self.tails[i] for i in indices]),
        }


def tail_mode_statistics(
    samples: torch.Tensor,
    tail: torch.Tensor,
    disc: torch.Tensor,
    whole: float = 0.9,
    none: float = 0.1,
) -> dict[str, float]:
    """Score hard samples against the two known modes.

    A sample *draws the tail* when at least ``whole`` of the tail pixels are foreground, *omits* it
    when at most ``none`` are, and is *partial* otherwise (an incoherent fragment no annotator drew).

    Args:
        samples: hard foreground maps ``(B, M, S, S)`` (class 1 is foreground).
        tail: ``(B, S, S)`` bool tail masks.
        disc: ``(B, S, S)`` bool disc masks.
        whole: tail coverage at or above which the tail counts as drawn.
        none: tail coverage at or below which the tail counts as omitted.

    Returns:
        ``tail_frequency`` (share of samples drawing the whole tail), ``partial_share`` (share of
        partial samples), ``omitted_share``, ``per_image_frequency_std`` (spread of the per-image tail
        frequency over images), ``disc_recall`` (mean share of disc pixels marked foreground) and
        ``background_false_positive`` (mean share of pixels outside disc and tail marked foreground).
    """
    foreground = samples == 1
    tail_b = tail[:, None]
    coverage = (foreground & tail_b).flatten(2).sum(-1).float() / tail_b.flatten(2).sum(-1).clamp_min(1).float()
    drawn, omitted = coverage >= whole, coverage <= none
    partial = ~(drawn | omitted)
    disc_b = disc[:, None]
    disc_recall = (foreground & disc_b).flatten(2).sum(-1).float() / disc_b.flatten(2).sum(-1).clamp_min(1).float()
    outside = ~(disc_b | tail_b)
    background_fp = (foreground & outside).flatten(2).sum(-1).float() / outside.flatten(2).sum(-1).float()
    per_image = drawn.float().mean(dim=1)
    return {
        "tail_frequency": float(drawn.float().mean()),
        "partial_share": float(partial.float().mean()),
        "omitted_share": float(omitted.float().mean()),
        "per_image_frequency_std": float(per_image.std()) if per_image.numel() > 1 else 0.0,
        "disc_recall": float(disc_recall.mean()),
        "background_false_positive": float(background_fp.mean()),
    }
