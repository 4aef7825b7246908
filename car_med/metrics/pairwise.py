"""Shared kernel: all pairwise IoUs between the samples and labels of each image, as batched matrix products.

Every metric in this package (GED, HM-IoU, sample diversity) is a function of three IoU matrices per image:
samples vs labels ``(N, R)``, samples vs samples ``(N, N)`` and labels vs labels ``(R, R)``. They are computed here
once, for all images of a batch, without a Python loop over pairs:

* for each class ``c`` the maps are turned into flattened 0/1 masks, and the intersections of all pairs are one
  ``bmm`` of the mask matrix with its transpose;
* mask sizes are row sums (or, where a pair has its own ignore mask, one more ``bmm`` against the valid masks),
  and unions are ``|a| + |b| - |a & b|``;
* columns (pixels) where no map of the chunk has class ``c`` are dropped before the product. They add nothing to
  any intersection or size, and for sparse foregrounds (LIDC lesions) most pixels are such columns;
* images and pixels are processed in chunks, so memory stays bounded (N=100 at 256x512, or 3D volumes); counts are
  additive over pixels, so pixel chunks are simply summed.

The products run in float32 on 0/1 values with at most ``2**24`` pixels per chunk, so every count is an exact
integer; ratios are taken in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.utils import convert_to_tensor

__all__ = ["PairwiseIoU", "pairwise_iou", "check_label_maps", "as_class_tuple", "as_ignore_tuple"]

# float32 represents every integer up to 2**24 exactly, so per-chunk counts of 0/1 products are exact.
_EXACT_FLOAT32_COUNT = 2**24
DEFAULT_MAX_ELEMENTS = 2**24


class PairwiseIoU(NamedTuple):
    """IoU matrices of one batch, float64; a block is ``None`` when it was not requested.

    Attributes:
        sy: samples vs labels, ``(B, N, R)``.
        ss: samples vs samples, ``(B, N, N)``.
        yy: labels vs labels, ``(B, R, R)``.
    """

    sy: torch.Tensor | None
    ss: torch.Tensor | None
    yy: torch.Tensor | None


def as_class_tuple(classes: int | Sequence[int], name: str = "classes") -> tuple[int, ...]:
    """Validate a class id or a sequence of class ids and return them as a tuple of ints.

    Raises:
        ValueError: when empty, not integers, negative or repeated.
    """
    values = (classes,) if isinstance(classes, (int, np.integer)) else tuple(classes)
    if len(values) == 0:
        raise ValueError(f"{name} must name at least one class id, got an empty sequence.")
    out = []
    for c in values:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise ValueError(f"{name} must be integer class ids, got {c!r} in {values!r}.")
        if c < 0:
            raise ValueError(f"class id out of range: {name} contains {int(c)}, class ids must be >= 0.")
        out.append(int(c))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} contains repeated class ids: {tuple(out)}.")
    return tuple(out)


def as_ignore_tuple(ignore_index: int | Sequence[int] | None) -> tuple[int, ...]:
    """Normalise ``ignore_index`` (None, one value or several, e.g. Cityscapes' ``(24, 255)``) to a tuple."""
    if ignore_index is None:
        return ()
    values = (ignore_index,) if isinstance(ignore_index, (int, np.integer)) else tuple(ignore_index)
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"ignore_index must be an int or a sequence of ints, got {ignore_index!r}.")
    return tuple(int(v) for v in values)


def _as_label_tensor(x: object, name: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name} is required, got None.")
    t = convert_to_tensor(x, track_meta=False)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}.")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"{name} must be integer label maps (hard samples are argmax maps), got dtype {t.dtype} "
            f"with shape {tuple(t.shape)}; take argmax over the class axis first."
        )
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t


def _check_range(
    t: torch.Tensor, name: str, num_classes: int | None, ignore: tuple[int, ...]
) -> None:
    if num_classes is None or t.numel() == 0:
        return
    bad = (t < 0) | (t >= num_classes)
    if ignore:
        bad &= ~torch.isin(t, torch.tensor(ignore, device=t.device, dtype=t.dtype))
    if bool(bad.any()):
        value = int(t[bad].flatten()[0])
        raise ValueError(
            f"class id out of range: {name} with shape {tuple(t.shape)} contains {value}, "
            f"expected values in [0, {num_classes}) or ignore_index {ignore or None}."
        )


def check_label_maps(
    samples: object,
    labels: object | None,
    classes: int | Sequence[int],
    ignore_index: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    label_name: str = "labels",
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...], tuple[int, ...]]:
    """Validate ``samples (B, N, *spatial)`` and ``labels (B, R, *spatial)`` integer label maps.

    Args:
        samples: hard samples, integer (or bool) label maps ``(B, N, *spatial)``.
        labels: annotator labels ``(B, R, *spatial)``, or None where only samples are needed.
        classes: class ids the IoU is taken over.
        ignore_index: label value(s) whose pixels are excluded.
        num_classes: if given, every class id and every map value (apart from ignore values) must lie in
            ``[0, num_classes)``.
        label_name: the name used for ``labels`` in error messages.

    Returns:
        ``(samples, labels, classes, ignore)`` with labels moved to the samples' device.

    Raises:
        ValueError: on float maps, too few dims, mismatched batch or spatial shapes, or out-of-range class ids.
    """
    classes_t = as_class_tuple(classes)
    ignore = as_ignore_tuple(ignore_index)
    clash = set(classes_t) & set(ignore)
    if clash:
        raise ValueError(f"classes {classes_t} and ignore_index {ignore} overlap at {sorted(clash)}.")
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        out = [c for c in classes_t if c >= num_classes]
        if out:
            raise ValueError(f"class id out of range: classes {classes_t} contains {out}, num_classes={num_classes}.")

    s = _as_label_tensor(samples, "samples")
    if s.ndim < 3:
        raise ValueError(f"samples must have shape (B, N, *spatial) with at least one spatial dim, got {tuple(s.shape)}.")
    if s.shape[1] < 1:
        raise ValueError(f"samples must hold at least one sample per image, got shape {tuple(s.shape)}.")
    _check_range(s, "samples", num_classes, ())
    if labels is None:
        return s, None, classes_t, ignore

    y = _as_label_tensor(labels, label_name)
    if y.ndim != s.ndim:
        raise ValueError(
            f"samples {tuple(s.shape)} and {label_name} {tuple(y.shape)} must both be (B, N|R, *spatial) "
            "with the same number of dims."
        )
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"batch size mismatch: samples {tuple(s.shape)} vs {label_name} {tuple(y.shape)}.")
    if y.shape[2:] != s.shape[2:]:
        raise ValueError(
            f"spatial shape mismatch: samples {tuple(s.shape)} has {tuple(s.shape[2:])}, "
            f"{label_name} {tuple(y.shape)} has {tuple(y.shape[2:])}."
        )
    if y.shape[1] < 1:
        raise ValueError(f"{label_name} must hold at least one label per image, got shape {tuple(y.shape)}.")
    _check_range(y, label_name, num_classes, ignore)
    return s, y.to(s.device), classes_t, ignore


def _chunk_sizes(batch: int, rows: int, pixels: int, max_elements: int) -> tuple[int, int]:
    """Images per chunk and pixels per chunk so that one mask tensor holds at most ``max_elements`` values."""
    per_image = rows * pixels
    if per_image <= max_elements:
        return max(1, min(batch, max_elements // per_image)), min(pixels, _EXACT_FLOAT32_COUNT)
    return 1, max(1, min(pixels, max_elements // rows, _EXACT_FLOAT32_COUNT))


def _bmm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b.transpose(1, 2)).double()


def pairwise_iou(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    classes: int | Sequence[int] = (1,),
    ignore_index: int | Sequence[int] | None = None,
    blocks: Sequence[str] = ("sy", "ss", "yy"),
    num_classes: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> PairwiseIoU:
    """IoU between every pair of maps of each image, over ``classes``, with the shared empty/NaN rules.

    For one pair of maps, the IoU of class ``c`` is ``|a=c & b=c| / |a=c | b=c|`` over the pair's valid pixels.
    A class absent from both maps is NaN and skipped; the pair's IoU is the mean over the remaining classes, and 1
    if every class is absent from both maps. With ``classes=(1,)`` this is the LIDC rule: both empty gives IoU 1,
    exactly one empty gives IoU 0.

    Valid pixels (only when ``ignore_index`` is set):

    * sample vs label ``r``: pixels that are not ignore in label ``r``;
    * label ``r`` vs label ``r'``: pixels that are not ignore in either label;
    * sample vs sample: pixels that are not ignore in any label of the image (the union of the labels' ignore
      masks). In Cityscapes every mode shares one ignore mask, so this is that mask.

    Args:
        samples: integer label maps ``(B, N, *spatial)``.
        labels: integer label maps ``(B, R, *spatial)``; may be None when only ``"ss"`` is requested and there is
            no ``ignore_index``.
        classes: class ids the IoU is averaged over.
        ignore_index: label value(s) excluded from both maps of a pair, e.g. ``(24, 255)`` for Cityscapes.
        blocks: which of ``"sy"``, ``"ss"``, ``"yy"`` to compute.
        num_classes: optional upper bound for class ids and map values, checked.
        max_elements: memory bound: the most values one chunk's mask tensor may hold.

    Returns:
        :class:`PairwiseIoU` with float64 matrices on the samples' device.
    """
    blocks = tuple(blocks)
    unknown = set(blocks) - {"sy", "ss", "yy"}
    if unknown or not blocks:
        raise ValueError(f"blocks must be a non-empty subset of ('sy', 'ss', 'yy'), got {blocks}.")
    if labels is None and (set(blocks) & {"sy", "yy"} or ignore_index is not None):
        raise ValueError(f"labels are required for blocks {blocks} with ignore_index={ignore_index!r}.")
    s, y, classes_t, ignore = check_label_maps(samples, labels, classes, ignore_index, num_classes)
    want_sy, want_ss, want_yy = "sy" in blocks, "ss" in blocks, "yy" in blocks

    b_total, n = s.shape[:2]
    r = 0 if y is None else y.shape[1]
    s = s.reshape(b_total, n, -1)
    y = None if y is None else y.reshape(b_total, r, -1)
    pixels = s.shape[-1]
    device = s.device
    ignore_t = torch.tensor(ignore, device=device, dtype=y.dtype) if (ignore and y is not None) else None

    out_sy = torch.empty((b_total, n, r), dtype=torch.float64, device=device) if want_sy else None
    out_ss = torch.empty((b_total, n, n), dtype=torch.float64, device=device) if want_ss else None
    out_yy = torch.empty((b_total, r, r), dtype=torch.float64, device=device) if want_yy else None

    b_chunk, p_chunk = _chunk_sizes(b_total, n + r, pixels, max_elements)
    f32 = torch.float32
    for b0 in range(0, b_total, b_chunk):
        b1 = min(b_total, b0 + b_chunk)
        nb = b1 - b0
        # running sum of per-class IoUs and count of classes present, per pair
        acc = {
            k: (torch.zeros(shape, dtype=torch.float64, device=device), torch.zeros(shape, dtype=torch.float64, device=device))
            for k, want, shape in (("sy", want_sy, (nb, n, r)), ("ss", want_ss, (nb, n, n)), ("yy", want_yy, (nb, r, r)))
            if want
        }
        for c in classes_t:
            inter = {k: torch.zeros_like(v[0]) for k, v in acc.items()}
            union = {k: torch.zeros_like(v[0]) for k, v in acc.items()}
            for p0 in range(0, pixels, p_chunk):
                p1 = min(pixels, p0 + p_chunk)
                s_c = s[b0:b1, :, p0:p1] == c
                y_c = None if y is None else y[b0:b1, :, p0:p1] == c
                active = s_c.any(dim=1)
                if y_c is not None:
                    active |= y_c.any(dim=1)
                cols = active.any(dim=0).nonzero().squeeze(1)
                if cols.numel() == 0:
                    continue
                s_c = s_c[..., cols]
                y_c = None if y_c is None else y_c[..., cols]
                valid = None
                if ignore_t is not None:
                    valid = ~torch.isin(y[b0:b1, :, p0:p1][..., cols], ignore_t)
                s_f = s_c.to(f32)
                y_f = None if y_c is None else y_c.to(f32)
                if want_sy:
                    i_sy = _bmm_t(s_f, y_f)
                    # a sample's size is taken only over the pixels that label r does not ignore
                    s_size = _bmm_t(s_f, valid.to(f32)) if valid is not None else s_f.sum(-1, dtype=torch.float64)[..., None]
                    y_size = y_f.sum(-1, dtype=torch.float64)[:, None, :]
                    inter["sy"] += i_sy
                    union["sy"] += s_size + y_size - i_sy
                if want_ss:
                    s_m = (s_c & valid.all(dim=1, keepdim=True)).to(f32) if valid is not None else s_f
                    i_ss = _bmm_t(s_m, s_m)
                    size = s_m.sum(-1, dtype=torch.float64)
                    inter["ss"] += i_ss
                    union["ss"] += size[:, :, None] + size[:, None, :] - i_ss
                if want_yy:
                    i_yy = _bmm_t(y_f, y_f)
                    if valid is not None:
                        # |y_r=c restricted to pixels label r' keeps|; y_r=c already excludes r's own ignore pixels
                        a = _bmm_t(y_f, valid.to(f32))
                        union["yy"] += a + a.transpose(1, 2) - i_yy
                    else:
                        size = y_f.sum(-1, dtype=torch.float64)
                        union["yy"] += size[:, :, None] + size[:, None, :] - i_yy
                    inter["yy"] += i_yy
            for k, (iou_sum, present) in acc.items():
                has = union[k] > 0
                iou_sum += torch.where(has, inter[k] / union[k].clamp_min(1.0), torch.zeros_like(inter[k]))
                present += has.to(torch.float64)
        for k, dest in (("sy", out_sy), ("ss", out_ss), ("yy", out_yy)):
            if k in acc:
                iou_sum, present = acc[k]
                dest[b0:b1] = torch.where(present > 0, iou_sum / present.clamp_min(1.0), torch.ones_like(iou_sum))
    return PairwiseIoU(out_sy, out_ss, out_yy)
