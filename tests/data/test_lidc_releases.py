"""car_med.data.lidc_releases: DeepMind PNG and Prob. U-Net pickle releases to the LIDC datalist."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from PIL import Image

from car_med.data import (
    convert_pickle_release,
    convert_png_release,
    lidc_dataset,
    load_lidc_datalist,
    parse_png_name,
    split_patients,
)
from car_med.data.lidc_releases import main


@pytest.mark.parametrize(
    ("name", "z", "crop", "reader"),
    [
        ("z-123.5_c0.png", -123.5, 0, None),
        ("z+7.25_c3.png", 7.25, 3, None),
        ("z7.25_c3.png", 7.25, 3, None),
        ("z105_c1.png", 105.0, 1, None),
        ("z105.0_c1_l2.png", 105.0, 1, 2),
        ("z-1.2999999999999545_c12_l0.png", -1.2999999999999545, 12, 0),
        ("z-0.625_c0_l3.png", -0.625, 0, 3),
    ],
)
def test_parse_png_name(name, z, crop, reader):
    parsed = parse_png_name(name)
    assert (parsed.z, parsed.crop, parsed.reader) == (z, crop, reader)
    assert parsed.image_stem == name.split("_l")[0].removesuffix(".png")


@pytest.mark.parametrize(
    "name",
    ["z--105.0_c0.png", "z-105.0_c0.jpg", "z-105.0.png", "slice-105_c0.png", "z1.2.3_c0.png", "z-105.0_c0_lx.png"],
)
def test_parse_png_name_rejects(name):
    with pytest.raises(ValueError, match="not a DeepMind LIDC release file name"):
        parse_png_name(name)


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# (split, patient, z text, crop): a patient with two crops on one slice, a positive z, several splits.
PNG_CROPS = [
    ("train", "LIDC-IDRI-0001", "-123.5", 0),
    ("train", "LIDC-IDRI-0001", "-123.5", 1),
    ("train", "LIDC-IDRI-0001", "-121.25", 0),
    ("train", "LIDC-IDRI-0002", "105.0", 0),
    ("val", "LIDC-IDRI-0003", "-80", 0),
    ("test", "LIDC-IDRI-0004", "-7.125", 0),
]


@pytest.fixture
def png_release(tmp_path) -> tuple[Path, dict]:
    """A DeepMind-layout release of 180x180 crops; returns the root and the arrays by (split, patient, stem)."""
    root = tmp_path / "lidc_crops"
    rng = np.random.default_rng(0)
    truth = {}
    for split, patient, z, crop in PNG_CROPS:
        stem = f"z{z}_c{crop}"
        image = rng.integers(0, 256, size=(180, 180), dtype=np.uint8)
        masks = (rng.random((4, 180, 180)) < 0.3).astype(np.uint8)
        masks[3] = 0  # an empty reader: kept, and drawn, like the others
        _save_png(root / split / "images" / patient / f"{stem}.png", image)
        for k in range(4):
            _save_png(root / split / "gt" / patient / f"{stem}_l{k}.png", masks[k] * 255)
        truth[(split, patient, stem)] = (image, masks)
    return root, truth


def test_png_release_round_trip(png_release, tmp_path):
    root, truth = png_release
    out = tmp_path / "out"
    path = convert_png_release(root, out)
    content = json.loads(path.read_text())
    counts = (content["numTraining"], content["numValidation"], content["numTest"])
    assert (content["lidc_version"], counts) == ("v2", (4, 1, 1))
    split_names = {"training": "train", "validation": "val", "test": "test"}
    seen = 0
    for key, folder in split_names.items():
        for item in load_lidc_datalist(path, key):
            stem = Path(item["image"]).name.removesuffix(".nii.gz")
            image, masks = truth[(folder, item["patient_id"], stem)]
            assert item["slice_z"] == float(stem[1:].split("_c")[0])
            assert item["intensity"] == "uint8" and item["crop_index"] == int(stem.split("_c")[1])
            assert item["source"] == f"{folder}/images/{item['patient_id']}/{stem}.png"
            stored = nib.load(item["image"])
            assert stored.shape == (180, 180, 1) and stored.get_data_dtype() == np.uint8
            # Stored as the DICOM preprocessing stores crops: (i, j, k) = (column, row, slice).
            assert np.array_equal(np.asarray(stored.dataobj)[..., 0], image.T)
            expected = np.diag([-0.5, -0.5, 1.0, 1.0])
            expected[2, 3] = item["slice_z"]
            assert np.array_equal(stored.affine, expected) and nib.aff2axcodes(stored.affine) == ("L", "P", "S")
            assert int(stored.header["sform_code"]) == int(stored.header["qform_code"]) == 2
            for k, label_path in enumerate(item["label"]):
                assert np.array_equal(np.asarray(nib.load(label_path).dataobj)[..., 0], masks[k].T)
            seen += 1
    assert seen == len(PNG_CROPS)
    # Same crops through the MONAI chain: 180 -> centre 128, uint8 -> [0, 1], all four readers. The loader
    # returns (C, column, row), as for DICOM crops, so the (row, column) PNG arrays compare transposed.
    batch = next(iter(DataLoader(lidc_dataset(path, "training", mode="eval"), batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 1, 128, 128) and tuple(batch["label"].shape) == (4, 4, 128, 128)
    for b, item in enumerate(load_lidc_datalist(path, "training")):
        image, masks = truth[("train", item["patient_id"], Path(item["image"]).name.removesuffix(".nii.gz"))]
        assert np.allclose(batch["image"][b, 0].numpy().T, image[26:154, 26:154] / 255.0)
        assert np.array_equal(batch["label"][b].numpy().transpose(0, 2, 1), masks[:, 26:154, 26:154])


def test_png_release_items_are_sorted_by_z(png_release, tmp_path):
    root, _ = png_release
    items = load_lidc_datalist(convert_png_release(root, tmp_path / "out"), "training")
    assert [(i["patient_id"], i["slice_z"], i["crop_index"]) for i in items] == [
        ("LIDC-IDRI-0001", -123.5, 0),
        ("LIDC-IDRI-0001", -123.5, 1),
        ("LIDC-IDRI-0001", -121.25, 0),
        ("LIDC-IDRI-0002", 105.0, 0),
    ]


def test_png_release_errors_name_the_file(png_release, tmp_path):
    root, _ = png_release
    gt = root / "train" / "gt" / "LIDC-IDRI-0002"
    os.remove(gt / "z105.0_c0_l3.png")
    with pytest.raises(ValueError, match=r"z105\.0_c0\.png'.*expected 4 masks .*found readers \[0, 1, 2\]"):
        convert_png_release(root, tmp_path / "a")
    _save_png(gt / "z105.0_c0_l3.png", np.full((180, 180), 128, np.uint8))
    with pytest.raises(ValueError, match=r"z105\.0_c0_l3\.png'.*only 0 and 255, found values \[128\]"):
        convert_png_release(root, tmp_path / "b")
    _save_png(gt / "z105.0_c0_l3.png", np.zeros((128, 128), np.uint8))
    with pytest.raises(ValueError, match=r"z105\.0_c0_l3\.png'.*mask shape \(128, 128\) differs from image shape"):
        convert_png_release(root, tmp_path / "c")
    _save_png(gt / "z105.0_c0_l3.png", np.zeros((180, 180), np.uint8))
    _save_png(gt / "z99.0_c0_l0.png", np.zeros((180, 180), np.uint8))
    with pytest.raises(ValueError, match=r"z99\.0_c0_l0\.png'.*mask without an image"):
        convert_png_release(root, tmp_path / "d")


def test_png_release_refuses_to_overwrite(png_release, tmp_path):
    root, _ = png_release
    convert_png_release(root, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_png_release(root, tmp_path / "out")
    assert convert_png_release(root, tmp_path / "out", overwrite=True).is_file()


def test_cli_png(png_release, tmp_path, capsys):
    root, _ = png_release
    assert main(["png", str(root), "--output-dir", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert "training 4, validation 1, test 1" in capsys.readouterr().out


def test_png_release_and_dicom_crop_load_identically(tmp_path):
    """A DICOM-preprocessing crop and a PNG-release crop of the same (row, column) image: same loader tensors."""
    from car_med.ct.nifti import write_crop_nifti as write_nifti

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(180, 180), dtype=np.uint8)
    image[30, 100] = 255  # an asymmetric marker: a transposed layout would move it
    masks = (rng.random((4, 180, 180)) < 0.3).astype(np.uint8)
    root = tmp_path / "release"
    _save_png(root / "train" / "images" / "LIDC-IDRI-0001" / "z-50.0_c0.png", image)
    for k in range(4):
        _save_png(root / "train" / "gt" / "LIDC-IDRI-0001" / f"z-50.0_c0_l{k}.png", masks[k] * 255)
    release_items = load_lidc_datalist(convert_png_release(root, tmp_path / "v2"), "training")

    # The DICOM path's writer, with a scanner-frame affine of an axial scan (RAS; LPS x, y negated).
    affine = np.array([[-0.5, 0.0, 0.0, 120.0], [0.0, -0.5, 0.0, 80.0], [0.0, 0.0, 2.5, -50.0], [0, 0, 0, 1.0]])
    dicom_dir = tmp_path / "dicom"
    dicom_dir.mkdir()
    write_nifti(dicom_dir / "image.nii.gz", image, affine)
    for k in range(4):
        write_nifti(dicom_dir / f"mask{k}.nii.gz", masks[k], affine)
    dicom_item = dict(release_items[0])
    dicom_item.update(
        image=str(dicom_dir / "image.nii.gz"), label=[str(dicom_dir / f"mask{k}.nii.gz") for k in range(4)]
    )
    assert nib.load(dicom_item["image"]).shape == nib.load(release_items[0]["image"]).shape == (180, 180, 1)

    from_release = lidc_dataset(release_items, mode="eval")[0]
    from_dicom = lidc_dataset([dicom_item], mode="eval")[0]
    for key in ("image", "label"):
        assert from_release[key].shape == from_dicom[key].shape
        assert torch.equal(from_release[key].as_tensor(), from_dicom[key].as_tensor()), key
    # Both (C, column, row), and the in-plane axes point the same way in RAS.
    assert np.allclose(from_release["image"][0].numpy().T, image[26:154, 26:154] / 255.0)
    release_affine = np.asarray(from_release["image"].affine)
    assert np.array_equal(release_affine[:2, :2], affine[:2, :2])
    assert nib.aff2axcodes(release_affine) == nib.aff2axcodes(affine)


def _release_dict(n_patients: int = 20, slices: int = 2, size: int = 128) -> dict:
    rng = np.random.default_rng(1)
    data = {}
    for p in range(n_patients):
        for s in range(slices):
            masks = [(rng.random((size, size)) < 0.2).astype(np.uint8) for _ in range(4)]
            masks[2][:] = 0
            data[f"LIDC-IDRI-{p:04d}_slice_{s}"] = {
                "image": rng.random((size, size)).astype(np.float32),
                "masks": masks,
                "series_uid": f"1.3.6.1.4.1.14519.{p}",
            }
    return data


def test_pickle_release_round_trip_and_patient_split(tmp_path):
    data = _release_dict()
    src = tmp_path / "data_lidc.pickle"
    src.write_bytes(pickle.dumps(data, protocol=4))
    path = convert_pickle_release(src, tmp_path / "out", seed=3)
    content = json.loads(path.read_text())
    assert content["lidc_version"] == "v1"
    patients_by_split = {}
    seen = set()
    for key in ("training", "validation", "test"):
        items = load_lidc_datalist(path, key)
        patients_by_split[key] = {item["patient_id"] for item in items}
        for item in items:
            entry = data[item["pickle_key"]]
            seen.add(item["pickle_key"])
            assert item["intensity"] == "unit" and item["series_uid"] == entry["series_uid"]
            assert np.isnan(item["slice_z"]) and item["slice_key"] == item["pickle_key"].split("_", 1)[1]
            stored = nib.load(item["image"])
            assert np.array_equal(np.asarray(stored.dataobj)[..., 0], entry["image"].T)
            assert np.array_equal(stored.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
            for k, label_path in enumerate(item["label"]):
                assert np.array_equal(np.asarray(nib.load(label_path).dataobj)[..., 0], entry["masks"][k].T)
    assert seen == set(data)  # nothing dropped
    sizes = {key: len(p) for key, p in patients_by_split.items()}
    assert sizes == {"training": 14, "validation": 3, "test": 3}
    a, b, c = patients_by_split.values()
    assert not (a & b or a & c or b & c)
    batch = next(iter(DataLoader(lidc_dataset(path, "validation", mode="train"), batch_size=3)))
    assert tuple(batch["image"].shape) == (3, 1, 128, 128) and tuple(batch["label"].shape) == (3, 1, 128, 128)
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    # Through the loader (eval: all readers), (C, column, row) against the pickle's (row, column) arrays.
    items = load_lidc_datalist(path, "validation")
    batch = next(iter(DataLoader(lidc_dataset(path, "validation", mode="eval"), batch_size=len(items))))
    for b, item in enumerate(items):
        entry = data[item["pickle_key"]]
        assert np.array_equal(batch["image"][b, 0].numpy().T, entry["image"])
        assert np.array_equal(batch["label"][b].numpy().transpose(0, 2, 1), np.stack(entry["masks"]))


def test_split_patients_is_seeded_and_complete():
    patients = [f"P{i:03d}" for i in range(100) for _ in range(3)]
    first = split_patients(patients, seed=0)
    assert first == split_patients(list(reversed(patients)), seed=0)
    assert first != split_patients(patients, seed=1)
    assert Counter(first.values()) == {"training": 70, "validation": 15, "test": 15}
    with pytest.raises(ValueError, match="summing to 1"):
        split_patients(patients, fractions=(0.7, 0.2, 0.2))


def test_pickle_release_errors(tmp_path):
    data = _release_dict(n_patients=2, slices=1, size=16)
    data["LIDC-IDRI-0001_slice_0"]["masks"] = data["LIDC-IDRI-0001_slice_0"]["masks"][:3]
    src = tmp_path / "bad.pickle"
    src.write_bytes(pickle.dumps(data))
    expected = r"pickle key 'LIDC-IDRI-0001_slice_0' field 'masks': expected a list of 4 masks, got 3"
    with pytest.raises(ValueError, match=expected):
        convert_pickle_release(src, tmp_path / "a")
    src.write_bytes(pickle.dumps({"noseparator": {}}))
    with pytest.raises(ValueError, match=r"key 'noseparator' is not of the form '<patient>_<slice>'"):
        convert_pickle_release(src, tmp_path / "b")
    entry = {"image": np.full((4, 4), 2.0), "masks": [np.zeros((4, 4))] * 4, "series_uid": "1"}
    src.write_bytes(pickle.dumps({"P1_0": entry}))
    with pytest.raises(ValueError, match=r"pickle key 'P1_0' field 'image': expected floats in \[0, 1\]"):
        convert_pickle_release(src, tmp_path / "c")


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    src = tmp_path / "evil.pickle"
    src.write_bytes(pickle.dumps({"P1_0": {"image": Path("x")}}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global 'pathlib\.\w*Path'"):
        convert_pickle_release(src, tmp_path / "out")
    assert not (tmp_path / "out" / "datalist.json").exists()
