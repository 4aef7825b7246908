"""Refinement network G: a noise-conditioned U-Net that turns F(x) into coherent samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from car_med.networks.checkpointing import checkpointed
from car_med.networks.dropout import FastDropout
from car_med.networks.utils import SPATIAL_NAMES, check_floating, check_input_shape, check_spatial_dims

__all__ = ["NoiseInjection", "NoiseInjectedUNet", "match_size"]


class NoiseInjection(nn.Module):
    """Channel-wise affine modulation of a feature map by a noise vector, then a 1x1 convolution.

    Two linear layers map eps to a residual r and a scale s, one value per channel, and the block
    computes ``conv1x1((f + r) * (s + 1e-5))``, similar to adaptive instance normalisation.
    Written by hand because MONAI has no noise-conditioned modulation block.

    Initialisation follows the authors' code: Xavier-uniform linear weights with zero bias, so s
    is zero-mean and the output depends strongly on eps from the start; orthogonal 1x1 weights.

    Args:
        spatial_dims: 2 or 3.
        channels: channels of the modulated feature map.
        noise_dim: length of eps.
        out_channels: channels after the 1x1 convolution.
        scale_offset: added to s (the authors' code uses 1e-5, which keeps the product from vanishing
            where s is zero).
    """

    def __init__(
        self, spatial_dims: int, channels: int, noise_dim: int, out_channels: int, scale_offset: float = 1e-5
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.scale_offset = scale_offset
        self.residual = nn.Linear(noise_dim, channels)
        self.scale = nn.Linear(noise_dim, channels)
        self.proj = Convolution(spatial_dims, channels, out_channels, kernel_size=1, conv_only=True)
        for linear in (self.residual, self.scale):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.orthogonal_(self.proj.conv.weight)
        nn.init.trunc_normal_(self.proj.conv.bias, std=1e-3)

    def forward(self, features: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        shape = (noise.shape[0], -1) + (1,) * self.spatial_dims
        r = self.residual(noise).view(shape)
        s = self.scale(noise).view(shape)
        return self.proj((features + r) * (s + self.scale_offset))


def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, *spatial)`` cropped or zero-padded at its trailing borders to the spatial ``size``.

    G's decoder and the chunked stage-2 step (:mod:`car_med.engines.chunked_step`) both align an upsampled
    feature map with its skip connection this way.
    """
    # Stride-2 convs round up (23 -> 12) and x2 upsampling overshoots (12 -> 24); trim the trailing
    # border, which is where the rounding added a position. Negative F.pad crops, positive pads.
    pad: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(tuple(size))):
        pad += [0, int(want) - int(have)]
    return F.pad(x, pad) if any(pad) else x


def _check_architecture(channels: tuple[int, ...], injection: str, upsample: str) -> None:
    """Refuse an unknown ``upsample`` or ``injection``, or too few levels for the injection sites."""
    if upsample not in ("deconv", "resize"):
        raise ValueError(f"upsample must be 'deconv' or 'resize', got {upsample!r}")
    if injection not in ("paper", "code"):
        raise ValueError(f"injection must be 'paper' or 'code', got {injection!r}")
    min_levels = 3 if injection == "code" else 2
    if len(channels) < min_levels:
        raise ValueError(f"injection={injection!r} needs at least {min_levels} levels, got channels={channels}")


@dataclass(frozen=True)
class _BlockFactory:
    """What every down and up block of G shares; calling it builds one block.

    A down block is a 3x3 convolution with stride 2; an up block a 2x2 transposed convolution with stride 2, or
    with ``resize`` nearest-neighbour x2 then a 3x3 convolution. Each is followed by norm, LeakyReLU and dropout.
    """

    spatial_dims: int
    negative_slope: float
    norm: str | tuple
    dropout: float
    resize: bool

    def __call__(self, c_in: int, c_out: int, up: bool) -> nn.Module:
        resize = self.resize
        conv = Convolution(
            self.spatial_dims,
            c_in,
            c_out,
            strides=1 if up and resize else 2,
            kernel_size=3 if not up or resize else 2,
            padding=1 if not up or resize else 0,
            output_padding=0 if up and not resize else None,
            is_transposed=up and not resize,
            act=("leakyrelu", {"negative_slope": self.negative_slope}),
            norm=self.norm,
            dropout=self.dropout,
            adn_ordering="NAD",
        )
        if "D" in conv.adn._modules:
            # G's masks over the B*M folded rows are a large share of a CPU step (see FastDropout)
            conv.adn.D = FastDropout(self.dropout)
        if up and resize:
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv)
        return conv


class NoiseInjectedUNet(nn.Module):
    """The refinement network G of Calibrated Adversarial Refinement (Kassapis et al. 2021).

    Input is the image concatenated with the calibration map F(x), which is detached inside
    ``forward`` so that no gradient from G's losses can reach F. Four down blocks (3x3 conv with
    stride 2, BatchNorm, LeakyReLU(0.2), dropout) halve the resolution; four up blocks (2x2
    transposed conv with stride 2, BatchNorm, LeakyReLU(0.2), dropout) restore it, each taking the
    previous up block's output concatenated with the down block of the same resolution. With the
    default channels the up blocks output 128 (H/8), 64 (H/4), 32 (H/2) and 32 (H) channels, as
    in the authors' code.

    Noise eps of shape ``(B, noise_dim)`` enters through :class:`NoiseInjection`, with the same
    eps at every site of a sample:

    - ``injection="paper"`` (default): after every up block.
    - ``injection="code"``: after the up blocks at H/4, H/2 and H only, as in the authors' code.

    After an intermediate site a LeakyReLU follows; the site at full resolution is also the output
    head, its 1x1 convolution producing the ``num_classes`` logits.

    Sizes that are not multiples of 16 work (180 -> 90 -> 45 -> 23 -> 12): upsampled maps are
    trimmed to the skip's size and the output is exactly the input's size. As the stride-2
    convolutions round up, any size passes in eval mode; in training with a batch of one image,
    BatchNorm needs the deepest map to have more than one pixel, so some spatial dim must exceed
    ``2 ** len(channels)`` (16 with the defaults), else a ``ValueError`` is raised. The image must be
    floating point.

    Args:
        image_channels: image channels.
        num_classes: classes of the calibration map and of the output.
        noise_dim: length of eps (8 for LIDC, 32 for Cityscapes in the paper).
        channels: channels of the down blocks, shallow to deep.
        dropout: dropout probability in every down and up block.
        injection: ``"paper"`` or ``"code"``, see above.
        spatial_dims: 2 (default) or 3.
        negative_slope: slope of every LeakyReLU (0.2 in the paper).
        norm: MONAI norm of the up and down blocks (``"batch"`` in the paper; e.g. ``"instance"``).
        noise_scale_offset: ``scale_offset`` of every :class:`NoiseInjection`.
        full_resolution_skip: concatenate G's input (the image and F(x)) to the last up block's output, so the
            output site sees F at full resolution; without it the output is upsampled from H/2 features only,
            the input's finest skip being the first stride-2 block. A per-sample shift and scale of F's map,
            the simplest coherent sample, is then linear in the output site's input. Off by default (neither
            the paper nor the authors' code has it); on the demo's LIDC crops it did not improve the samples
            (docs/lidc.md, section 11), so ``demo.json`` leaves it off too.
        upsample: ``"deconv"`` (default, the paper's and the code's): each up block is a 2x2 transposed
            convolution with stride 2. ``"resize"``: nearest-neighbour x2, then a 3x3 convolution (Odena et al.
            2016, "Deconvolution and checkerboard artifacts"); the 2x2 transposed convolution paints each
            output pixel of a 2x2 cell with its own kernel weight, the checkerboard seen in Gbar and in the
            samples of the demo (docs/lidc.md, section 11).

    Example::

        g = NoiseInjectedUNet(image_channels=1, num_classes=2, noise_dim=8)
        probs = g(image, torch.softmax(f(image), 1), torch.randn(image.shape[0], 8))
    """

    def __init__(
        self,
        image_channels: int = 1,
        num_classes: int = 2,
        noise_dim: int = 8,
        channels: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.1,
        injection: str = "paper",
        spatial_dims: int = 2,
        negative_slope: float = 0.2,
        norm: str | tuple = "batch",
        noise_scale_offset: float = 1e-5,
        full_resolution_skip: bool = False,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        channels = tuple(channels)
        _check_architecture(channels, injection, upsample)
        self.upsample = upsample
        self.image_channels = image_channels
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.injection = injection
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.full_resolution_skip = bool(full_resolution_skip)
        self.checkpoint_blocks = False
        """In training with gradients, run every down, up and injection block under ``torch.utils.checkpoint``
        (:func:`~car_med.networks.checkpointing.checkpointed`): only block inputs are kept for the backward
        pass. A run-time switch, not part of the architecture (``CARTrainer(memory_saving="checkpoint")``)."""
        n = len(channels)

        block = _BlockFactory(spatial_dims, negative_slope, norm, dropout, resize=upsample == "resize")
        self.down = nn.ModuleList()
        c_in = image_channels + num_classes
        for c in channels:
            self.down.append(block(c_in, c, up=False))
            c_in = c

        # up[j] returns to the resolution of down[n - 2 - j] (the input's for the last one).
        up_out = [channels[n - 2 - j] for j in range(n - 1)] + [channels[0]]
        self.up = nn.ModuleList()
        for j, c_out in enumerate(up_out):
            c_in = channels[-1] if j == 0 else up_out[j - 1] + channels[n - 1 - j]
            self.up.append(block(c_in, c_out, up=True))

        injected = range(n) if injection == "paper" else range(n - 3, n)
        self.inject = nn.ModuleDict(
            {
                str(j): NoiseInjection(
                    spatial_dims,
                    up_out[j] + (image_channels + num_classes if j == n - 1 and full_resolution_skip else 0),
                    noise_dim,
                    num_classes if j == n - 1 else up_out[j],
                    scale_offset=noise_scale_offset,
                )
                for j in injected
            }
        )
        self.act = nn.LeakyReLU(negative_slope)

    def _check_inputs(
        self,
        x: torch.Tensor,
        calibration: torch.Tensor | None,
        noise: torch.Tensor | None,
        noise_shape: Sequence[str] = ("B", "Z"),
    ) -> None:
        name = type(self).__name__
        spatial = SPATIAL_NAMES[self.spatial_dims]
        bound = check_input_shape(name, "image", x, ("B", self.image_channels, *spatial))
        if calibration is not None:
            check_input_shape(name, "calibration", calibration, ("B", self.num_classes, *spatial), bound)
        if noise is not None:
            expected = tuple(self.noise_dim if d == "Z" else d for d in noise_shape)
            check_input_shape(name, "noise", noise, expected, bound)
        check_floating(name, "image", x)
        # Stride-2 convs round up, so any size survives the down path, but the deepest map is
        # 1 pixel when every dim is <= 2 ** n; BatchNorm in training then sees one value per channel
        # if the batch is a single image.
        n = len(self.channels)
        spatial = tuple(x.shape[2:])
        if self.training and x.shape[0] == 1 and max(spatial) <= 2**n:
            raise ValueError(
                f"{name} needs a spatial dim >= {2**n + 1} with channels={self.channels} when training with "
                f"batch size 1 (BatchNorm needs more than one value per channel after {n} stride-2 stages), "
                f"got {spatial}; use a larger input, a batch of >= 2, or eval mode"
            )

    def encode(self, x: torch.Tensor, calibration: torch.Tensor) -> list[torch.Tensor]:
        """Run the noise-free down path once; the result can be decoded with many eps draws.

        Returns:
            the down blocks' outputs, shallow to deep, followed by G's input ``cat(image, F(x))`` (the
            full-resolution skip with ``full_resolution_skip``; otherwise used only for its spatial size).
        """
        self._check_inputs(x, calibration, None)
        h = torch.cat([x, calibration.detach().to(x.dtype)], dim=1)
        feats = []
        for block in self.down:
            feats.append(self._block(block, feats[-1] if feats else h))
        return feats + [h]

    def _block(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
            return checkpointed(block, *inputs)
        return block(*inputs)

    def decode(
        self, features: Sequence[torch.Tensor], noise: torch.Tensor, return_logits: bool = False
    ) -> torch.Tensor:
        """Decode :meth:`encode` output with noise ``(B, noise_dim)``; see :meth:`forward`."""
        *skips, x = features
        check_input_shape(type(self).__name__, "noise", noise, (skips[-1].shape[0], self.noise_dim))
        n = len(self.up)
        h = skips[-1]
        for j, up in enumerate(self.up):
            target = skips[n - 2 - j] if j < n - 1 else x
            h = match_size(self._block(up, h), target.shape[2:])
            if j == n - 1 and self.full_resolution_skip:
                if x.shape[0] != h.shape[0]:
                    raise ValueError(
                        f"{type(self).__name__}: with full_resolution_skip the last feature (G's input) needs one "
                        f"row per noise row, got {x.shape[0]} for {h.shape[0]}; repeat it as the other features."
                    )
                h = torch.cat([h, x], dim=1)
            if str(j) in self.inject:
                h = self._block(self.inject[str(j)], h, noise.to(h.dtype))
                if j < n - 1:
                    h = self.act(h)
            if j < n - 1:
                h = torch.cat([h, target], dim=1)
        # "code" leaves the first up blocks uninjected, but the last site is always injected.
        return h if return_logits else torch.softmax(h, dim=1)

    def forward(
        self, x: torch.Tensor, calibration: torch.Tensor, noise: torch.Tensor, return_logits: bool = False
    ) -> torch.Tensor:
        """One refined sample per image.

        Args:
            x: image ``(B, image_channels, *spatial)``.
            calibration: F's probabilities ``(B, num_classes, *spatial)``; detached here.
            noise: eps ``(B, noise_dim)``.
            return_logits: return logits instead of softmax probabilities.

        Returns:
            probabilities (or logits) ``(B, num_classes, *spatial)``.

        Raises:
            ValueError: when a shape does not match, the image is not floating point, or the input
                is too small for training (see the class docstring).
        """
        self._check_inputs(x, calibration, noise)
        return self.decode(self.encode(x, calibration), noise, return_logits=return_logits)

    def forward_samples(
        self, x: torch.Tensor, calibration: torch.Tensor, noise: torch.Tensor, return_logits: bool = False
    ) -> torch.Tensor:
        """M samples per image, encoding each image once.

        The M draws are folded into the batch only for the decoder, so the encoder runs B times
        rather than B*M. In train mode the M samples of an image therefore share one encoder
        dropout mask; call :meth:`forward` on a folded batch if independent masks are wanted.

        Args:
            x: image ``(B, image_channels, *spatial)``.
            calibration: ``(B, num_classes, *spatial)``; detached here.
            noise: eps ``(B, M, noise_dim)``.
            return_logits: return logits instead of probabilities.

        Returns:
            ``(B, M, num_classes, *spatial)``.
        """
        self._check_inputs(x, calibration, noise, noise_shape=("B", "M", "Z"))
        b, m = noise.shape[:2]
        *skips, g_input = self.encode(x, calibration)
        feats = [f.repeat_interleave(m, dim=0) for f in [*skips, g_input]]
        out = self.decode(feats, noise.reshape(b * m, -1), return_logits=return_logits)
        return out.reshape(b, m, *out.shape[1:])
