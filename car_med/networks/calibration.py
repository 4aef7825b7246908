"""Calibration networks F: per-pixel class logits whose softmax is the calibration target of G.

Two variants, following Kassapis et al. (ICCV 2021) and the authors' code (EliasKassapis/CARSSS):

- :class:`SegNetCalibrationNet` (LIDC): a VGG19-BN encoder and a SegNet decoder that upsamples
  with the encoder's max-pooling indices.
- :class:`BlackBoxCalibrationNet` (Cityscapes): a small full-resolution conv net on top of a
  black-box segmenter's one-hot prediction.

Both return logits; apply ``torch.softmax(logits, dim=1)`` to obtain F(x).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Pool
from torch import nn

from car_med.networks.utils import (
    SPATIAL_NAMES,
    check_floating,
    check_input_shape,
    check_min_spatial,
    check_spatial_dims,
)

__all__ = ["SegNetCalibrationNet", "BlackBoxCalibrationNet"]


class SegNetCalibrationNet(nn.Module):
    """SegNet with a VGG19-BN encoder, the LIDC calibration network F.

    Every encoder convolution is 3x3 conv, BatchNorm, ReLU and dropout (the authors add dropout
    after every ReLU of torchvision's VGG19-BN). Each encoder block ends in a 2x2 max-pool whose
    indices the mirrored decoder uses to unpool, as in SegNet (Badrinarayanan et al. 2017). Each
    decoder block has as many convolutions as its encoder block; its last one maps to the channel
    count of the next shallower level. A final 1x1 convolution gives ``out_channels`` logits.

    The authors' code instead upsamples with transposed convolutions and concatenates encoder
    features (a U-Net-like decoder); this class follows the paper's SegNet reference.

    Unpooling is given each pre-pooling size, so odd sizes round-trip exactly
    (180 -> 90 -> 45 -> 22 -> 11 -> 5 -> ... -> 180). The input needs at least ``2 ** len(channels)``
    pixels per spatial dimension (32 with the defaults) and a floating-point dtype; ``forward``
    raises a ``ValueError`` otherwise.

    Args:
        in_channels: image channels.
        out_channels: number of classes.
        channels: feature channels of the encoder blocks (VGG19: 64, 128, 256, 512, 512).
        convs_per_block: convolutions per block (VGG19: 2, 2, 4, 4, 4).
        dropout: dropout probability after every ReLU.
        pretrained_weights: optional local path to a torchvision ``vgg19_bn`` state dict (only the
            encoder ``features.*`` entries are used) or to a state dict of this class. Nothing is
            ever downloaded. With a torchvision dict and ``in_channels != 3``, the first convolution
            keeps its random initialisation, as in the authors' code.
        spatial_dims: 2 (default) or 3.
        act: MONAI activation after every convolution (ReLU, as in VGG).
        norm: MONAI norm after every convolution (``"batch"``, as in VGG19-BN).

    Example::

        net = SegNetCalibrationNet(in_channels=1, out_channels=2)
        probs = torch.softmax(net(torch.rand(2, 1, 180, 180)), dim=1)  # (2, 2, 180, 180)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        convs_per_block: Sequence[int] = (2, 2, 4, 4, 4),
        dropout: float = 0.1,
        pretrained_weights: str | None = None,
        spatial_dims: int = 2,
        act: str | tuple = "relu",
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        channels, convs_per_block = tuple(channels), tuple(convs_per_block)
        if len(channels) == 0 or len(channels) != len(convs_per_block):
            raise ValueError(
                f"channels and convs_per_block must be non-empty and of equal length, "
                f"got {len(channels)} and {len(convs_per_block)}"
            )
        if min(convs_per_block) < 1:
            raise ValueError(f"every block needs at least one convolution, got {convs_per_block}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        # Each of the len(channels) 2x2 max-pools halves the size, rounding down, and must leave >= 1.
        self._min_size = 2 ** len(channels)
        self._size_config = f"channels={channels}"

        def conv(c_in: int, c_out: int) -> Convolution:
            return Convolution(
                spatial_dims,
                c_in,
                c_out,
                kernel_size=3,
                act=act,
                norm=norm,
                dropout=dropout,
                adn_ordering="NAD",
            )

        self.encoder = nn.ModuleList()
        c_in = in_channels
        for c, n in zip(channels, convs_per_block):
            layers = []
            for _ in range(n):
                layers.append(conv(c_in, c))
                c_in = c
            self.encoder.append(nn.Sequential(*layers))

        # decoder[0] mirrors the deepest encoder block.
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(channels))):
            c, n = channels[i], convs_per_block[i]
            c_next = channels[i - 1] if i > 0 else channels[0]
            layers = [conv(c, c) for _ in range(n - 1)] + [conv(c, c_next)]
            self.decoder.append(nn.Sequential(*layers))

        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, return_indices=True)
        # MONAI's Pool factory has no unpooling layer, and SegNet needs index-based unpooling.
        self.unpool = (nn.MaxUnpool2d if spatial_dims == 2 else nn.MaxUnpool3d)(kernel_size=2, stride=2)
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)

        if pretrained_weights is not None:
            self.load_pretrained(pretrained_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map an image ``(B, in_channels, *spatial)`` to logits ``(B, out_channels, *spatial)``."""
        name = type(self).__name__
        check_input_shape(name, "image", x, ("B", self.in_channels, *SPATIAL_NAMES[self.spatial_dims]))
        check_floating(name, "image", x)
        check_min_spatial(name, x, self._min_size, self._size_config)
        sizes, indices = [], []
        h = x
        for block in self.encoder:
            h = block(h)
            sizes.append(h.shape[2:])
            h, idx = self.pool(h)
            indices.append(idx)
        for block, idx, size in zip(self.decoder, reversed(indices), reversed(sizes)):
            h = block(self.unpool(h, idx, output_size=size))
        return self.head(h)

    def load_pretrained(self, path: str) -> None:
        """Load weights from a local file; see ``pretrained_weights`` in the class docstring.

        Raises:
            ValueError: when the file is neither format, or its tensor shapes do not fit this net.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
        if set(state) == set(self.state_dict()):
            self.load_state_dict(state)
        elif any(k.startswith("features.") for k in state):
            self._load_vgg_features(state, path)
        else:
            raise ValueError(
                f"{path} is neither a torchvision vgg19_bn state dict (features.*) nor a "
                f"{type(self).__name__} state dict"
            )

    def _load_vgg_features(self, state: Mapping[str, torch.Tensor], path: str) -> None:
        # torchvision numbers layers by position in `features` (conv, bn, relu, ..., maxpool), so
        # the parametrised layers, taken in index order, pair one-to-one with our conv/BN sequence.
        groups: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
                groups.setdefault(int(parts[1]), {})[parts[2]] = value
        src_convs = [g for _, g in sorted(groups.items()) if "running_mean" not in g]
        src_norms = [g for _, g in sorted(groups.items()) if "running_mean" in g]
        blocks = [b for stage in self.encoder for b in stage]
        if len(src_convs) != len(blocks) or len(src_norms) != len(blocks):
            raise ValueError(
                f"{path} has {len(src_convs)} convolutions and {len(src_norms)} batch norms in "
                f"features.*, but the encoder has {len(blocks)} conv blocks"
            )
        with torch.no_grad():
            for i, (block, src_conv, src_norm) in enumerate(zip(blocks, src_convs, src_norms)):
                targets = [(block.conv, src_conv), (block.adn.N, src_norm)]
                if i == 0 and src_conv["weight"].shape[1] != self.in_channels:
                    warnings.warn(
                        f"pretrained first convolution has {src_conv['weight'].shape[1]} input "
                        f"channels, the net {self.in_channels}: keeping it randomly initialised",
                        stacklevel=3,
                    )
                    targets = [(block.adn.N, src_norm)]
                for module, src in targets:
                    own = module.state_dict()
                    for name, tensor in own.items():
                        if name not in src or src[name].shape != tensor.shape:
                            got = None if name not in src else tuple(src[name].shape)
                            raise ValueError(
                                f"{path}: encoder layer {i} '{name}' expected shape {tuple(tensor.shape)}, got {got}"
                            )
                    module.load_state_dict({k: src[k] for k in own})


class BlackBoxCalibrationNet(nn.Module):
    """Calibration network F on top of a black-box segmenter B (the paper's Cityscapes setting).

    The image and B's one-hot prediction are concatenated and passed through ``num_blocks``
    full-resolution blocks of 3x3 conv, BatchNorm, LeakyReLU(0.2) and dropout, then a 1x1
    convolution to ``num_classes`` logits. Dropout is 0.1 in the paper, 0.2 in the authors' code;
    pass ``dropout=0.2`` to match the code.

    Args:
        image_channels: image channels.
        num_classes: classes, which is also the channel count of B's one-hot prediction.
        channels: feature channels of every block.
        num_blocks: number of conv blocks (5 in the paper).
        dropout: dropout probability after every activation.
        spatial_dims: 2 (default) or 3.
        negative_slope: slope of every LeakyReLU (0.2 in the paper).
        norm: MONAI norm of every block (``"batch"`` in the paper).
    """

    def __init__(
        self,
        image_channels: int = 3,
        num_classes: int = 25,
        channels: int = 32,
        num_blocks: int = 5,
        dropout: float = 0.1,
        spatial_dims: int = 2,
        negative_slope: float = 0.2,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.image_channels = image_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        blocks = []
        c_in = image_channels + num_classes
        for _ in range(num_blocks):
            blocks.append(
                Convolution(
                    spatial_dims,
                    c_in,
                    channels,
                    kernel_size=3,
                    act=("leakyrelu", {"negative_slope": negative_slope}),
                    norm=norm,
                    dropout=dropout,
                    adn_ordering="NAD",
                )
            )
            c_in = channels
        self.blocks = nn.Sequential(*blocks)
        # The logits are kept free of BN, activation and dropout so that softmax can reach any value.
        self.head = Convolution(spatial_dims, channels, num_classes, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor, blackbox_onehot: torch.Tensor) -> torch.Tensor:
        """Map image ``(B, image_channels, *spatial)`` and B's one-hot ``(B, num_classes, *spatial)``
        to logits ``(B, num_classes, *spatial)``."""
        name = type(self).__name__
        spatial = SPATIAL_NAMES[self.spatial_dims]
        bound = check_input_shape(name, "image", x, ("B", self.image_channels, *spatial))
        check_input_shape(name, "blackbox_onehot", blackbox_onehot, ("B", self.num_classes, *spatial), bound)
        check_floating(name, "image", x)
        return self.head(self.blocks(torch.cat([x, blackbox_onehot.to(x.dtype)], dim=1)))
