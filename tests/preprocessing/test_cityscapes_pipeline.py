"""preprocessing.cityscapes on a synthetic tree in the official layout: split counts, label ids, resizing, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing.cityscapes import run
from preprocessing.synthetic_cityscapes import write_synthetic

REPO = Path(__file__).resolve().parents[2]
SOURCE_SIZE, OUT_SIZE = (128, 256), (32, 64)  # the real 1024x2048 -> 256x512 ratio, 4x

# Written here independently of the module's table (cityscapesScripts labels.py): the labelIds the scenes use.
EXPECTED_TRAIN_ID = {7: 0, 8: 1, 11: 2, 17: 5, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 26: 13, 1: 24, 4: 24}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cityscapes")
    root, pred, out = base / "root", base / "pred", base / "out"
    write_synthetic(root, pred, images_per_city=2, size=SOURCE_SIZE, seed=3)
    summary = run(root, out, blackbox_dir=pred, size=OUT_SIZE, progress=False)
    return {"root": root, "pred": pred, "out": out, "summary": summary}


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_split_counts_follow_the_holdout_cities_and_the_official_val_set(tree):
    datalist = json.loads((tree["out"] / "datalist.json").read_text())
    cities = {split: sorted({item["city"] for item in items}) for split, items in datalist.items()}
    assert cities == {
        "training": ["aachen", "bochum", "zurich"],
        "validation": ["darmstadt", "monchengladbach", "ulm"],
        "test": ["frankfurt", "lindau", "munster"],
    }
    assert {split: len(items) for split, items in datalist.items()} == {"training": 6, "validation": 6, "test": 6}
    counts = tree["summary"]["counts"]
    assert counts["images_per_split"] == {"training": 6, "validation": 6, "test": 6}
    assert counts["images_per_city"]["validation"] == {"darmstadt": 2, "monchengladbach": 2, "ulm": 2}
    assert counts["skipped"] == 0 and tree["summary"]["skipped"] == []
    assert all(item["official_split"] == "val" for item in datalist["test"])


def test_datalist_paths_are_relative_exist_and_keep_the_official_stem(tree):
    datalist = json.loads((tree["out"] / "datalist.json").read_text())
    for split, items in datalist.items():
        for item in items:
            assert set(item) >= {"image", "label", "blackbox", "stem", "city"}
            for key, suffix in (("image", "_image.png"), ("label", "_label.png"), ("blackbox", "_blackbox.png")):
                assert not os.path.isabs(item[key])
                assert item[key] == f"{split}/{item['city']}/{item['stem']}{suffix}"
                assert (tree["out"] / item[key]).is_file()
            assert item["stem"].startswith(item["city"] + "_") and item["stem"].endswith("_000019")


def test_labels_are_nearest_resized_train_ids_with_ignore_24_and_never_interpolated(tree):
    datalist = json.loads((tree["out"] / "datalist.json").read_text())
    allowed = set(range(19)) | {24}
    for item in [i for items in datalist.values() for i in items]:
        official = "val" if item["official_split"] == "val" else "train"
        source = _png(tree["root"] / "gtFine" / official / item["city"] / f"{item['stem']}_gtFine_labelIds.png")
        label = _png(tree["out"] / item["label"])
        assert label.shape == OUT_SIZE and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= allowed
        assert {0, 1, 8, 11, 13} <= set(np.unique(label).tolist())  # the 5 base classes of the flips
        train_ids = np.vectorize(EXPECTED_TRAIN_ID.__getitem__, otypes=[np.uint8])(source)
        reference = np.asarray(Image.fromarray(train_ids).resize(OUT_SIZE[::-1], Image.NEAREST))
        np.testing.assert_array_equal(label, reference)
        # every output value occurs in the 4x4 source block under the output pixel
        blocks = train_ids.reshape(OUT_SIZE[0], 4, OUT_SIZE[1], 4).transpose(0, 2, 1, 3).reshape(*OUT_SIZE, 16)
        assert (blocks == label[..., None]).any(-1).all()


def test_images_are_bilinear_and_blackbox_nearest_resized(tree):
    item = json.loads((tree["out"] / "datalist.json").read_text())["validation"][0]
    with Image.open(tree["root"] / "leftImg8bit" / "train" / item["city"] / f"{item['stem']}_leftImg8bit.png") as im:
        expected = np.asarray(im.resize(OUT_SIZE[::-1], Image.BILINEAR))
    image = _png(tree["out"] / item["image"])
    assert image.shape == (*OUT_SIZE, 3)
    np.testing.assert_array_equal(image, expected)
    with Image.open(tree["pred"] / "train" / item["city"] / f"{item['stem']}_blackbox.png") as im:
        expected = np.asarray(im.resize(OUT_SIZE[::-1], Image.NEAREST))
    blackbox = _png(tree["out"] / item["blackbox"])
    np.testing.assert_array_equal(blackbox, expected)
    assert blackbox.max() <= 18


def test_rerun_skips_finished_images_and_gives_identical_bytes(tree):
    before = _tree_bytes(tree["out"])
    mtimes = {p: p.stat().st_mtime_ns for p in tree["out"].rglob("*_label.png")}
    run(tree["root"], tree["out"], blackbox_dir=tree["pred"], size=OUT_SIZE, progress=False)
    assert _tree_bytes(tree["out"]) == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # not rewritten


def test_a_sigkilled_run_resumes_to_byte_identical_outputs(tree, tmp_path):
    clean = _tree_bytes(tree["out"])
    killed = tmp_path / "killed"
    args = ["--root", str(tree["root"]), "--output-dir", str(killed), "--blackbox-dir", str(tree["pred"])]
    args += ["--size", *map(str, OUT_SIZE), "--no-progress"]
    # Slow each image down so that the kill lands mid-run whatever the machine's speed.
    code = (
        "import sys, time, preprocessing.cityscapes as c\n"
        "real = c.process_image\n"
        "c.process_image = lambda *a: (real(*a), time.sleep(0.25))[0]\n"
        f"sys.exit(c.main({args!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((killed / "records").glob("*.json"))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(list((killed / "records").glob("*.json")))
    assert 5 <= done < 18 and not (killed / "datalist.json").exists()
    run(tree["root"], killed, blackbox_dir=tree["pred"], size=OUT_SIZE, progress=False)
    assert _tree_bytes(killed) == clean
