"""Shared kernel: all pairwise IoUs between the samples and labels of each image, as batched matrix products.

Every metric in this package (GED, HM-IoU, sample diversity) is a function of three IoU matrices per image:
samples vs labels ``(N, R)``, samples vs samples ``(N, N)`` and labels vs labels ``(R, R)``. They are computed here
once, for all images of a batch, without a Python loop over pairs:

* for each class ``c`` the maps are turned into flattened 0/1 masks, and the intersections of all pairs are one
  ``bmm`` of the mask matrix with its transpose;
* mask sizes are the diagonals of those Gram matrices (where a pair has its own ignore mask, one more ``bmm``
  against the valid masks), and unions are ``|a| + |b| - |a & b|``;
* per image and class, the pixels where no map has class ``c`` are dropped before the product. They add nothing
  to any intersection or size, and they are most of the image for LIDC lesions and for each Cityscapes class;
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


def _check_range(t: torch.Tensor, name: str, num_classes: int | None, ignore: tuple[int, ...]) -> None:
    if num_classes is None or t.numel() == 0:
        return
    bad = (t < 0) | (t >= num_classes)
    kept = tuple(v for v in ignore if _fits(v, t.dtype))
    if kept:
        bad &= _not_in(t, kept)
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
        raise ValueError(
            f"samples must have shape (B, N, *spatial) with at least one spatial dim, got {tuple(s.shape)}."
        )
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


# columns kept when compacting: compaction only pays while it removes a good share of them
_DENSE_FRACTION = 0.75
_EMPTY = object()


def _compaction_index(active: torch.Tensor) -> torch.Tensor | None | object:
    """Per-image column indices ``(B, M)`` covering every active column of ``active (B, P)``.

    Images with fewer than M active columns are padded with one of their own inactive columns, where every class
    mask is zero, so padding adds nothing. Returns ``_EMPTY`` when no column is active and None when compaction
    would keep most columns anyway.
    """
    counts = active.sum(dim=1)
    m = int(counts.max()) if counts.numel() else 0
    if m == 0:
        return _EMPTY
    if m > _DENSE_FRACTION * active.shape[1]:
        return None
    b_idx, p_idx = active.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, dim=0) - counts
    slot = torch.arange(b_idx.numel(), device=active.device) - starts[b_idx]
    pad = (~active).to(torch.uint8).argmax(dim=1)  # the first inactive column of each image
    idx = pad[:, None].repeat(1, m)
    idx[b_idx, slot] = p_idx
    return idx


def _fits(value: int, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _not_in(x: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
    """``~isin(x, values)`` for a handful of values; an equality per value is much faster than ``torch.isin``."""
    out = x != values[0]
    for v in values[1:]:
        out &= x != v
    return out


def _equals(x: torch.Tensor, value: int) -> torch.Tensor:
    if not _fits(value, x.dtype):
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return x == value


def _any_over_maps(mask: torch.Tensor) -> torch.Tensor:
    """``mask.any(dim=1)`` for ``(B, K, P)`` bool masks; a uint8 max reduces the strided axis faster on CPU."""
    return mask.view(torch.uint8).amax(dim=1).bool()


def _gather_columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1))


def _accumulate(
    k: int,
    s_c: torch.Tensor,
    y_c: torch.Tensor | None,
    valid: torch.Tensor | None,
    inter: dict[str, torch.Tensor],
    union: dict[str, torch.Tensor],
) -> None:
    """Add one pixel chunk's intersection and union counts of class slot ``k`` to every requested block."""
    f32 = torch.float32
    s_f = s_c.to(f32)
    y_f = None if y_c is None else y_c.to(f32)
    valid_f = None if valid is None else valid.to(f32)
    # mask sizes are the diagonals of the Gram matrices where those exist (an exact count, and no extra pass)
    s_size = None
    if "ss" in inter:
        # samples are compared on the pixels no label of the image ignores
        s_m = (s_c & valid.all(dim=1, keepdim=True)).to(f32) if valid is not None else s_f
        i_ss = _bmm_t(s_m, s_m)
        size = i_ss.diagonal(dim1=1, dim2=2)
        inter["ss"][k] += i_ss
        union["ss"][k] += size[:, :, None] + size[:, None, :] - i_ss
        if valid is None:
            s_size = size
    if "sy" in inter or "yy" in inter:
        i_yy = _bmm_t(y_f, y_f)
        y_size = i_yy.diagonal(dim1=1, dim2=2)
    if "sy" in inter:
        i_sy = _bmm_t(s_f, y_f)
        if valid_f is not None:
            # a sample's size counts only the pixels that label r does not ignore
            s_size_r = _bmm_t(s_f, valid_f)
        else:
            s_size_r = (s_size if s_size is not None else s_f.sum(-1).double())[..., None]
        inter["sy"][k] += i_sy
        union["sy"][k] += s_size_r + y_size[:, None, :] - i_sy
    if "yy" in inter:
        inter["yy"][k] += i_yy
        if valid_f is not None:
            # |y_r = c on pixels label r' keeps|; y_r = c already excludes label r's own ignore pixels
            a = _bmm_t(y_f, valid_f)
            union["yy"][k] += a + a.transpose(1, 2) - i_yy
        else:
            union["yy"][k] += y_size[:, :, None] + y_size[:, None, :] - i_yy


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
    blocks = _checked_blocks(blocks, labels, ignore_index)
    s, y, classes_t, ignore = check_label_maps(samples, labels, classes, ignore_index, num_classes)

    b_total, n = s.shape[:2]
    r = 0 if y is None else y.shape[1]
    s = s.reshape(b_total, n, -1)
    y = None if y is None else y.reshape(b_total, r, -1)
    pixels = s.shape[-1]
    device = s.device
    # values a map's dtype cannot hold never occur in it: such classes are absent from every pair and skipped
    kept = tuple(c for c in classes_t if _fits(c, s.dtype) or (y is not None and _fits(c, y.dtype)))
    ign_y = () if y is None else tuple(v for v in ignore if _fits(v, y.dtype))

    shapes = {"sy": (b_total, n, r), "ss": (b_total, n, n), "yy": (b_total, r, r)}
    # a pair with no class present keeps IoU 1
    outs = {k: torch.ones(shape, dtype=torch.float64, device=device) for k, shape in shapes.items() if k in blocks}
    if not kept:
        return PairwiseIoU(outs.get("sy"), outs.get("ss"), outs.get("yy"))

    b_chunk, p_chunk = _chunk_sizes(b_total, n + r, pixels, max_elements)
    for b0 in range(0, b_total, b_chunk):
        b1 = min(b_total, b0 + b_chunk)
        # per class and pair: intersection and union counts, summed over pixel chunks
        inter = {
            k: torch.zeros((len(kept), b1 - b0) + v.shape[1:], dtype=torch.float64, device=device)
            for k, v in outs.items()
        }
        union = {k: torch.zeros_like(v) for k, v in inter.items()}
        for p0 in range(0, pixels, p_chunk):
            p1 = min(pixels, p0 + p_chunk)
            yc = None if y is None else y[b0:b1, :, p0:p1]
            valid = _not_in(yc, ign_y) if ign_y else None
            _accumulate_classes(s[b0:b1, :, p0:p1], yc, valid, kept, inter, union)
        for key, out in outs.items():
            out[b0:b1] = _mean_over_present_classes(inter[key], union[key])
    return PairwiseIoU(outs.get("sy"), outs.get("ss"), outs.get("yy"))


def _checked_blocks(
    blocks: Sequence[str], labels: torch.Tensor | None, ignore_index: int | Sequence[int] | None
) -> tuple[str, ...]:
    """``blocks`` as a tuple; refuses an empty or unknown block, or a block that needs the labels without them."""
    blocks = tuple(blocks)
    unknown = set(blocks) - {"sy", "ss", "yy"}
    if unknown or not blocks:
        raise ValueError(f"blocks must be a non-empty subset of ('sy', 'ss', 'yy'), got {blocks}.")
    if labels is None and (set(blocks) & {"sy", "yy"} or ignore_index is not None):
        raise ValueError(f"labels are required for blocks {blocks} with ignore_index={ignore_index!r}.")
    return blocks


def _accumulate_classes(
    sc: torch.Tensor,
    yc: torch.Tensor | None,
    valid: torch.Tensor | None,
    kept: Sequence[int],
    inter: dict[str, torch.Tensor],
    union: dict[str, torch.Tensor],
) -> None:
    """Add one pixel chunk's counts of every class in ``kept`` (slot ``k`` for ``kept[k]``) to every block."""
    for k, c in enumerate(kept):
        s_c = _equals(sc, c)
        y_c = None if yc is None else _equals(yc, c)
        # keep, per image, only the pixels where some map has class c: the others add to no count, and
        # for sparse foregrounds (LIDC lesions) or many classes (Cityscapes) they are most of the image
        active = _any_over_maps(s_c)
        if y_c is not None:
            active |= _any_over_maps(y_c)
        idx = _compaction_index(active)
        if idx is _EMPTY:
            continue
        valid_c = valid
        if idx is not None:
            s_c = _gather_columns(s_c, idx)
            y_c = None if y_c is None else _gather_columns(y_c, idx)
            valid_c = None if valid is None else _gather_columns(valid, idx)
        _accumulate(k, s_c, y_c, valid_c, inter, union)


def _mean_over_present_classes(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """The pair IoU from per-class counts ``(classes, B, X, Y)``: the mean over the classes present in either map
    of the pair (a class absent from both is skipped), 1 where no class is present."""
    has = union > 0
    iou = torch.where(has, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    present = has.sum(dim=0)
    return torch.where(present > 0, iou.sum(dim=0) / present.clamp_min(1), torch.ones_like(inter[0]))
