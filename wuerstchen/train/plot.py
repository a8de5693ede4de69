"""A loss curve as a picture (the loss-plot node's image; no plotting library needed)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def loss_plot(losses: Sequence[float], width: int = 512, height: int = 256, smooth: int = 0) -> np.ndarray:
    """The losses per step as a line on white, with a moving average of ``smooth`` steps (default
    about a twentieth of the run) in a darker line; float32 [height, width, 3] in [0, 1]."""
    from PIL import Image, ImageDraw

    values = np.asarray([float(v) for v in losses if np.isfinite(v)], dtype=np.float64)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 48, 12, width - 8, height - 20
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if values.size:
        low, high = float(values.min()), float(values.max())
        span = high - low or 1.0

        def points(series):
            n = max(len(series) - 1, 1)
            return [(left + (right - left) * i / n, bottom - (bottom - top) * (v - low) / span)
                    for i, v in enumerate(series)]

        if values.size > 1:
            draw.line(points(values), fill=(150, 180, 230), width=1)
        k = smooth or max(1, values.size // 20)
        if values.size >= k > 1:
            avg = np.convolve(values, np.ones(k) / k, mode="valid")
            n = max(values.size - 1, 1)
            pts = [(left + (right - left) * (i + (k - 1) / 2) / n, bottom - (bottom - top) * (v - low) / span)
                   for i, v in enumerate(avg)]
            draw.line(pts, fill=(20, 60, 160), width=2)
        draw.text((4, top), f"{high:.4g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{low:.4g}", fill=(0, 0, 0))
        draw.text((left, bottom + 4), f"step 1 .. {values.size}   last {values[-1]:.4g}", fill=(0, 0, 0))
    else:
        draw.text((left + 8, top + 8), "no loss recorded", fill=(0, 0, 0))
    return np.asarray(img, dtype=np.float32) / 255.0
