"""Files a long training writes for people to look at: loss tables and picture grids.

Shared by the models that train for many epochs (autoencoders, f-AnoGAN).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_csv(rows: list[dict[str, float]], path: Path) -> None:
    """Rows as CSV; the columns are the union of the rows' keys, in first-seen order."""
    with open(path, "w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tile(rows: list[np.ndarray], pad: int = 2) -> Image.Image:
    """Rows of (n, H, W, 3) uint8 images -> one picture with a white gap between tiles."""
    n, h, w, _ = rows[0].shape
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for i, im in enumerate(row):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            canvas[y:y + h, x:x + w] = im
    return Image.fromarray(canvas)
