"""Networks on a *packed* input: the image followed by conditioning channels that only F reads.

MONAI's ``SupervisedTrainer``, :class:`~car_med.engines.CARTrainer` and :class:`~car_med.sampling.CARSampler`
call F with one tensor, ``F(image)``. On Cityscapes F also needs a second input: the black box's one-hot
prediction (CAR) or the true label (the cGAN+L_cal(gt) baseline). The bundle therefore packs those channels
after the image (``car_med.data.cityscapes_packing``), and:

- :class:`PackedBlackBoxCalibrationNet` (F) splits the packed input into the image and the black box's one-hot;
- :class:`LabelDistributionCalibration` (F of cGAN+L_cal(gt)) turns the packed label into the analytic
  per-pixel label distribution of the stochastic classes, with no parameters;
- :class:`PackedInputRefinementUNet` (G) and :class:`PackedInputDiscriminator` (D) drop the packed channels,
  so they see the RGB image only, as in the authors' code (G gets the image and F's output, D the image and a
  label map).

The subclasses keep their parent's state-dict keys, so checkpoints load into the parent classes too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from car_med.data.stochastic_classes import CITYSCAPES_STOCHASTIC_CLASSES, check_stochastic_classes
from car_med.networks.calibration import BlackBoxCalibrationNet
from car_med.networks.discriminator import Discriminator
from car_med.networks.refinement import NoiseInjectedUNet

__all__ = [
    "LabelDistributionCalibration",
    "PackedBlackBoxCalibrationNet",
    "PackedInputDiscriminator",
    "PackedInputRefinementUNet",
    "analytic_label_distribution",
]


def _check_packed(name: str, x: torch.Tensor, expected: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise ValueError(f"{name}: expected a packed input (B, C, *spatial), got {getattr(x, 'shape', type(x))}.")
    if x.shape[1] != expected:
        raise ValueError(f"{name}: the packed input must have {expected} channels ({what}), got {x.shape[1]}.")


class PackedBlackBoxCalibrationNet(BlackBoxCalibrationNet):
    """:class:`BlackBoxCalibrationNet` called as ``F(packed)``, ``packed = cat(image, blackbox_onehot)``.

    The black box predicts ``blackbox_channels`` classes (the 19 Cityscapes trainIds); F predicts
    ``num_classes`` (25: the 19, the 5 flipped classes and ignore 24). The one-hot is zero-padded to
    ``num_classes`` channels, as the authors one-hot the black box's prediction to all 25 label channels.

    Args:
        image_channels: image channels (3, RGB).
        num_classes: F's classes.
        blackbox_channels: channels of the black box's one-hot in the packed input (<= ``num_classes``).
        kwargs: the other :class:`BlackBoxCalibrationNet` arguments (``channels``, ``num_blocks``, ``dropout``...).
    """

    def __init__(self, image_channels: int = 3, num_classes: int = 25, blackbox_channels: int = 19, **kwargs) -> None:
        if not 1 <= blackbox_channels <= num_classes:
            raise ValueError(f"blackbox_channels must be in [1, num_classes={num_classes}], got {blackbox_channels}.")
        super().__init__(image_channels=image_channels, num_classes=num_classes, **kwargs)
        self.blackbox_channels = blackbox_channels

    @property
    def packed_channels(self) -> int:
        """Channels of the packed input: image then the black box's one-hot."""
        return self.image_channels + self.blackbox_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits ``(B, num_classes, *spatial)`` from the packed input ``(B, packed_channels, *spatial)``."""
        _check_packed(type(self).__name__, x, self.packed_channels, "image, then the black box's one-hot")
        image, onehot = x[:, : self.image_channels], x[:, self.image_channels :]
        pad = self.num_classes - self.blackbox_channels
        if pad:
            onehot = torch.cat([onehot, onehot.new_zeros(onehot.shape[0], pad, *onehot.shape[2:])], dim=1)
        return super().forward(image, onehot)


def analytic_label_distribution(
    label: torch.Tensor,
    num_classes: int,
    stochastic_classes: Sequence[tuple[int, int, float]] = CITYSCAPES_STOCHASTIC_CLASSES,
) -> torch.Tensor:
    """The true per-pixel label distribution ``(B, num_classes, *spatial)`` of integer labels ``(B, *spatial)``.

    A pixel of a stochastic pair (base or flipped: either gives the same distribution) has ``1 - p`` on the base
    class and ``p`` on the flipped one; every other pixel is one-hot on its class (ignore 24 included, when
    ``num_classes`` has a channel for it). It equals the weighted mean of the one-hot ``2**K`` label modes.

    Raises:
        ValueError: a label value outside ``[0, num_classes)``, or a stochastic class without a channel.
    """
    triples = check_stochastic_classes(stochastic_classes)
    label = label.long()
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(
            f"label values must be in [0, {num_classes - 1}], got [{int(label.min())}, {int(label.max())}]."
        )
    missing = [c for b, f, _ in triples for c in (b, f) if c >= num_classes]
    if missing:
        raise ValueError(f"stochastic classes {missing} have no channel among num_classes={num_classes}.")
    dist = F.one_hot(label, num_classes).movedim(-1, 1).to(torch.float32)
    for base, flipped, p in triples:
        member = ((label == base) | (label == flipped)).to(torch.float32)
        dist[:, base] = torch.where(member > 0, torch.full_like(member, 1.0 - p), dist[:, base])
        dist[:, flipped] = torch.where(member > 0, torch.full_like(member, p), dist[:, flipped])
    return dist


class LabelDistributionCalibration(nn.Module):
    """F of the cGAN+L_cal(gt) baseline: the analytic label distribution, read from the packed label.

    ``packed = cat(image, label)``: the last channel holds each pixel's class id (as a float). The output is
    ``log(max(dist, floor))``, logits whose softmax is the true per-pixel distribution (to within ``floor``), so
    every trainer and sampler that applies softmax to F's output gets ``dist``. No parameters: there is no
    stage 1.

    Args:
        image_channels: image channels before the label channel.
        num_classes: output classes (25 on Cityscapes).
        stochastic_classes: ``(base, flipped, probability)`` triples (lists from JSON are accepted).
        log_floor: floor of the probabilities before the log.
    """

    def __init__(
        self,
        image_channels: int = 3,
        num_classes: int = 25,
        stochastic_classes: Sequence[Sequence[float]] = CITYSCAPES_STOCHASTIC_CLASSES,
        log_floor: float = 1e-8,
    ) -> None:
        super().__init__()
        if not 0.0 < log_floor < 1.0:
            raise ValueError(f"log_floor must be in (0, 1), got {log_floor}.")
        self.image_channels = image_channels
        self.num_classes = num_classes
        self.stochastic_classes = check_stochastic_classes(
            [(int(b), int(f), float(p)) for b, f, p in stochastic_classes]
        )
        self.log_floor = log_floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)`` from ``(B, image_channels + 1, *spatial)``."""
        _check_packed(type(self).__name__, x, self.image_channels + 1, "image, then the label's class ids")
        raw = x[:, self.image_channels]
        label = raw.round()
        if bool((label - raw).abs().max() > 1e-3):
            raise ValueError(f"{type(self).__name__}: the packed label channel must hold integer class ids.")
        dist = analytic_label_distribution(label.long(), self.num_classes, self.stochastic_classes)
        return dist.clamp_min(self.log_floor).log().to(x.dtype)


class PackedInputRefinementUNet(NoiseInjectedUNet):
    """:class:`NoiseInjectedUNet` that accepts the packed input and sees only its first ``image_channels``.

    ``G(packed, calibration, noise)`` equals ``NoiseInjectedUNet.forward(packed[:, :image_channels], ...)``; the
    plain image is accepted too. ``memory_saving="chunked"`` in :class:`~car_med.engines.CARTrainer` runs G's
    blocks directly on the packed input and is refused with a clear error: use ``memory_saving="none"``.

    ``noise_scale_bias`` initialises the bias of every :class:`~car_med.networks.refinement.NoiseInjection`'s
    scale layer. The authors' (and the parent's) 0 makes the scale ``s(eps)`` zero-mean, so at the start the
    mean over eps of G's output does not depend on the image or on F at all; G first has to grow these biases,
    which takes thousands of iterations at the paper's learning rate. With 1 (AdaIN's and StyleGAN's
    convention, ``features * (1 + s'(eps))``) G starts as a noise-modulated copy of its features, which the
    short CPU demo needs to learn the flips of every class (docs/cityscapes.md, "Demo numbers").

    Args:
        extra_channels: channels packed after the image (19 for the black box, 1 for the label).
        noise_scale_bias: initial bias of the noise injections' scale layers (0, the authors' init).
        kwargs: :class:`NoiseInjectedUNet` arguments.
    """

    def __init__(self, extra_channels: int = 19, noise_scale_bias: float = 0.0, **kwargs) -> None:
        if extra_channels < 0:
            raise ValueError(f"extra_channels must be >= 0, got {extra_channels}.")
        super().__init__(**kwargs)
        self.extra_channels = extra_channels
        self.noise_scale_bias = float(noise_scale_bias)
        for site in self.inject.values():
            nn.init.constant_(site.scale.bias, self.noise_scale_bias)

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[1] == self.image_channels + self.extra_channels:
            return x[:, : self.image_channels]
        return x

    def _check_inputs(self, x, calibration, noise, noise_shape=("B", "Z")) -> None:
        if self.extra_channels and x.shape[1] == self.image_channels + self.extra_channels:
            raise ValueError(
                f"{type(self).__name__} got the packed input where the image alone was expected: CARTrainer's "
                "memory_saving='chunked' runs G's blocks on the packed input; use memory_saving='none'."
            )
        super()._check_inputs(x, calibration, noise, noise_shape)

    def encode(self, x: torch.Tensor, calibration: torch.Tensor) -> list[torch.Tensor]:
        return super().encode(self._image(x), calibration)

    def forward(self, x, calibration, noise, return_logits: bool = False) -> torch.Tensor:
        return super().forward(self._image(x), calibration, noise, return_logits)

    def forward_samples(self, x, calibration, noise, return_logits: bool = False) -> torch.Tensor:
        return super().forward_samples(self._image(x), calibration, noise, return_logits)


class PackedInputDiscriminator(Discriminator):
    """:class:`Discriminator` that accepts the packed input and scores only its first ``image_channels``.

    Args:
        extra_channels: channels packed after the image.
        kwargs: :class:`Discriminator` arguments.
    """

    def __init__(self, extra_channels: int = 19, **kwargs) -> None:
        if extra_channels < 0:
            raise ValueError(f"extra_channels must be >= 0, got {extra_channels}.")
        super().__init__(**kwargs)
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim >= 2 and x.shape[1] == self.image_channels + self.extra_channels:
            x = x[:, : self.image_channels]
        return super().forward(x, y)
