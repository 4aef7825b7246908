"""Write a black-box prediction folder for the Cityscapes protocol from any 2D segmentation network.

Usage::

    python -m car_med.blackbox --network model.ts --root /data/cityscapes --output-dir PRED
    python -m car_med.blackbox --network BUNDLE_DIR [--net-id network_def] [--config-file configs/inference.json] \\
        [--weights models/model.pt] --datalist OUT/datalist.json --output-dir PRED

``--network`` is a TorchScript file (``torch.jit.load``) or a MONAI bundle folder: the network is
``ConfigParser(...).get_parsed_content(net_id)`` of the bundle's config (``configs/inference.json`` by default),
with the state dict of ``--weights`` (``models/model.pt`` by default, when it exists) loaded into it.

Input images: the official ``leftImg8bit`` images of a Cityscapes ``--root`` (train and val), or the images of a
``datalist.json`` written by ``preprocessing/cityscapes.py``. Each image is fed as ``(1, 3, H, W)`` floats in
[0, 1] (optionally normalised with ``--mean``/``--std``, optionally resized to ``--input-size``); the network's
logits ``(1, C, h, w)``, ``C >= 19``, are resized bilinearly to the image size and the argmax over the first 19
channels is written as ``PRED/<split>/<city>/<stem>_blackbox.png`` (uint8 trainIds 0..18, at the image's size),
the name ``preprocessing.cityscapes --blackbox-dir PRED`` reads. Existing predictions are kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from car_med.data.cityscapes_layout import CITYSCAPES_NUM_TRAIN_IDS, blackbox_relpath, png_bytes, read_png

__all__ = ["list_inputs", "load_network", "main", "predict_label", "write_predictions"]

logger = logging.getLogger("car_med.blackbox")


def load_network(
    network: str | os.PathLike,
    net_id: str = "network_def",
    config_file: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a TorchScript file or a MONAI bundle network, in eval mode on ``device``.

    Args:
        network: a TorchScript file, or a bundle folder.
        net_id: the config id of the network in the bundle config.
        config_file: the bundle config, relative to the bundle folder or absolute
            (default ``configs/inference.json``).
        weights: a state dict file for the bundle network (default ``models/model.pt`` when it exists).
        device: where to run.

    Raises:
        FileNotFoundError: the network, config or weights file does not exist.
    """
    path = Path(network)
    if path.is_file():
        with warnings.catch_warnings():  # torch 2.9+ marks TorchScript deprecated; it is what users have
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location=device)
    elif path.is_dir():
        from monai.bundle import ConfigParser

        config = Path(config_file) if config_file is not None else Path("configs/inference.json")
        config = config if config.is_absolute() else path / config
        if not config.is_file():
            raise FileNotFoundError(f"bundle {str(path)!r}: config {str(config)!r} does not exist (--config-file).")
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(path)
        model = parser.get_parsed_content(net_id)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"bundle {str(path)!r}: config id {net_id!r} is a {type(model).__name__}, not a network.")
        weight_path = Path(weights) if weights is not None else path / "models" / "model.pt"
        if weights is not None and not weight_path.is_file():
            raise FileNotFoundError(f"--weights {str(weight_path)!r} does not exist.")
        if weight_path.is_file():
            state = torch.load(weight_path, map_location="cpu", weights_only=True)
            # a MONAI CheckpointSaver file holds {"model": state_dict, ...}; a plain state dict is used as is
            model.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    else:
        raise FileNotFoundError(f"--network {str(path)!r} is neither a TorchScript file nor a bundle folder.")
    return model.to(device).eval()


def list_inputs(
    root: str | os.PathLike | None = None, datalist: str | os.PathLike | None = None
) -> list[tuple[str, str, str, str]]:
    """``(image path, official split, city, stem)`` of every input image, from a Cityscapes root or a datalist."""
    if (root is None) == (datalist is None):
        raise ValueError("give exactly one of --root and --datalist.")
    if root is not None:
        from car_med.data.cityscapes_layout import find_images

        images, _ = find_images(root)
        return [(s.image, s.official_split, s.city, s.stem) for s in images]
    from car_med.data.cityscapes import load_cityscapes_datalist

    out = []
    for split in ("training", "validation", "test"):
        try:
            items = load_cityscapes_datalist(datalist, split)
        except ValueError as err:
            if "has no split" in str(err):
                continue
            raise
        out += [(item["image"], item["official_split"], item["city"], item["stem"]) for item in items]
    return out


@torch.no_grad()
def predict_label(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predict trainIds ``(H, W)`` uint8 in 0..18 for one RGB uint8 image ``(H, W, 3)``.

    Raises:
        ValueError: the network's output is not ``(1, C, h, w)`` with ``C >= 19``.
    """
    h, w = image.shape[:2]
    x = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)[None].float().div(255.0).to(device)
    if mean is not None:
        x = x - torch.tensor(mean, dtype=x.dtype, device=device).view(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(std, dtype=x.dtype, device=device).view(1, -1, 1, 1)
    if input_size is not None:
        x = torch.nn.functional.interpolate(x, size=tuple(int(s) for s in input_size), mode="bilinear")
    logits = model(x)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[1] < CITYSCAPES_NUM_TRAIN_IDS:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the network must return logits (1, C, h, w) with C >= {CITYSCAPES_NUM_TRAIN_IDS} (trainIds first), "
            f"got {shape}."
        )
    logits = logits[:, :CITYSCAPES_NUM_TRAIN_IDS].float()
    if logits.shape[-2:] != (h, w):
        logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear")
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def write_predictions(
    model: torch.nn.Module,
    inputs: Sequence[tuple[str, str, str, str]],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **predict_kwargs,
) -> dict[str, int]:
    """Write ``output_dir/<split>/<city>/<stem>_blackbox.png`` for every input; returns ``{"written", "kept"}``."""
    from tqdm.auto import tqdm

    from car_med.files import atomic_write_bytes

    counts = {"written": 0, "kept": 0}
    for path, split, city, stem in tqdm(inputs, desc="black box", unit="image", disable=not progress, file=sys.stderr):
        target = Path(output_dir) / blackbox_relpath(split, city, stem)
        if target.is_file() and not overwrite:
            counts["kept"] += 1
            continue
        image, mode = read_png(path)
        if image.ndim != 3 or image.shape[2] < 3:
            raise ValueError(f"image {path!r}: expected an RGB PNG, got mode {mode} with shape {image.shape}.")
        atomic_write_bytes(target, png_bytes(predict_label(model, image, **predict_kwargs)))
        counts["written"] += 1
    return counts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m car_med.blackbox",
        description="Write a Cityscapes black-box prediction folder (<split>/<city>/<stem>_blackbox.png).",
    )
    parser.add_argument("--network", required=True, help="a TorchScript file or a MONAI bundle folder")
    parser.add_argument("--net-id", default="network_def", help="bundle config id of the network (network_def)")
    parser.add_argument("--config-file", default=None, help="bundle config (default configs/inference.json)")
    parser.add_argument("--weights", default=None, help="bundle state dict (default models/model.pt if present)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", default=None, help="a Cityscapes root (leftImg8bit/{train,val})")
    source.add_argument("--datalist", default=None, help="a datalist.json of preprocessing.cityscapes")
    parser.add_argument("--output-dir", required=True, help="the prediction folder to write")
    parser.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize input")
    parser.add_argument("--mean", type=float, nargs=3, default=None, help="per-channel mean (on [0, 1] values)")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="per-channel std (on [0, 1] values)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing predictions")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = load_network(args.network, args.net_id, args.config_file, args.weights, args.device)
    inputs = list_inputs(args.root, args.datalist)
    counts = write_predictions(
        model,
        inputs,
        args.output_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        input_size=args.input_size,
        mean=args.mean,
        std=args.std,
        device=args.device,
    )
    logger.info("%d predictions written, %d kept, in %s", counts["written"], counts["kept"], args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
