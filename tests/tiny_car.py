"""Tiny CAR networks, an ambiguous synthetic segmentation task and a stage-2 trainer factory shared by the tests."""

from __future__ import annotations

import torch

from car_med.engines import CARTrainer
from car_med.losses import pixelwise_cross_entropy
from car_med.networks import Discriminator, NoiseInjectedUNet, SegNetCalibrationNet


def make_tiny_nets(seed: int = 0, noise_dim: int = 4, num_classes: int = 2, f_dropout: float = 0.0):
    """F (SegNet), G (U-Net) and D at a few channels each, seeded."""
    torch.manual_seed(seed)
    f = SegNetCalibrationNet(
        in_channels=1, out_channels=num_classes, channels=(8, 16), convs_per_block=(1, 1), dropout=f_dropout
    )
    g = NoiseInjectedUNet(
        image_channels=1, num_classes=num_classes, noise_dim=noise_dim, channels=(8, 16, 16, 16), dropout=0.0
    )
    d = Discriminator(image_channels=1, num_classes=num_classes, channels=(8, 16))
    return f, g, d


def ambiguous_discs(num: int, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Bright discs; annotator 0 outlines the inner disc, annotator 1 a larger one (real ambiguity)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    items = []
    for _ in range(num):
        cy, cx = (torch.randint(10, size - 10, (2,), generator=g)).tolist()
        radius = float(torch.randint(4, 7, (1,), generator=g))
        dist = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
        image = (dist < radius).float() + 0.5 * ((dist >= radius) & (dist < radius + 2)).float()
        image = image + 0.05 * torch.randn(size, size, generator=g)
        labels = torch.stack([(dist < radius), (dist < radius + 2)]).long()
        items.append({"image": image[None], "labels": labels})
    return items


class RandomAnnotatorBatches(torch.utils.data.Dataset):
    """Items with one annotator's mask chosen per item, seeded, as the LIDC training transform does."""

    def __init__(self, items, seed=0, poison_index=None):
        self.items, self.seed, self.poison_index = items, seed, poison_index

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        k = int(torch.randint(0, item["labels"].shape[0], (1,), generator=torch.Generator().manual_seed(self.seed + i)))
        image = item["image"].clone()
        if self.poison_index is not None and i == self.poison_index:
            image[:] = float("nan")
        return {"image": image, "label": item["labels"][k : k + 1]}


def mean_ce(f, items):
    f.eval()
    with torch.no_grad():
        image = torch.stack([it["image"] for it in items])
        label = torch.stack([it["labels"][0:1] for it in items])
        return float(pixelwise_cross_entropy(f(image), label))


def make_stage2_trainer(f, g, d, loader, **kwargs):
    """A ``CARTrainer`` at the paper's optimiser settings; ``kwargs`` override or extend its arguments."""
    kwargs.setdefault("num_classes", 2)
    return CARTrainer(
        device="cpu",
        max_epochs=kwargs.pop("max_epochs", 1),
        train_data_loader=loader,
        calibration_network=f,
        refinement_network=g,
        discriminator=d,
        g_optimizer=torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.99)),
        d_optimizer=torch.optim.Adam(d.parameters(), 1e-5, betas=(0.5, 0.99)),
        noise_dim=g.noise_dim,
        **kwargs,
    )
