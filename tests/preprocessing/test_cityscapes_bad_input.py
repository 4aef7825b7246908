"""preprocessing.cityscapes on bad input: every broken image is a logged skip or a clear error, never a wrong label."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from car_med.data.cityscapes_layout import label_ids_to_train_ids
from preprocessing.cityscapes import run
from preprocessing.synthetic_cityscapes import write_synthetic

SIZE = (64, 128)


def _stem(city: str) -> str:
    return f"{city}_000000_000019"


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict:
    """One image per city, six of them broken in a different way, plus a misnamed file."""
    base = tmp_path_factory.mktemp("cityscapes_bad")
    root, pred = base / "root", base / "pred"
    write_synthetic(root, pred, images_per_city=1, size=SIZE, seed=0)
    gt, bb = root / "gtFine" / "train", pred / "train"
    (gt / "aachen" / f"{_stem('aachen')}_gtFine_labelIds.png").unlink()
    label_path = gt / "bochum" / f"{_stem('bochum')}_gtFine_labelIds.png"
    with Image.open(label_path) as im:
        im.resize((SIZE[1] // 2, SIZE[0] // 2), Image.NEAREST).save(label_path)
    label_path = gt / "zurich" / f"{_stem('zurich')}_gtFine_labelIds.png"
    label = np.array(Image.open(label_path))
    label[5, 7] = 200
    Image.fromarray(label).save(label_path)
    (bb / "darmstadt" / f"{_stem('darmstadt')}_blackbox.png").unlink()
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(bb / "ulm" / f"{_stem('ulm')}_blackbox.png")
    bad_values = np.zeros(SIZE, np.uint8)
    bad_values[0, 0] = 24
    Image.fromarray(bad_values).save(bb / "monchengladbach" / f"{_stem('monchengladbach')}_blackbox.png")
    (root / "leftImg8bit" / "train" / "aachen" / "notes.png").write_bytes(b"not an image")
    return {"root": root, "pred": pred, "base": base}


EXPECTED_SKIPS = {
    ("aachen_000000_000019", "missing gtFine labelIds file"),
    ("bochum_000000_000019", "image and label sizes differ"),
    ("zurich_000000_000019", "unknown labelId"),
    ("darmstadt_000000_000019", "missing black-box prediction"),
    ("ulm_000000_000019", "black-box prediction size differs from the image and the output size"),
    ("monchengladbach_000000_000019", "black-box prediction values outside trainIds 0..18"),
}


def test_each_broken_image_is_a_logged_skip_and_absent_from_the_datalist(broken):
    out = broken["base"] / "out_bb"
    summary = run(broken["root"], out, blackbox_dir=broken["pred"], size=(32, 64), progress=False)
    skips = {(s.get("stem"), s["reason"]) for s in summary["skipped"]}
    assert skips == EXPECTED_SKIPS | {(None, "file name does not follow <city>_<seq>_<frame>_leftImg8bit.png")}
    assert summary["counts"]["skipped"] == 7
    assert json.loads((out / "summary.json").read_text()) == summary
    datalist = json.loads((out / "datalist.json").read_text())
    kept = sorted(item["stem"] for items in datalist.values() for item in items)
    assert kept == ["frankfurt_000000_000019", "lindau_000000_000019", "munster_000000_000019"]
    assert summary["counts"]["images_per_split"] == {"training": 0, "validation": 0, "test": 3}
    details = {s.get("stem"): s.get("detail", "") for s in summary["skipped"]}
    assert "200" in details["zurich_000000_000019"]
    assert "10x20" in details["ulm_000000_000019"]
    assert "24" in details["monchengladbach_000000_000019"]
    # no output files were written for a skipped image
    assert not list(out.rglob("zurich_*_label.png")) and not list(out.rglob("ulm_*_image.png"))


def test_without_a_blackbox_folder_only_the_label_problems_are_skips(broken):
    summary = run(broken["root"], broken["base"] / "out_plain", size=(32, 64), progress=False)
    reasons = sorted(s["reason"] for s in summary["skipped"] if "stem" in s)
    assert reasons == ["image and label sizes differ", "missing gtFine labelIds file", "unknown labelId"]
    assert summary["counts"]["images_per_split"] == {"training": 0, "validation": 3, "test": 3}


def test_a_fixed_file_is_picked_up_on_rerun(broken, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(broken["root"], root)
    out = tmp_path / "out"
    first = run(root, out, size=(32, 64), progress=False)
    assert first["counts"]["images_per_split"]["training"] == 0
    label_path = root / "gtFine" / "train" / "zurich" / "zurich_000000_000019_gtFine_labelIds.png"
    label = np.array(Image.open(label_path))
    label[label == 200] = 7
    Image.fromarray(label).save(label_path)
    second = run(root, out, size=(32, 64), progress=False)
    assert second["counts"]["images_per_city"]["training"] == {"zurich": 1}


def test_unknown_label_ids_raise_naming_the_values():
    with pytest.raises(ValueError, match=r"unknown Cityscapes labelId\(s\) 34, 255 \(2 pixels\)"):
        label_ids_to_train_ids(np.array([[7, 34], [255, 8]], dtype=np.uint8))
    np.testing.assert_array_equal(label_ids_to_train_ids(np.arange(34)).max(), 24)


def test_official_table_entries():
    table = label_ids_to_train_ids(np.arange(34))
    assert table[[7, 8, 11, 21, 23, 24, 26, 33]].tolist() == [0, 1, 2, 8, 10, 11, 13, 18]
    assert sorted(set(table.tolist()) - {24}) == list(range(19))
    ignore = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
    assert (table[ignore] == 24).all() and (table == 24).sum() == len(ignore)


def test_missing_folders_are_clear_errors(tmp_path, broken):
    with pytest.raises(FileNotFoundError, match="no leftImg8bit/train or leftImg8bit/val"):
        run(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="--blackbox-dir"):
        run(broken["root"], tmp_path / "out", blackbox_dir=tmp_path / "nowhere", progress=False)
