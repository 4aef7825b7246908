"""Render docs/figures/cityscapes_synthetic_example.png from real output files of the two CLIs.

Run from the repo root: python docs/figures/cityscapes_synthetic_example.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from car_med.data.cityscapes import cityscapes_transforms, load_cityscapes_datalist

base = Path(tempfile.mkdtemp())
subprocess.run(
    [
        sys.executable,
        "-m",
        "preprocessing.synthetic_cityscapes",
        "--output-dir",
        str(base / "root"),
        "--blackbox-dir",
        str(base / "pred"),
        "--images-per-city",
        "1",
        "--seed",
        "0",
    ],
    check=True,
)
subprocess.run(
    [
        sys.executable,
        "-m",
        "preprocessing.cityscapes",
        "--root",
        str(base / "root"),
        "--output-dir",
        str(base / "out"),
        "--blackbox-dir",
        str(base / "pred"),
        "--no-progress",
    ],
    check=True,
)
item = load_cityscapes_datalist(base / "out" / "datalist.json", "training")[0]
ev = cityscapes_transforms("eval")(item)
tr = cityscapes_transforms("train")
tr.set_random_state(4)
for _ in range(50):
    out = tr(item)
    if out["label_flips"].sum() >= 2:
        break
rng = np.random.default_rng(0)
palette = np.array(
    [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
        [255, 160, 255],
        [255, 140, 0],
        [0, 220, 255],
        [200, 255, 60],
        [255, 240, 120],
        [0, 0, 0],
    ],
    dtype=np.uint8,
)
names = ["sidewalk->sidewalk2", "person->person2", "car->car2", "vegetation->vegetation2", "road->road2"]
flipped = [n for n, f in zip(names, out["label_flips"].tolist()) if f]
panels = [
    (ev["image"].permute(1, 2, 0).numpy(), f"image ({item['stem']})"),
    (palette[ev["label"][0].numpy()], "label: trainIds, ignore 24 black"),
    (palette[ev["blackbox"].argmax(0).numpy()], "black box (noisy prediction)"),
    (palette[out["label"][0].numpy()], "flipped label: " + ", ".join(flipped)),
]
fig, axes = plt.subplots(2, 2, figsize=(10, 5.6))
for ax, (img, title) in zip(axes.ravel(), panels):
    ax.imshow(img)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()
fig.savefig("docs/figures/cityscapes_synthetic_example.png", dpi=80)
print(flipped, json.loads((base / "out" / "summary.json").read_text())["counts"]["images_per_split"])
