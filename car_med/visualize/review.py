"""The review montage of one exported crop: image, readers, F, Gbar, entropy and the first samples."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from car_med.visualize import isolate_matplotlib_config

__all__ = ["plot_ct_overlay", "review_montage_png", "sample_strip_png"]


def review_montage_png(
    image: np.ndarray,
    annotations: np.ndarray | None,
    calibration: np.ndarray,
    mean: np.ndarray,
    entropy: np.ndarray,
    samples: np.ndarray,
    title: str = "",
    num_samples_shown: int = 6,
    hu_window: Sequence[float] = (-1024.0, 400.0),
) -> bytes:
    """One row of panels as PNG bytes, every panel on the model grid and shown as a radiologist sees an axial
    slice (rows down, columns right).

    Args:
        image: HU ``(I, J)`` (column, row), as in the NIfTI files.
        annotations: reader masks ``(I, J, R)`` or ``None`` (no labels).
        calibration: F's foreground probability ``(I, J)``.
        mean: Gbar's foreground probability ``(I, J)``.
        entropy: H(F(x)) in nats ``(I, J)``; shown on [0, ln 2], the binary maximum.
        samples: ``(I, J, M)`` 0/1 samples; the first ``num_samples_shown`` are drawn.
        title: text above the row (case id, score).
        num_samples_shown: sample panels.
        hu_window: grey window of the image panels.

    Returns:
        The PNG file's bytes (matplotlib Agg; no timestamp, so equal inputs give equal bytes).
    """
    isolate_matplotlib_config()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = min(num_samples_shown, samples.shape[-1])
    readers = 0 if annotations is None else annotations.shape[-1]
    panels: list[tuple[str, np.ndarray, dict]] = [
        ("CT", image, {"cmap": "gray", "vmin": hu_window[0], "vmax": hu_window[1]})
    ]
    unit = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for r in range(readers):
        panels.append((f"reader {r + 1}", annotations[..., r], unit))
    panels += [
        ("F(x)", calibration, unit),
        ("G mean", mean, unit),
        ("entropy", entropy, {"cmap": "magma", "vmin": 0.0, "vmax": float(np.log(2.0))}),
    ]
    # samples are numbered from 0, as in the export's file names (strip_m00.png, volume 0 of samples.nii.gz)
    panels += [(f"sample {m}", samples[..., m], unit) for m in range(shown)]
    fig = Figure(figsize=(1.25 * len(panels), 1.55), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, panel, style) in zip(axes, panels):
        ax.imshow(np.asarray(panel, dtype=np.float32).T, interpolation="nearest", **style)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=7, y=0.99)
    fig.tight_layout(pad=0.25, rect=(0, 0, 1, 0.93 if title else 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def plot_ct_overlay(
    ct_file: str,
    samples_file: str,
    mean_file: str,
    path: str,
    hu_window: Sequence[float] = (-1024.0, 400.0),
    margin_mm: float = 25.0,
) -> str:
    """Render exported full-volume files as a viewer would show them: the CT slice with the most sample
    pixels, every sample's outline on it, and the mean (Gbar) as a heat overlay, zoomed on the nodule.

    Args:
        ct_file: ``ct.nii.gz`` of the series.
        samples_file: the nodule's ``samples_ct.nii.gz``.
        mean_file: the nodule's ``mean_ct.nii.gz``.
        path: PNG to write.
        hu_window: grey window.
        margin_mm: how far around the samples' union to show.

    Returns:
        ``path``.
    """
    import nibabel as nib

    isolate_matplotlib_config()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ct = nib.load(ct_file)
    samples = np.asarray(nib.load(samples_file).dataobj)
    mean = np.asarray(nib.load(mean_file).dataobj, dtype=np.float32)
    k = int(samples.sum(axis=(0, 1, 3)).argmax())
    union = samples[:, :, k].any(axis=-1)
    if not union.any():
        union = mean[:, :, k] > 0.05
    ii, jj = np.nonzero(union) if union.any() else (np.array([ct.shape[0] // 2]), np.array([ct.shape[1] // 2]))
    spacing = np.linalg.norm(ct.affine[:3, :2], axis=0)
    pad = (margin_mm / spacing).astype(int)
    i0, i1 = max(ii.min() - pad[0], 0), min(ii.max() + pad[0] + 1, ct.shape[0])
    j0, j1 = max(jj.min() - pad[1], 0), min(jj.max() + pad[1] + 1, ct.shape[1])
    image = np.asarray(ct.dataobj[i0:i1, j0:j1, k], dtype=np.float32).T
    fig = Figure(figsize=(7.5, 2.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    extent = None
    for ax in axes:
        ax.imshow(image, cmap="gray", vmin=hu_window[0], vmax=hu_window[1], extent=extent, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title(f"CT slice {k}", fontsize=8)
    colours = [f"C{m % 10}" for m in range(samples.shape[-1])]
    for m in range(samples.shape[-1]):
        plane = samples[i0:i1, j0:j1, k, m].T.astype(np.float32)
        if plane.any():
            axes[1].contour(plane, levels=[0.5], colors=[colours[m]], linewidths=0.8)
    axes[1].set_title(f"{samples.shape[-1]} sample outlines", fontsize=8)
    heat = np.ma.masked_less(mean[i0:i1, j0:j1, k].T, 0.02)
    shown = axes[2].imshow(heat, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.75, interpolation="nearest")
    axes[2].set_title("mean of the samples (Gbar)", fontsize=8)
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, metadata={"Software": None})
    return path


def sample_strip_png(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    labels: Sequence[str],
    title: str = "",
    hu_window: Sequence[float] = (-1024.0, 400.0),
) -> bytes:
    """One sample of a nodule across its slices: each slice's CT with the sample's outline, left to right in z.

    Args:
        images: HU ``(I, J)`` per slice, in z order.
        masks: the sample's 0/1 map ``(I, J)`` per slice, on the same grid as its image.
        labels: a caption per slice (its z).
        title: text at the left of the strip (the sample's number).
        hu_window: grey window.

    Returns:
        The PNG file's bytes (no timestamp: equal inputs give equal bytes).
    """
    isolate_matplotlib_config()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.1 * len(images) + 0.4, 1.3), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    for ax, image, mask, label in zip(axes, images, masks, labels):
        ax.imshow(np.asarray(image, dtype=np.float32).T, cmap="gray", vmin=hu_window[0], vmax=hu_window[1])
        if np.asarray(mask).any():
            ax.contour(np.asarray(mask, dtype=np.float32).T, levels=[0.5], colors=["#ff3b30"], linewidths=0.8)
        ax.set_title(label, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.text(0.005, 0.5, title, rotation=90, va="center", fontsize=7)
    fig.tight_layout(pad=0.2, rect=(0.03 if title else 0, 0, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
