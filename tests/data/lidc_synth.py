"""Writers of synthetic LIDC crops in the preprocessing output format: (180, 180, 1) NIfTIs in a scanner frame."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# A scanner-frame RAS affine as preprocessing/lidc.py writes it: 0.5 mm pixels, origin off-centre.
AFFINE = np.array([[-0.5, 0.0, 0.0, 100.0], [0.0, -0.5, 0.0, 50.0], [0.0, 0.0, 2.5, -123.5], [0.0, 0.0, 0.0, 1.0]])
CROP = 180


def hu_image(seed: int) -> np.ndarray:
    """int16 HU crop with known values at the first pixels of the centre 128x128 window."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1500, 1500, size=(CROP, CROP), dtype=np.int16)
    image[26, 26] = -1024  # -> 0 with the default window
    image[26, 27] = -312  # -> 0.5
    image[26, 28] = 400  # -> 1
    image[26, 29] = -2000  # clipped -> 0
    image[26, 30] = 1000  # clipped -> 1
    return image


def reader_masks(seed: int) -> np.ndarray:
    """(4, 180, 180) uint8 masks; reader k has a (k+1)-pixel-wide blob, reader 3 is empty (a missing reader)."""
    masks = np.zeros((4, CROP, CROP), np.uint8)
    for k in range(3):
        masks[k, 80 : 90 + k, 85 + seed : 95 + k + seed] = 1
    return masks


def write_item(root: Path, name: str, seed: int, patient: str) -> dict:
    image_path = root / "images" / f"{name}.nii.gz"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu_image(seed)[..., None], AFFINE), image_path)
    labels = []
    for k, mask in enumerate(reader_masks(seed)):
        path = root / "labels" / f"{name}_l{k}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask[..., None], AFFINE), path)
        labels.append(path.relative_to(root).as_posix())
    return {
        "image": image_path.relative_to(root).as_posix(),
        "label": labels,
        "patient_id": patient,
        "series_uid": f"1.2.840.{seed}",
        "nodule_id": seed,
        "annotation_ids": list(range(10 * seed, 10 * seed + 3)),
        "slice_z": -123.5 + seed,
        "num_annotators": 3,
    }
