"""car_med.blackbox: a prediction folder from a TorchScript model or a MONAI bundle network, read by preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from car_med.blackbox import main
from preprocessing.cityscapes import run
from preprocessing.synthetic_cityscapes import write_synthetic


class RedToClass(torch.nn.Module):
    """Logits whose argmax is ``floor(red * 18.99)``: a known answer per pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = (x[:, 0] * 18.99).floor().long()
        return torch.nn.functional.one_hot(target, 19).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("cityscapes_bb")
    write_synthetic(base / "root", None, images_per_city=1, size=(32, 64), seed=2)
    return base


def _expected(image_path) -> np.ndarray:
    red = np.asarray(Image.open(image_path))[..., 0].astype(np.float32)
    return np.floor(red / 255.0 * 18.99).astype(np.uint8)


def test_torchscript_model_on_a_root_writes_named_predictions_that_preprocessing_reads(root):
    model = root / "model.ts"
    torch.jit.script(RedToClass()).save(str(model))
    pred = root / "pred_ts"
    assert (
        main(["--network", str(model), "--root", str(root / "root"), "--output-dir", str(pred), "--no-progress"]) == 0
    )
    files = sorted(p.relative_to(pred).as_posix() for p in pred.rglob("*.png"))
    assert len(files) == 9 and "train/ulm/ulm_000000_000019_blackbox.png" in files
    source = root / "root" / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(pred / "val/lindau/lindau_000000_000019_blackbox.png")), _expected(source)
    )
    summary = run(root / "root", root / "out", blackbox_dir=pred, size=(16, 32), progress=False)
    assert summary["counts"]["skipped"] == 0
    datalist = json.loads((root / "out" / "datalist.json").read_text())
    assert all("blackbox" in item for items in datalist.values() for item in items)


def test_bundle_network_on_a_datalist_loads_the_weights(root):
    run(root / "root", root / "out_plain", size=(16, 32), progress=False)
    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {"network_def": {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 19, "kernel_size": 1}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    net = torch.nn.Conv2d(3, 19, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.arange(19.0))  # argmax 18 everywhere: only if the weights were loaded
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    pred = root / "pred_bundle"
    args = [
        "--network",
        str(bundle),
        "--datalist",
        str(root / "out_plain" / "datalist.json"),
        "--output-dir",
        str(pred),
    ]
    assert main([*args, "--no-progress"]) == 0
    files = sorted(pred.rglob("*_blackbox.png"))
    assert len(files) == 9
    for path in files:
        pred_array = np.asarray(Image.open(path))
        assert pred_array.shape == (16, 32) and (pred_array == 18).all()
    # a second run keeps what is there
    mtime = files[0].stat().st_mtime_ns
    main([*args, "--no-progress"])
    assert files[0].stat().st_mtime_ns == mtime


def test_a_network_with_too_few_channels_is_a_clear_error(root):
    model = root / "small.ts"
    torch.jit.script(torch.nn.Conv2d(3, 5, 1)).save(str(model))
    with pytest.raises(ValueError, match=r"logits \(1, C, h, w\) with C >= 19.*got \(1, 5, 32, 64\)"):
        main(["--network", str(model), "--root", str(root / "root"), "--output-dir", str(root / "p"), "--no-progress"])
