"""Cityscapes datalist loader and cityscapes_transforms on a preprocessed synthetic tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from car_med.data.cityscapes import cityscapes_dataset, cityscapes_transforms, load_cityscapes_datalist
from preprocessing.cityscapes import run
from preprocessing.synthetic_cityscapes import write_synthetic


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("cityscapes_data")
    write_synthetic(base / "root", base / "pred", images_per_city=1, size=(64, 128), seed=1)
    run(base / "root", base / "out", blackbox_dir=base / "pred", size=(32, 64), progress=False)
    return base / "out"


def test_loader_resolves_paths_and_checks_fields(prepared):
    items = load_cityscapes_datalist(prepared / "datalist.json", "val", require_blackbox=True)
    assert [i["city"] for i in items] == ["darmstadt", "monchengladbach", "ulm"]
    assert all(i["image"].startswith(str(prepared)) and i["blackbox"].endswith("_blackbox.png") for i in items)
    content = json.loads((prepared / "datalist.json").read_text())
    del content["training"][0]["blackbox"]
    bad = prepared / "bad_datalist.json"  # beside the real one, so relative paths resolve
    bad.write_text(json.dumps(content))
    missing = r"item 0 \(stem='aachen_000000_000019'\): missing required field\(s\) \['blackbox'\].*--blackbox-dir"
    with pytest.raises(ValueError, match=missing):
        load_cityscapes_datalist(bad, "training", require_blackbox=True)
    content["training"][0]["label"] = "training/aachen/nope.png"
    bad.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="field 'label': file .*nope.png' does not exist"):
        load_cityscapes_datalist(bad, "training")
    with pytest.raises(ValueError, match="has no split 'extra'"):
        load_cityscapes_datalist(prepared / "datalist.json", "extra")


def test_eval_transforms_give_scaled_image_exact_label_and_one_hot_blackbox(prepared):
    item = load_cityscapes_datalist(prepared / "datalist.json", "test")[0]
    out = cityscapes_transforms("eval", label_modes=True)(item)
    image, label, blackbox = out["image"], out["label"], out["blackbox"]
    assert image.shape == (3, 32, 64) and image.dtype == torch.float32
    raw = np.asarray(Image.open(item["image"]))
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), raw / 255.0, atol=1e-6)
    assert label.shape == (1, 32, 64) and label.dtype == torch.int64
    np.testing.assert_array_equal(label[0].numpy(), np.asarray(Image.open(item["label"])))
    assert blackbox.shape == (19, 32, 64)
    np.testing.assert_array_equal(blackbox.argmax(0).numpy(), np.asarray(Image.open(item["blackbox"])))
    assert torch.equal(blackbox.sum(0), torch.ones(32, 64))
    assert out["label_modes"].shape == (32, 32, 64) and "label_flips" not in out


def test_train_transforms_flip_whole_classes_and_resize_for_the_demo(prepared):
    ds = cityscapes_dataset(prepared / "datalist.json", "training", "train", spatial_size=(16, 32))
    ds.transform.set_random_state(0)
    seen = set()
    for _ in range(20):
        out = ds[0]
        assert out["image"].shape == (3, 16, 32) and out["blackbox"].shape == (19, 16, 32)
        values = set(out["label"].unique().tolist())
        assert values <= set(range(25))
        for k, (base, twin) in enumerate([(1, 19), (11, 20), (13, 21), (8, 22), (0, 23)]):
            assert not (base in values and twin in values)  # never half flipped
            assert (twin in values) == bool(out["label_flips"][k]) or (base not in values and twin not in values)
        seen |= values
    assert {19, 20, 21, 22, 23} <= seen and {0, 1, 8, 11, 13} <= seen
