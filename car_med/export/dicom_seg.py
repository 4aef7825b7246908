"""One DICOM Segmentation per nodule (highdicom): a segment per sample, plus Gbar thresholded at 0.5.

The SEG references the source CT slices (their SOP instances) it was made on, so a PACS or 3D Slicer's DICOM
module shows it beside the CT and on the right slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom

__all__ = ["nodule_segmentation"]

# Type 2 attributes (present, may be empty) that highdicom copies from the source images. De-identified
# series (LIDC-IDRI's among them) sometimes drop them; an empty value is what the standard asks for then.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _with_type2_attributes(dataset: pydicom.Dataset) -> pydicom.Dataset:
    if all(keyword in dataset for keyword in _TYPE2_FROM_SOURCE):
        return dataset
    copy = pydicom.Dataset(dataset)
    copy.file_meta = getattr(dataset, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy


def nodule_segmentation(
    source_images: Sequence[pydicom.Dataset],
    samples: np.ndarray,
    mean_mask: np.ndarray,
    model_name: str,
    model_version: str,
    series_description: str,
    seed: int,
) -> Any:
    """Build the SEG object.

    Args:
        source_images: the CT slices the nodule's crops lie on, full datasets, in ``samples``' frame order.
        samples: ``(F, rows, columns, M)`` 0/1 samples on those slices' pixel grids (DICOM ``[row, column]``).
        mean_mask: ``(F, rows, columns)`` Gbar >= 0.5.
        model_name: the algorithm name recorded in every segment (e.g. the registered model name).
        model_version: its version (registry version or run id).
        series_description: SeriesDescription of the SEG.
        seed: the export seed, in the content description, so the samples can be drawn again.

    Returns:
        A ``highdicom.seg.Segmentation``; call ``.save_as(path)`` or ``.dcmwrite``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], version=str(model_version)[:64], family=codes.cid7162.ArtificialIntelligence
    )
    num_samples = samples.shape[-1]

    def description(number: int, label: str) -> Any:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )

    descriptions = [description(m + 1, f"CAR sample {m + 1}") for m in range(num_samples)]
    descriptions.append(description(num_samples + 1, "CAR mean >= 0.5"))
    pixel_array = np.concatenate([samples, mean_mask[..., None]], axis=-1).astype(bool)
    first = source_images[0]
    return hd.seg.Segmentation(
        source_images=[_with_type2_attributes(ds) for ds in source_images],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 1) or 1) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="car-med",
        manufacturer_model_name=model_name[:64],
        software_versions=str(model_version)[:64],
        device_serial_number="none",
        series_description=series_description[:64],
        content_description=f"CAR samples, seed {seed}"[:64],
        omit_empty_frames=False,
    )
