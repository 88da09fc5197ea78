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


def annotate(overlay: Image.Image, vrange: tuple[float, float], text: str) -> Image.Image:
    """The overlay with a strip below it: the colour scale (jet, low to high map value) with
    its end values, and ``text`` (e.g. the score and the decision)."""
    from PIL import ImageDraw, ImageFont

    width = max(overlay.width, 240)
    font = ImageFont.load_default()
    line = 14
    strip = Image.new("RGB", (width, 3 * line + 8), (255, 255, 255))
    ramp = colormaps["jet"](np.linspace(0, 1, width))[:, :3]
    bar = np.broadcast_to(ramp[None], (line, width, 3))
    strip.paste(Image.fromarray(np.round(bar * 255).astype(np.uint8)), (0, 2))
    draw = ImageDraw.Draw(strip)
    lo, hi = vrange
    draw.text((2, line + 2), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    high = f"{hi:.3g}"
    draw.text((width - 2 - draw.textlength(high, font=font), line + 2), high, fill=(0, 0, 0),
              font=font)
    draw.text((2, 2 * line + 4), text, fill=(0, 0, 0), font=font)
    out = Image.new("RGB", (width, overlay.height + strip.height), (255, 255, 255))
    out.paste(overlay, (0, 0))
    out.paste(strip, (0, overlay.height))
    return out
