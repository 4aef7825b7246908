"""LIDC annotation geometry: reader contours rasterised as pylidc does, and the lesion centre a crop is cut at.

The crop grid itself, and the resampling of a slice or a mask onto it, are the library's
(:mod:`car_med.ct.geometry`); this module holds only what comes from the LIDC readers' contours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from car_med.visualize import isolate_matplotlib_config

__all__ = ["Contour", "annotation_slice_mask", "isolate_matplotlib_config", "lesion_centre"]


@dataclass(frozen=True)
class Contour:
    """One annotator contour on one slice, with its pylidc ordering key.

    Attributes:
        contour_id: pylidc's contour primary key; pylidc applies inclusion contours in this order.
        z: the contour's ``image_z_position`` in mm.
        k: the index of the scan slice nearest to ``z`` in the DB's sorted ``slice_zvals``.
        inclusion: True for an inclusion (nodule) contour, False for an exclusion (hole) contour.
        points: ``(N, 2)`` integer ``(row, column)`` pixel indices, in drawing order.
    """

    contour_id: int
    z: float
    k: int
    inclusion: bool
    points: np.ndarray


def _path_class():
    isolate_matplotlib_config()
    from matplotlib.path import Path

    return Path


def _closed(points: np.ndarray) -> np.ndarray:
    if (points[0] != points[-1]).any():
        return np.vstack([points, points[:1]])
    return points


def annotation_slice_mask(
    contours: Sequence[Contour], k: int, origin: tuple[int, int], shape: tuple[int, int]
) -> np.ndarray:
    """Rasterise one annotation on slice ``k`` inside a window, following pylidc's ``boolean_mask``.

    The rule is pylidc's, step by step, so the result equals ``Annotation.boolean_mask()`` on that window:
    inclusion contours are OR-ed in contour-id order, and after each one its own outline pixels are switched
    off (LIDC readers draw the outline just outside the nodule); then every exclusion contour switches off its
    interior and its outline. Points are tested at integer pixel centres with matplotlib's ``contains_points``,
    as pylidc does, so the edge cases agree too.

    Args:
        contours: all contours of the annotation (any slice); only those with ``k`` are used.
        k: the slice index.
        origin: ``(row, column)`` of the window's first pixel in the slice.
        shape: ``(rows, columns)`` of the window; it must contain every contour point of this annotation on
            slice ``k``.

    Returns:
        Boolean array of ``shape``.

    Raises:
        ValueError: a contour point lies outside the window.
    """
    mask = np.zeros(shape, dtype=bool)
    on_slice = sorted((c for c in contours if c.k == k), key=lambda c: c.contour_id)
    if not on_slice:
        return mask
    rr, cc = np.indices(shape)
    test_points = np.c_[rr.ravel() + origin[0], cc.ravel() + origin[1]]
    offset = np.asarray(origin)
    path_class = _path_class()

    def _outline(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = points - offset
        if (local < 0).any() or (local >= np.asarray(shape)).any():
            raise ValueError(f"contour on slice {k} reaches outside the mask window origin={origin} shape={shape}.")
        return local[:, 0], local[:, 1]

    for contour in (c for c in on_slice if c.inclusion):
        closed = _closed(contour.points)
        inside = path_class(closed, closed=True).contains_points(test_points).reshape(shape)
        mask |= inside
        mask[_outline(closed)] = False
    for contour in (c for c in on_slice if not c.inclusion):
        closed = _closed(contour.points)
        inside = path_class(closed, closed=True).contains_points(test_points).reshape(shape)
        mask &= ~inside
        mask[_outline(closed)] = False
    return mask


def lesion_centre(contours: Sequence[Contour], k: int) -> tuple[float, float]:
    """The lesion's centre on slice ``k``: the middle of the bounding box of all inclusion contour points.

    The box is taken over every annotator of the nodule, so the crop is centred on the union of their
    readings rather than on any one reader.

    Args:
        contours: contours of all the nodule's annotations.
        k: the slice index.

    Returns:
        ``(row, column)`` in source pixels, possibly half-integer.

    Raises:
        ValueError: no inclusion contour lies on slice ``k``.
    """
    points = [c.points for c in contours if c.k == k and c.inclusion]
    if not points:
        raise ValueError(f"no inclusion contour on slice {k}; a crop needs at least one.")
    stacked = np.vstack(points)
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    centre = (low + high) / 2.0
    return float(centre[0]), float(centre[1])
