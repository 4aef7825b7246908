"""Pack F's conditioning into the image, so every trainer and sampler can keep calling ``F(image)``.

:func:`cityscapes_packed_transforms` is :func:`~car_med.data.cityscapes.cityscapes_transforms` followed by
:class:`PackConditioningd`, which replaces ``image`` ``(3, H, W)`` by

- ``conditioning="blackbox"``: ``cat(image, blackbox)``, ``(3 + 19, H, W)``, for CAR with F on a black box;
- ``conditioning="label"``: ``cat(image, label)``, ``(3 + 1, H, W)``, the label's class ids as a float channel,
  for the cGAN+L_cal(gt) baseline whose F is the analytic label distribution;
- ``conditioning=None``: the image unchanged.

The RGB image stays available as ``rgb``. The matching networks are in :mod:`car_med.networks.conditioned`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_tensor

from car_med.data.cityscapes import cityscapes_transforms

__all__ = ["CONDITIONING_CHOICES", "PackConditioningd", "cityscapes_packed_transforms", "packed_channels"]

CONDITIONING_CHOICES = ("blackbox", "label", None)


def packed_channels(conditioning: str | None, image_channels: int = 3, blackbox_channels: int = 19) -> int:
    """Channels of the packed image for a ``conditioning`` choice."""
    if conditioning not in CONDITIONING_CHOICES:
        raise ValueError(f"conditioning must be one of {CONDITIONING_CHOICES}, got {conditioning!r}.")
    return image_channels + {"blackbox": blackbox_channels, "label": 1, None: 0}[conditioning]


class PackConditioningd(MapTransform):
    """Append the conditioning channels to ``image`` (see the module docstring); keep the RGB image as ``rgb``.

    Args:
        conditioning: ``"blackbox"``, ``"label"`` or ``None``.
        image_key: the image key.
        label_key: the label key (``"label"`` conditioning).
        blackbox_key: the one-hot black-box key (``"blackbox"`` conditioning).
        rgb_key: where the unpacked image is kept; ``None`` keeps nothing.
    """

    def __init__(
        self,
        conditioning: str | None = "blackbox",
        image_key: str = "image",
        label_key: str = "label",
        blackbox_key: str = "blackbox",
        rgb_key: str | None = "rgb",
    ) -> None:
        super().__init__([image_key])
        packed_channels(conditioning)
        self.conditioning = conditioning
        self.image_key, self.label_key, self.blackbox_key, self.rgb_key = image_key, label_key, blackbox_key, rgb_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        if self.rgb_key is not None:
            d[self.rgb_key] = image
        if self.conditioning is None:
            return d
        key = self.blackbox_key if self.conditioning == "blackbox" else self.label_key
        if key not in d:
            raise ValueError(
                f"PackConditioningd(conditioning={self.conditioning!r}) needs '{key}' in the item"
                + (
                    "; the datalist has no black box: rerun python -m preprocessing.cityscapes with --blackbox-dir"
                    if key == self.blackbox_key
                    else ""
                )
                + "."
            )
        extra = convert_to_tensor(d[key], track_meta=False)
        if tuple(extra.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(
                f"PackConditioningd: '{key}' {tuple(extra.shape)} and '{self.image_key}' {tuple(image.shape)} "
                "differ in size."
            )
        d[self.image_key] = torch.cat([image, extra.to(image.dtype)], dim=0)
        return d


def cityscapes_packed_transforms(
    mode: str = "train",
    *,
    conditioning: str | None = "blackbox",
    spatial_size: Sequence[int] | None = None,
    **kwargs: Any,
) -> Compose:
    """:func:`~car_med.data.cityscapes.cityscapes_transforms` then :class:`PackConditioningd`.

    Args:
        mode: ``"train"`` (with the class flips) or ``"eval"``.
        conditioning: ``"blackbox"``, ``"label"`` or ``None``.
        spatial_size: ``(H, W)`` to resize to; ``None`` keeps the preprocessed size.
        kwargs: more :func:`~car_med.data.cityscapes.cityscapes_transforms` arguments (e.g. ``label_modes``).
    """
    packed_channels(conditioning)
    blackbox_key = kwargs.pop("blackbox_key", "blackbox")
    base = cityscapes_transforms(mode, spatial_size=spatial_size, blackbox_key=blackbox_key, **kwargs)
    return Compose([*base.transforms, PackConditioningd(conditioning, blackbox_key=blackbox_key or "blackbox")])
