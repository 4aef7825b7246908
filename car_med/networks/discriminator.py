"""Discriminator D: tells annotator label maps from G's samples, given the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv, Pool
from torch import nn

from car_med.networks.utils import (
    SPATIAL_NAMES,
    check_floating,
    check_input_shape,
    check_min_spatial,
    check_spatial_dims,
)

__all__ = ["Discriminator"]


class Discriminator(nn.Module):
    """DCGAN-like discriminator without normalisation layers (Kassapis et al. 2021, Sec. 4).

    The image and a label map are concatenated and passed through stride-2 convolutions, each
    followed by LeakyReLU(0.2). Normalisation is left out as in the paper; batch statistics would
    also couple the samples of a batch, whereas the R1 penalty treats each real input on its own.
    The head makes the net
    size-agnostic, unlike the authors' fully connected head, which fixed the input size:

    - ``head="global_avg"`` (default): global average pooling, then a linear layer.
    - ``head="patch"``: a 3x3 convolution to one channel, whose patch logits are averaged.

    ``full_resolution_convs`` puts stride-1 3x3 convolutions (reflection padding, LeakyReLU) before the
    first stride-2 one, as the authors' ``PixelDiscriminator`` does: it starts with three 64-channel
    convolutions at full resolution (``full_resolution_convs=3``). The default, 0, is the lighter
    DCGAN stack that the paper describes; at LIDC's 128x128 the authors' three convolutions cost about
    three times as many multiply-adds as the whole default D (see docs/performance.md).

    With ``kernel_size=4`` (padding 1) each stage halves the size, rounding down, so the input
    needs at least ``2 ** len(channels)`` pixels per dimension (16 with the defaults); ``forward``
    raises a ``ValueError`` for smaller inputs and for a non-floating-point image.

    Args:
        image_channels: image channels.
        num_classes: classes of the label map.
        channels: output channels of the stride-2 convolutions.
        kernel_size: kernel size of the stride-2 convolutions.
        head: ``"global_avg"`` or ``"patch"``.
        spatial_dims: 2 (default) or 3.
        negative_slope: slope of every LeakyReLU (0.2 in the paper).
        full_resolution_convs: stride-1 3x3 convolutions before the stride-2 stack (0 by default; 3 in the
            authors' code).
        full_resolution_channels: their output channels; ``channels[0]`` by default (64, as in the
            authors' code).

    Example::

        d = Discriminator(image_channels=1, num_classes=2)  # the paper's light D
        d_authors = Discriminator(image_channels=1, num_classes=2, full_resolution_convs=3)
        logits = d(image, torch.softmax(g_logits, 1))  # (B, 1)
    """

    def __init__(
        self,
        image_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (64, 128, 256, 512),
        kernel_size: int = 4,
        head: str = "global_avg",
        spatial_dims: int = 2,
        negative_slope: float = 0.2,
        full_resolution_convs: int = 0,
        full_resolution_channels: int | None = None,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels must not be empty")
        if full_resolution_convs < 0:
            raise ValueError(f"full_resolution_convs must be >= 0, got {full_resolution_convs}")
        if head not in ("global_avg", "patch"):
            raise ValueError(f"head must be 'global_avg' or 'patch', got {head!r}")
        self.image_channels = image_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.head_type = head
        padding = (kernel_size - 1) // 2
        # Smallest size whose every stage output, floor((s + 2p - k) / 2) + 1, stays >= 1: walk the
        # stages backwards from one output pixel (2 ** len(channels) for kernel_size=4).
        need = 1
        for _ in channels:
            need = max(1, 2 * (need - 1) + kernel_size - 2 * padding)
        self._min_size = need
        self._size_config = f"channels={channels}" + ("" if kernel_size == 4 else f", kernel_size={kernel_size}")

        c_in = image_channels + num_classes
        stem: list[nn.Module] = []
        width = channels[0] if full_resolution_channels is None else full_resolution_channels
        for _ in range(full_resolution_convs):
            # reflection padding as in the authors' code: the border is not seen as a frame of zeros
            stem += [
                Conv[Conv.CONV, spatial_dims](c_in, width, kernel_size=3, padding=1, padding_mode="reflect"),
                nn.LeakyReLU(negative_slope),
            ]
            c_in = width
        # empty by default, so the default D's state dict keeps its keys
        self.stem = nn.Sequential(*stem)
        layers = []
        for c in channels:
            layers.append(
                Convolution(
                    spatial_dims,
                    c_in,
                    c,
                    strides=2,
                    kernel_size=kernel_size,
                    # Explicit because MONAI's "same" padding is undefined for even kernels.
                    padding=padding,
                    act=("leakyrelu", {"negative_slope": negative_slope}),
                    norm=None,
                    dropout=None,
                )
            )
            c_in = c
        self.features = nn.Sequential(*layers)
        if head == "global_avg":
            self.head = nn.Sequential(
                Pool[Pool.ADAPTIVEAVG, spatial_dims](1), nn.Flatten(1), nn.Linear(channels[-1], 1)
            )
        else:
            self.head = Convolution(spatial_dims, channels[-1], 1, kernel_size=3, conv_only=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Score image ``(B, image_channels, *spatial)`` with label map ``(B, num_classes, *spatial)``.

        ``y`` is one-hot for real labels and G's softmax for fakes.

        Returns:
            logits ``(B, 1)``; apply a sigmoid for the probability of "real".

        Raises:
            ValueError: when a shape does not match, the input is below the minimum size, or the
                image is not floating point.
        """
        name = type(self).__name__
        spatial = SPATIAL_NAMES[self.spatial_dims]
        bound = check_input_shape(name, "image", x, ("B", self.image_channels, *spatial))
        check_input_shape(name, "label map", y, ("B", self.num_classes, *spatial), bound)
        check_floating(name, "image", x)
        check_min_spatial(name, x, self._min_size, self._size_config)
        h = self.features(self.stem(torch.cat([x, y.to(x.dtype)], dim=1)))
        out = self.head(h)
        return out if self.head_type == "global_avg" else out.flatten(1).mean(dim=1, keepdim=True)
