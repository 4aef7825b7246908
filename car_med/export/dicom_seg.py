"""DICOM Segmentations per nodule (highdicom): ``seg.dcm``, a segment per sample plus Gbar thresholded at 0.5, and
``hypotheses_seg.dcm``, a segment per hypothesis (its representative sample).

Samples are numbered from 0, as in the export's file names: segment m + 1 of ``seg.dcm`` is sample m, labelled
e.g. "CAR sample 3, H1 p=0.69". Segment n of ``hypotheses_seg.dcm`` is hypothesis Hn, labelled e.g.
"H1 p=0.69 (0.44-0.86)" (probability and Wilson interval, :mod:`car_med.hypotheses`).

Each SEG references the source CT slices (their SOP instances) it was made on, so a PACS or 3D Slicer's DICOM
module shows it beside the CT and on the right slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom

from car_med.hypotheses import Hypothesis

__all__ = ["hypotheses_segmentation", "nodule_segmentation"]

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


def _segment(number: int, label: str, description: str | None, algorithm: Any) -> Any:
    """One binary segment (a nodule, found automatically by the model) with its label and description."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segment = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    if description:
        # Segment Description (0062,0006), LO: highdicom has no argument for it
        segment.SegmentDescription = description[:64]
    return segment


def _segmentation(
    source_images: Sequence[pydicom.Dataset],
    pixel_array: np.ndarray,
    segments: Sequence[Any],
    model_name: str,
    model_version: str,
    series_description: str,
    content_description: str,
    series_offset: int,
) -> Any:
    import highdicom as hd

    first = source_images[0]
    return hd.seg.Segmentation(
        source_images=[_with_type2_attributes(ds) for ds in source_images],
        pixel_array=pixel_array.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=list(segments),
        series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 1) or 1) + series_offset,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="car-med",
        manufacturer_model_name=model_name[:64],
        software_versions=str(model_version)[:64],
        device_serial_number="none",
        series_description=series_description[:64],
        content_description=content_description[:64],
        omit_empty_frames=False,
    )


def _algorithm(model_name: str, model_version: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=model_name[:64], version=str(model_version)[:64], family=codes.cid7162.ArtificialIntelligence
    )


def _hypothesis_of_samples(hypotheses: Sequence[Hypothesis], num_samples: int) -> dict[int, tuple[int, Hypothesis]]:
    """``{sample m: (rank, hypothesis)}``; every sample must be in exactly one hypothesis."""
    of_sample = {m: (rank, h) for rank, h in enumerate(hypotheses, start=1) for m in h.members}
    if sorted(of_sample) != list(range(num_samples)) or sum(h.count for h in hypotheses) != num_samples:
        raise ValueError(
            f"the hypotheses' members {sorted(of_sample)} do not partition the SEG's {num_samples} samples."
        )
    return of_sample


def nodule_segmentation(
    source_images: Sequence[pydicom.Dataset],
    samples: np.ndarray,
    mean_mask: np.ndarray,
    model_name: str,
    model_version: str,
    series_description: str,
    seed: int,
    hypotheses: Sequence[Hypothesis] | None = None,
) -> Any:
    """Build the SEG object: segment m + 1 is sample m (samples are numbered from 0, as in the file names), the
    last segment is Gbar >= 0.5.

    Args:
        source_images: the CT slices the nodule's crops lie on, full datasets, in ``samples``' frame order.
        samples: ``(F, rows, columns, M)`` 0/1 samples on those slices' pixel grids (DICOM ``[row, column]``).
        mean_mask: ``(F, rows, columns)`` Gbar >= 0.5.
        model_name: the algorithm name recorded in every segment (e.g. the registered model name).
        model_version: its version (registry version or run id).
        series_description: SeriesDescription of the SEG.
        seed: the export seed, in the content description, so the samples can be drawn again.
        hypotheses: the nodule's hypotheses (:func:`car_med.hypotheses.group_samples` of these M samples);
            with them each sample's label and Segment Description name its hypothesis and probability, e.g.
            label ``"CAR sample 3, H1 p=0.69"``, description ``"sample 3, H1 p=0.69 (0.44-0.86)"``.

    Returns:
        A ``highdicom.seg.Segmentation``; call ``.save_as(path)`` or ``.dcmwrite``.

    Raises:
        ValueError: the hypotheses' members do not partition the M samples.
    """
    num_samples = samples.shape[-1]
    algorithm = _algorithm(model_name, model_version)
    of_sample = _hypothesis_of_samples(hypotheses, num_samples) if hypotheses is not None else {}
    segments = []
    for m in range(num_samples):
        if m in of_sample:
            rank, hypothesis = of_sample[m]
            short = f"H{rank}" + (" no lesion" if hypothesis.empty else "") + f" p={hypothesis.probability:.2f}"
            segments.append(
                _segment(m + 1, f"CAR sample {m}, {short}", f"sample {m}, {hypothesis.label(rank)}", algorithm)
            )
        else:
            segments.append(_segment(m + 1, f"CAR sample {m}", None, algorithm))
    segments.append(_segment(num_samples + 1, "CAR mean >= 0.5", "the mean of the samples (Gbar) >= 0.5", algorithm))
    pixel_array = np.concatenate([samples, mean_mask[..., None]], axis=-1)
    return _segmentation(
        source_images, pixel_array, segments, model_name, model_version, series_description,
        f"CAR samples, seed {seed}", series_offset=1000,
    )  # fmt: skip


def hypotheses_segmentation(
    source_images: Sequence[pydicom.Dataset],
    samples: np.ndarray,
    hypotheses: Sequence[Hypothesis],
    model_name: str,
    model_version: str,
    min_iou: float,
) -> Any:
    """The compact SEG: segment n is hypothesis Hn, holding its representative sample's mask.

    Each segment's label is the hypothesis's label, e.g. ``"H1 p=0.69 (0.44-0.86)"``; its description names the
    representative and the member count. A "no lesion" hypothesis (its samples draw nothing) is a segment too,
    labelled e.g. ``"H3 no lesion p=0.06 (0.01-0.28)"``, with an empty mask on purpose: a viewer lists it with its
    probability and draws nothing for it (highdicom and dciodvfy accept empty segments). The content
    description says so when there is one.

    Args:
        source_images: as :func:`nodule_segmentation`.
        samples: as :func:`nodule_segmentation`; the representatives are taken from it.
        hypotheses: the nodule's hypotheses, most probable first.
        model_name: as :func:`nodule_segmentation`.
        model_version: as :func:`nodule_segmentation`.
        min_iou: the grouping's ``min_iou``, in the content description.

    Returns:
        A ``highdicom.seg.Segmentation``.

    Raises:
        ValueError: no hypotheses, or their members do not partition the M samples.
    """
    if not hypotheses:
        raise ValueError("a hypotheses SEG needs at least one hypothesis.")
    num_samples = samples.shape[-1]
    _hypothesis_of_samples(hypotheses, num_samples)
    algorithm = _algorithm(model_name, model_version)
    segments = []
    for rank, hypothesis in enumerate(hypotheses, start=1):
        what = (
            "draws nothing: empty on purpose"
            if hypothesis.empty
            else f"representative sample {hypothesis.representative}"
        )
        description = f"{hypothesis.count} of {num_samples} samples; {what}"
        segments.append(_segment(rank, hypothesis.label(rank), description, algorithm))
    pixel_array = np.stack([samples[..., h.representative] for h in hypotheses], axis=-1)
    no_lesion = [rank for rank, h in enumerate(hypotheses, start=1) if h.empty]
    content = f"CAR hypotheses, min IoU {min_iou:g}" + (f"; H{no_lesion[0]} no lesion: empty" if no_lesion else "")
    return _segmentation(
        source_images, pixel_array, segments, model_name, model_version, "CAR hypotheses (representatives)",
        content, series_offset=1001,
    )  # fmt: skip
