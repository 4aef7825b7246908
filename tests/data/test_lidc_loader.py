"""car_med.data.lidc: datalist validation, transforms, the random reader draw and batching."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lidc_synth import AFFINE, hu_image, reader_masks
from monai.data import CacheDataset, DataLoader, MetaTensor

from car_med.data import (
    RandAnnotatord,
    ReaderSharesd,
    ScaleLIDCIntensityd,
    lidc_dataset,
    lidc_transforms,
    load_lidc_datalist,
)


def test_load_resolves_paths_and_derives_fields(hu_datalist):
    items = load_lidc_datalist(hu_datalist, "training")
    assert len(items) == 3
    root = hu_datalist.parent.resolve()
    assert items[0]["image"] == str(root / "images" / "train0.nii.gz")
    assert items[0]["label"] == [str(root / "labels" / f"train0_l{k}.nii.gz") for k in range(4)]
    assert all(Path(p).is_file() for item in items for p in [item["image"], *item["label"]])
    assert items[1]["slice_z"] == -122.5
    assert items[0]["intensity"] == "hu"
    # num_annotators = 3: the first three slots hold the readers, the fourth is an empty filler.
    assert items[0]["annotator_present"] == [True, True, True, False]
    assert load_lidc_datalist(hu_datalist, "val")[1]["slice_z"] == 7.0


def _rewrite(hu_datalist: Path, tmp_path: Path, edit) -> Path:
    content = json.loads(hu_datalist.read_text())
    for item in content["training"]:
        for key in ("image",):
            item[key] = str(hu_datalist.parent / item[key])
        item["label"] = [str(hu_datalist.parent / p) for p in item["label"]]
    edit(content["training"][1])
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda item: item.pop("patient_id"), r"item 1 .*missing required field\(s\) \['patient_id'\]"),
        (
            lambda item: item["label"].pop(),
            r"item 1 \(patient_id='LIDC-IDRI-0001'.*field 'label': expected a list of 4 mask paths, got 3",
        ),
        (
            lambda item: item.update(image=item["image"] + ".gone"),
            r"item 1 .*field 'image': file .*train1\.nii\.gz\.gone' does not exist",
        ),
        (
            lambda item: item["label"].__setitem__(2, "nowhere_l2.nii.gz"),
            r"field 'label\[2\]': file .*nowhere_l2\.nii\.gz' does not exist",
        ),
        (lambda item: item.update(slice_z="-12.5"), r"item 1 .*field 'slice_z': expected a finite number"),
        (lambda item: item.update(num_annotators=True), r"field 'num_annotators': expected a non-negative integer"),
        (lambda item: item.update(intensity="raw"), r"field 'intensity': expected one of \('hu', 'uint8', 'unit'\)"),
        (
            lambda item: item.update(annotator_present=[True, False]),
            r"field 'annotator_present': expected a list of 4 booleans",
        ),
        (lambda item: item.update(patient_id=""), r"field 'patient_id': must not be empty"),
    ],
)
def test_malformed_items_name_item_and_field(hu_datalist, tmp_path, edit, expected):
    path = _rewrite(hu_datalist, tmp_path, edit)
    with pytest.raises(ValueError, match=expected):
        load_lidc_datalist(path, "training")


def test_missing_split_and_file_are_clear(hu_datalist, tmp_path):
    with pytest.raises(ValueError, match=r"has no split 'test'; it has \['training', 'validation'\]"):
        load_lidc_datalist(hu_datalist, "test")
    with pytest.raises(ValueError, match="does not exist"):
        load_lidc_datalist(tmp_path / "absent.json", "training")


def test_scale_intensity_by_storage_kind():
    hu = torch.tensor([[[-2000.0, -1024.0, -312.0, 400.0, 1000.0]]])
    out = ScaleLIDCIntensityd("image")({"image": hu})["image"]
    assert torch.allclose(out, torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0]]]))
    narrow = ScaleLIDCIntensityd("image", hu_window=(-1000, 0), clip=False)({"image": hu})["image"]
    assert torch.allclose(narrow, torch.tensor([[[-1.0, -0.024, 0.688, 1.4, 2.0]]]))
    display = torch.tensor([[[0.0, 51.0, 255.0]]])
    scaled = ScaleLIDCIntensityd("image")({"image": display, "intensity": "uint8"})["image"]
    assert torch.allclose(scaled, torch.tensor([[[0.0, 0.2, 1.0]]]))
    unit = torch.tensor([[[0.0, 0.25, 1.0]]])
    assert torch.equal(ScaleLIDCIntensityd("image")({"image": unit, "intensity": "unit"})["image"], unit)
    with pytest.raises(ValueError, match=r"'intensity' of item \(patient_id='p'\) must be one of"):
        ScaleLIDCIntensityd("image")({"image": unit, "intensity": "float", "patient_id": "p"})
    with pytest.raises(ValueError, match="low < high"):
        ScaleLIDCIntensityd("image", hu_window=(400, -1024))


def test_eval_transforms_shapes_values_and_affine(hu_datalist):
    item = load_lidc_datalist(hu_datalist, "training")[0]
    out = lidc_transforms("eval")(item)
    image, label = out["image"], out["label"]
    assert isinstance(image, MetaTensor)
    assert tuple(image.shape) == (1, 128, 128) and image.dtype == torch.float32
    assert tuple(label.shape) == (4, 128, 128) and label.dtype == torch.uint8
    # The 128 window starts at (26, 26) of the 180 crop.
    assert image[0, 0, :5].tolist() == pytest.approx([0.0, 0.5, 1.0, 0.0, 1.0])
    expected_image = (np.clip(hu_image(0)[26:154, 26:154].astype(np.float64), -1024, 400) + 1024) / 1424
    assert np.allclose(image[0].numpy(), expected_image, atol=1e-6)
    assert np.array_equal(label.numpy(), reader_masks(0)[:, 26:154, 26:154])
    # The 4x4 scanner-frame affine survives, shifted by the crop offset: pixel (0, 0) is old pixel (26, 26).
    expected_affine = AFFINE.copy()
    expected_affine[:3, 3] = AFFINE[:3, :3] @ [26, 26, 0] + AFFINE[:3, 3]
    assert np.allclose(image.affine.numpy(), expected_affine)
    assert out["annotation_ids"] == "[0, 1, 2]"
    assert out["annotator_present"].tolist() == [True, True, True, False]


def test_train_transform_keeps_one_reader(hu_datalist):
    item = load_lidc_datalist(hu_datalist, "training")[2]
    transform = lidc_transforms("train")
    transform.set_random_state(seed=3)
    full = reader_masks(2)[:, 26:154, 26:154]
    for _ in range(8):
        out = transform(dict(item))
        assert tuple(out["image"].shape) == (1, 128, 128)
        assert tuple(out["label"].shape) == (1, 128, 128)
        assert np.array_equal(out["label"][0].numpy(), full[out["annotator_index"]])


def _draws(transform: RandAnnotatord, data: dict, n: int) -> list[int]:
    return [transform(data)["annotator_index"] for _ in range(n)]


def test_random_annotator_uniform_over_all_four_and_seeded():
    label = torch.zeros(4, 8, 8, dtype=torch.uint8)
    label[0, 2:4, 2:4] = 1  # readers 1-3 empty: still drawn, an empty mask is an opinion
    data = {"label": label}
    draws = _draws(RandAnnotatord(among="all").set_random_state(seed=0), data, 800)
    counts = Counter(draws)
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(140 <= counts[k] <= 260 for k in range(4)), counts  # 200 expected, > 4 sd margin
    again = _draws(RandAnnotatord().set_random_state(seed=0), data, 800)
    other = _draws(RandAnnotatord().set_random_state(seed=1), data, 800)
    assert again == draws
    assert other != draws


def test_random_annotator_restricted_choices():
    label = torch.zeros(4, 8, 8, dtype=torch.uint8)
    label[1, 0, 0] = 1
    label[3, 5, 5] = 1
    present = torch.tensor([True, True, False, False])
    draw = RandAnnotatord(among="present").set_random_state(seed=0)
    assert set(_draws(draw, {"label": label, "annotator_present": present}, 200)) == {0, 1}
    draw = RandAnnotatord(among="nonempty").set_random_state(seed=0)
    assert set(_draws(draw, {"label": label}, 200)) == {1, 3}
    # All masks empty: every slot is the same empty mask, so the draw falls back to all four.
    assert set(_draws(draw, {"label": torch.zeros(4, 8, 8)}, 200)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="no present annotator"):
        RandAnnotatord(among="present")({"label": label, "annotator_present": torch.zeros(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="3 flags but the label has 4"):
        RandAnnotatord(among="present")({"label": label, "annotator_present": [True, True, True]})
    with pytest.raises(ValueError, match="among must be one of"):
        RandAnnotatord(among="any")


def test_random_annotator_cuts_all_keys_at_the_same_slot():
    label = torch.arange(4.0).reshape(4, 1, 1).expand(4, 3, 3).clone()
    out = RandAnnotatord(keys=("label", "copy")).set_random_state(seed=5)({"label": label, "copy": label * 10})
    k = out["annotator_index"]
    assert out["label"].shape == (1, 3, 3) and float(out["label"][0, 0, 0]) == k
    assert float(out["copy"][0, 0, 0]) == 10 * k


@pytest.mark.parametrize(("mode", "label_channels"), [("eval", 4), ("train", 1)])
def test_dataloader_batches(hu_datalist, mode, label_channels):
    dataset = lidc_dataset(hu_datalist, "training", mode=mode)
    batch = next(iter(DataLoader(dataset, batch_size=3, num_workers=0)))
    assert tuple(batch["image"].shape) == (3, 1, 128, 128)
    assert tuple(batch["label"].shape) == (3, label_channels, 128, 128)
    assert tuple(batch["image"].affine.shape) == (3, 4, 4)
    assert batch["patient_id"] == ["LIDC-IDRI-0000", "LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    assert batch["slice_z"].tolist() == [-123.5, -122.5, -121.5]
    assert tuple(batch["annotator_present"].shape) == (3, 4)


def test_cached_dataset_and_null_slice_z(hu_datalist, tmp_path):
    content = json.loads(hu_datalist.read_text())
    for item in content["validation"]:
        item["image"] = str(hu_datalist.parent / item["image"])
        item["label"] = [str(hu_datalist.parent / p) for p in item["label"]]
        item["slice_z"] = None
        item["annotation_ids"] = []
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    dataset = lidc_dataset(path, "validation", mode="eval", cache=True, roi_size=(96, 64))
    assert isinstance(dataset, CacheDataset)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert tuple(batch["label"].shape) == (2, 4, 96, 64)
    assert all(math.isnan(z) for z in batch["slice_z"].tolist())
    assert batch["annotation_ids"] == ["[]", "[]"]


def test_lidc_dataset_rejects_bad_arguments(hu_datalist):
    with pytest.raises(ValueError, match="mode must be 'train' or 'eval'"):
        lidc_dataset(hu_datalist, "training", mode="test")
    with pytest.raises(ValueError, match="ignored when a transform is given"):
        lidc_dataset(hu_datalist, "training", transform=lambda d: d, roi_size=(64, 64))


def test_augmentation_turns_image_and_reader_mask_together_and_keeps_their_values(hu_datalist):
    item = load_lidc_datalist(hu_datalist, "training")[2]
    plain = lidc_transforms("eval")(dict(item))
    image0, masks0 = plain["image"][0].numpy(), plain["label"].numpy()
    # the 8 orientations of the square crop: 4 rotations, with or without a flip
    orientations = [np.rot90(a, k) for k in range(4) for a in (image0, image0[::-1])]
    transform = lidc_transforms("train", augment=True)
    transform.set_random_state(seed=5)
    seen = set()
    for _ in range(40):
        out = transform(dict(item))
        image, mask = out["image"][0].numpy(), out["label"][0].numpy()
        match = [k for k, o in enumerate(orientations) if np.array_equal(o, image)]
        assert len(match) == 1, "the augmented image is not a flip/rotation of the crop"
        k = match[0]
        reader = masks0[out["annotator_index"]]
        expected = np.rot90(reader if k % 2 == 0 else reader[::-1], k // 2)
        assert np.array_equal(mask, expected)  # the mask turned with its image, pixel for pixel
        seen.add(k)
    assert len(seen) >= 6  # not stuck in one orientation
    with pytest.raises(ValueError, match="mode='train' only"):
        lidc_transforms("eval", augment=True)
    with pytest.raises(ValueError, match="roi_size must be square"):
        lidc_transforms("train", roi_size=(128, 96), augment=True)


@pytest.mark.parametrize(("among", "slots"), [("all", [0, 1, 2, 3]), ("present", [0, 1]), ("nonempty", [1, 3])])
def test_reader_shares_are_the_mean_of_the_slots_one_draw_picks_from(among, slots):
    label = torch.zeros(4, 6, 6, dtype=torch.uint8)
    label[1, 1:4, 1:4] = 1
    label[3, 2:5, 2:5] = 1
    data = {"label": label, "annotator_present": torch.tensor([True, True, False, False])}
    shares = ReaderSharesd(among=among)(data)["label_shares"].float()
    expected = label[slots].float().mean(0)
    assert shares.shape == (2, 6, 6)
    assert torch.equal(shares[1], expected)
    assert torch.equal(shares[0] + shares[1], torch.ones(6, 6))
    # the shares are the expectation of RandAnnotatord's draw with the same `among`
    draw = RandAnnotatord(among=among).set_random_state(seed=0)
    mean_draw = torch.stack([draw(dict(data))["label"][0].float() for _ in range(2000)]).mean(0)
    assert (mean_draw - expected).abs().max() < 0.05


def test_reader_shares_reject_values_outside_the_classes():
    label = torch.zeros(4, 3, 3, dtype=torch.uint8)
    label[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"'label' of item .* values outside \[0, 1\]: \[0, 2\]"):
        ReaderSharesd()({"label": label})
    with pytest.raises(ValueError, match="one output key per key"):
        ReaderSharesd(keys=("label", "other"), output_keys="label_shares")


def test_augmented_shares_turn_with_the_image_and_contain_the_drawn_reader(hu_datalist):
    item = load_lidc_datalist(hu_datalist, "training")[2]
    plain = lidc_transforms("eval")(dict(item))
    image0, masks0 = plain["image"][0].numpy(), plain["label"].numpy().astype(np.float32)
    orientations = [np.rot90(a, k) for k in range(4) for a in (image0, image0[::-1])]
    transform = lidc_transforms("train", augment=True, shares_key="label_shares")
    transform.set_random_state(seed=2)
    for _ in range(16):
        out = transform(dict(item))
        k = next(k for k, o in enumerate(orientations) if np.array_equal(o, out["image"][0].numpy()))
        mean0 = masks0.mean(0)
        expected = np.rot90(mean0 if k % 2 == 0 else mean0[::-1], k // 2)
        shares = np.asarray(out["label_shares"], dtype=np.float32)
        assert np.array_equal(shares[1], expected)
        assert (shares[1][out["label"][0].numpy() == 1] > 0).all()
    with pytest.raises(ValueError, match="shares_key applies to mode='train' only"):
        lidc_transforms("eval", shares_key="label_shares")
    with pytest.raises(ValueError, match="must differ from the image and label keys"):
        lidc_transforms("train", shares_key="label")
