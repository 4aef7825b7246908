"""The review montage of one exported crop: image, readers, F, Gbar, entropy and the first samples."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from car_med.visualize import isolate_matplotlib_config

__all__ = ["review_montage_png"]


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
    panels += [(f"sample {m + 1}", samples[..., m], unit) for m in range(shown)]
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
