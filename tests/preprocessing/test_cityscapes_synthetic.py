"""preprocessing.synthetic_cityscapes: official layout and names, the 5 base classes, determinism, a noisy black box."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from car_med.data.cityscapes_layout import LABEL_ID_TO_TRAIN_ID, label_ids_to_train_ids
from preprocessing.synthetic_cityscapes import main, make_scene, write_synthetic

SIZE = (64, 128)


def _tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    assert main(["--output-dir", str(base / "a"), "--blackbox-dir", str(base / "pa"), "--images-per-city", "2",
                 "--size", *map(str, SIZE), "--seed", "5"]) == 0  # fmt: skip
    return base


def test_official_layout_and_file_names(synth):
    root = synth / "a"
    images = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit").rglob("*.png"))
    labels = sorted(p.relative_to(root).as_posix() for p in (root / "gtFine").rglob("*.png"))
    assert len(images) == len(labels) == 18
    pattern = re.compile(r"^leftImg8bit/(train|val)/([a-z]+)/\2_\d{6}_\d{6}_leftImg8bit\.png$")
    assert all(pattern.match(p) for p in images)
    assert [p.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelIds") for p in images] == labels
    train_cities = {p.split("/")[2] for p in images if "/train/" in p}
    assert {"darmstadt", "monchengladbach", "ulm"} < train_cities
    assert {p.split("/")[2] for p in images if "/val/" in p} == {"frankfurt", "lindau", "munster"}
    predictions = sorted(p.relative_to(synth / "pa").as_posix() for p in (synth / "pa").rglob("*.png"))
    assert predictions == [p.replace("leftImg8bit/", "", 1).replace("_leftImg8bit", "_blackbox") for p in images]


def test_scenes_hold_the_five_base_classes_and_only_official_label_ids(synth):
    root = synth / "a"
    for path in (root / "gtFine").rglob("*_labelIds.png"):
        label = np.asarray(Image.open(path))
        assert label.shape == SIZE and label.dtype == np.uint8
        ids = set(np.unique(label).tolist())
        assert ids <= set(LABEL_ID_TO_TRAIN_ID)
        assert {7, 8, 21, 24, 26} <= ids  # road, sidewalk, vegetation, person, car
        image = np.asarray(Image.open(str(path).replace("gtFine", "leftImg8bit").replace("_labelIds", "")))
        assert image.shape == (*SIZE, 3)
        # the classes are separable by colour: road pixels are far from vegetation pixels on average
        assert np.abs(image[label == 7].mean(0) - image[label == 21].mean(0)).sum() > 60


def test_blackbox_is_noisy_but_mostly_right(synth):
    agreements = []
    for path in (synth / "pa").rglob("*_blackbox.png"):
        pred = np.asarray(Image.open(path))
        rel = path.relative_to(synth / "pa").as_posix().replace("_blackbox", "_gtFine_labelIds")
        truth = label_ids_to_train_ids(np.asarray(Image.open(synth / "a" / "gtFine" / rel)))
        assert pred.shape == SIZE and pred.max() <= 18
        agreements.append((pred == truth)[truth != 24].mean())
    assert 0.6 < np.mean(agreements) < 0.99 and min(agreements) < 0.99


def test_same_seed_same_bytes_other_seed_other_scenes(synth, tmp_path):
    write_synthetic(tmp_path / "b", tmp_path / "pb", images_per_city=2, size=SIZE, seed=5)
    assert _tree_bytes(tmp_path / "b") == _tree_bytes(synth / "a")
    assert _tree_bytes(tmp_path / "pb") == _tree_bytes(synth / "pa")
    write_synthetic(tmp_path / "c", None, images_per_city=2, size=SIZE, seed=6)
    other = _tree_bytes(tmp_path / "c")
    assert other.keys() == _tree_bytes(synth / "a").keys() and other != _tree_bytes(synth / "a")


def test_the_real_size_is_supported():
    image, label = make_scene(np.random.default_rng(0), (1024, 2048))
    assert image.shape == (1024, 2048, 3) and label.shape == (1024, 2048)
    assert {7, 8, 21, 24, 26} <= set(np.unique(label).tolist())
