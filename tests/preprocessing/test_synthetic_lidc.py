"""The synthetic CT generator draws every annotated nodule visibly, at a contrast that says how many readers
marked it (preprocessing.synthetic_lidc)."""

from __future__ import annotations

import numpy as np
import pydicom

from preprocessing.lidc_annotations import AnnotationData, NoduleData, ScanData
from preprocessing.lidc_geometry import Contour
from preprocessing.synthetic_lidc import LUNG_POCKET_MM, agreement_maps, lung_pocket, phantom_slice, write_ct_series


def _square(contour_id: int, top: int, left: int, side: int) -> Contour:
    points = np.array([(top, left), (top, left + side), (top + side, left + side), (top + side, left)])
    return Contour(contour_id=contour_id, z=0.0, k=0, inclusion=True, points=points)


def _scan_in_soft_tissue(readers: int) -> ScanData:
    # rows 230-250, columns 246-266: the phantom's mediastinum (soft tissue, 40 HU), between its two lungs
    annotations = tuple(
        AnnotationData(annotation_id=i + 1, contours=(_square(10 + i, 230, 246, 20),)) for i in range(readers)
    )
    return ScanData(
        scan_id=1,
        patient_id="LIDC-IDRI-9999",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        pixel_spacing=0.7,
        slice_thickness=2.5,
        slice_zvals=np.array([0.0]),
        nodules=(NoduleData(nodule_id=0, annotations=annotations),),
    )


def test_contrast_is_the_share_of_the_four_reader_slots():
    for readers in (1, 2, 4):
        agreement = agreement_maps(_scan_in_soft_tissue(readers))[0]
        assert agreement.max() == readers / 4


def test_a_nodule_in_the_phantoms_soft_tissue_sits_in_lung_and_is_visible(tmp_path):
    scan = _scan_in_soft_tissue(readers=4)
    assert phantom_slice(0.0)[240, 256] == 40  # without the pocket this nodule would be 60 HU on 40 HU
    (path,) = write_ct_series(
        tmp_path,
        patient_id=scan.patient_id,
        study_uid=scan.study_uid,
        series_uid=scan.series_uid,
        slice_zvals=scan.slice_zvals,
        pixel_spacing=scan.pixel_spacing,
        slice_thickness=scan.slice_thickness,
        agreement=agreement_maps(scan),
    )
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    nodule, margin = hu[236:245, 252:261].mean(), hu[240, 246 - 4]  # 4 px (2.8 mm) left of the outline
    assert nodule > 0 and margin < -800, (nodule, margin)
    far = hu[240, 246 - int(LUNG_POCKET_MM / 0.7) - 3]  # beyond the pocket: the phantom's tissue again
    assert far == 40


def test_lung_pocket_reaches_the_margin_and_no_further():
    nodule = np.zeros((40, 40), dtype=bool)
    nodule[18:22, 18:22] = True
    pocket = lung_pocket(nodule, 5)
    assert pocket[18:22, 18:22].all() and pocket[20, 13] and pocket[20, 26]
    assert not pocket[20, 12] and not pocket[20, 27] and not pocket[12, 12]
