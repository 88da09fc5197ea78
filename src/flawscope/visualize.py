"""Pictures users show to colleagues: heat-map overlays with the ground-truth outline."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on inspection PCs and CI

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402


def display_range(amap: np.ndarray, calibration: dict | None) -> tuple[float, float]:
    """Colour scale of a heat map.

    With held-out calibration the scale is fixed for the model (median normal pixel = cold,
    twice the hottest held-out normal pixel = hot), so a good image looks cool and maps are
    comparable between images. Without it, the map's own range is used.
    """
    if calibration and calibration.get("map_max") is not None:
        lo = float(calibration["map_p50"])
        hi = max(float(calibration["map_max"]) * 2.0, lo + 1e-6)
        return lo, hi
    lo, hi = float(amap.min()), float(amap.max())
    return lo, max(hi, lo + 1e-6)


def heatmap_overlay(image: Image.Image, amap: np.ndarray, vrange: tuple[float, float],
                    mask: np.ndarray | None = None, alpha: float = 0.5) -> Image.Image:
    """The image with the anomaly map blended on top (jet colours), GT outline in green."""
    image = image.convert("RGB")
    if amap.shape != (image.height, image.width):
        amap = np.asarray(Image.fromarray(amap.astype(np.float32)).resize(image.size,
                                                                          Image.BILINEAR))
    lo, hi = vrange
    norm = np.clip((amap - lo) / (hi - lo), 0, 1)
    heat = colormaps["jet"](norm)[..., :3]
    base = np.asarray(image, dtype=np.float32) / 255.0
    out = (1 - alpha) * base + alpha * heat
    if mask is not None:
        if mask.shape != amap.shape:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                image.size, Image.NEAREST)) > 0
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, image.width // 256))
        out[edge] = (0.0, 1.0, 0.0)
    return Image.fromarray(np.round(out * 255).astype(np.uint8))
