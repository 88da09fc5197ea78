"""Built-in synthetic data: an MVTec-layout dataset with exact defect masks.

Two categories, deterministic for a seed:

- ``synthetic_texture`` (grayscale): a woven surface whose thread period, angle, phase,
  grain and lighting vary from image to image, like fabric or carpet.
  Defects: ``scratch`` (bright thin line), ``hole`` (dark ellipse), ``stain`` (dark blob),
  ``crack`` (dark jagged line).
- ``synthetic_object`` (RGB): a centred bronze nut-like part on a dark background with small
  random rotation, shift and brightness changes.
  Defects: ``scratch``, ``missing_piece`` (a bite out of the rim), ``stain`` (blue-green
  contamination), ``crack``.

Every mask is the exact set of pixels the defect changed. The data exist so that tests and
the demo run anywhere, with defects meant to be visible: a method that cannot find them is
broken, one that can is not thereby proven on real data.

High resolution: any size from 32 px (``flawscope synth --size 2048``). By default defects
scale with the image; ``SynthSpec(defect_px=8)`` (``--defect-px 8``) makes every defect fit
in an 8 x 8 pixel box instead, so that on a 1024-px image they are plain at native size and
under 2 px once the image is squashed to 256. Images are drawn independently from their
own random keys, so ``workers`` processes write the same files as one.

Example::

    from flawscope.synth import SynthSpec, generate
    generate("data", SynthSpec(size=1024, defect_px=8, n_train=20), workers=2)
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, zoom

from .errors import FlawscopeError

MARKER = ".flawscope-synth"
TEXTURE_DEFECTS = ("scratch", "hole", "stain", "crack")
OBJECT_DEFECTS = ("scratch", "missing_piece", "stain", "crack")
CATEGORIES = ("synthetic_texture", "synthetic_object")
# Sizes up to this are generated exactly as before high-resolution support (same pixels);
# above it, smooth noise is drawn at this resolution and PNGs use fast compression.
EXACT_NOISE_MAX = 512


@dataclass(frozen=True)
class SynthSpec:
    """What :func:`generate` writes.

    ``defect_px``: 0 (default) makes defects that scale with the image (scratches a third
    of it long); n >= 3 makes every defect fit in an n x n pixel box, e.g. 8 on 1024-px
    images: defects a few pixels wide, under 2 px once the image is squashed to 256.
    """

    size: int = 128
    n_train: int = 60
    n_test_good: int = 12
    n_test_per_defect: int = 6
    seed: int = 0
    defect_px: int = 0


# ---------------------------------------------------------------------------- surfaces
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Column (1, size) and row (size, 1) coordinates; they broadcast like a meshgrid, with
    the same value in every pixel, at a fraction of the memory."""
    coords = np.arange(size, dtype=np.float64)
    return coords[None, :], coords[:, None]


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, (size, size).

    Filtering costs size**2 * sigma and sigma grows with the size (2.4 s at 1024 px on a
    busy 2-core AMD EPYC, so minutes at 4096), so above ``EXACT_NOISE_MAX`` pixels the
    field is drawn at that resolution and bilinearly enlarged: the same smoothness
    relative to the image, in 6.6 s at 4096 px on the same machine, mostly the
    enlarging. Sizes up to it are unchanged.
    """
    if size <= EXACT_NOISE_MAX:
        return gaussian_filter(rng.normal(0, 1, (size, size)), sigma)
    small = gaussian_filter(rng.normal(0, 1, (EXACT_NOISE_MAX, EXACT_NOISE_MAX)),
                            sigma * EXACT_NOISE_MAX / size)
    return zoom(small, size / EXACT_NOISE_MAX, order=1, grid_mode=True, mode="grid-mirror")


def texture_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A woven surface in [0, 1], (size, size)."""
    x, y = _grid(size)
    period = size / 10 * rng.uniform(0.95, 1.05)
    angle = np.deg2rad(rng.uniform(-3, 3))
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 1)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period + rng.uniform(0, 1)
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    warp = 0.50 + 0.22 * np.sin(np.pi * (v % 1.0))
    weft = 0.42 + 0.22 * np.sin(np.pi * (u % 1.0))
    img = np.where(over, warp, weft)
    img += gaussian_filter(rng.normal(0, 0.05, (size, size)), 0.8)
    img *= rng.uniform(0.95, 1.05)
    return np.clip(img, 0, 1)


def _part_mask(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Where the object is, plus its pose (used to draw details in the same pose)."""
    x, y = _grid(size)
    c = size / 2 + rng.uniform(-0.015, 0.015, 2) * size
    rot = np.deg2rad(rng.uniform(-4, 4))
    dx, dy = x - c[0], y - c[1]
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx) - rot
    outer = 0.32 * size * (1 + 0.06 * np.cos(6 * theta))  # six soft lobes
    part = (r <= outer) & (r >= 0.11 * size)
    return part, {"r": r, "theta": theta, "outer": outer}


def object_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A part on a background: RGB image in [0, 1] (size, size, 3) and the part's mask."""
    part, pose = _part_mask(size, rng)
    r, theta = pose["r"], pose["theta"]
    background = 0.08 + gaussian_filter(rng.normal(0, 0.02, (size, size)), 1.0)
    shade = 0.55 + 0.25 * np.cos(theta - 0.8) * (r / (0.35 * size))
    shade += 0.08 * np.cos(18 * theta)  # machining marks
    shade *= rng.uniform(0.92, 1.08)
    tint = np.array([0.95, 0.75, 0.45])
    img = np.where(part[..., None], shade[..., None] * tint, background[..., None])
    img += rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1), part


# ---------------------------------------------------------------------------- defects
def _line_mask(size: int, points: list[tuple[float, float]], width: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    return np.asarray(canvas) > 0


def _scratch(rng, size, region):
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    length = rng.uniform(0.2, 0.4) * size
    angle = rng.uniform(0, np.pi)
    p0 = (xs[i] - np.cos(angle) * length / 2, ys[i] - np.sin(angle) * length / 2)
    p1 = (xs[i] + np.cos(angle) * length / 2, ys[i] + np.sin(angle) * length / 2)
    return _line_mask(size, [p0, p1], max(1, round(size / 100))), 0.97


def _crack(rng, size, region):
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    point = np.array([xs[i], ys[i]], dtype=float)
    heading = rng.uniform(0, 2 * np.pi)
    points = [tuple(point)]
    for _ in range(rng.integers(5, 9)):
        heading += rng.uniform(-0.7, 0.7)
        point = point + size * 0.04 * np.array([np.cos(heading), np.sin(heading)])
        points.append(tuple(point))
    return _line_mask(size, points, max(1, round(size / 90))), 0.02


def _blob(rng, size, region, radius_range):
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    x, y = _grid(size)
    radius = rng.uniform(*radius_range) * size
    noise = _smooth_noise(rng, size, size / 40)
    noise /= np.abs(noise).max() + 1e-9
    dist = np.hypot(x - xs[i], y - ys[i]) / radius
    return dist + 0.35 * noise < 1.0


def _ellipse(rng, size, region):
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    x, y = _grid(size)
    a, b = rng.uniform(0.04, 0.08, 2) * size
    return ((x - xs[i]) / a) ** 2 + ((y - ys[i]) / b) ** 2 <= 1.0


# Small defects: each fits in an n x n pixel box (n = SynthSpec.defect_px).
def _small_shape(rng, n: int, shape: str) -> np.ndarray:
    """An (n, n) mask: ``line`` (straight), ``jagged`` (a crack), ``ellipse`` or ``blob``."""
    centre = (n - 1) / 2
    if shape in ("line", "jagged"):
        canvas = Image.new("L", (n, n), 0)
        heading = rng.uniform(0, 2 * np.pi)
        if shape == "line":
            half = rng.uniform(0.35, 0.5) * (n - 1)
            step = half * np.array([np.cos(heading), np.sin(heading)])
            points = [tuple(centre - step), tuple(centre + step)]
        else:  # a random walk across the box from near one side; PIL clips it to the box
            point = centre - 0.35 * (n - 1) * np.array([np.cos(heading), np.sin(heading)])
            points = [tuple(point)]
            for _ in range(rng.integers(3, 6)):
                heading += rng.uniform(-0.9, 0.9)
                point = point + n / 4 * np.array([np.cos(heading), np.sin(heading)])
                points.append(tuple(point))
        ImageDraw.Draw(canvas).line(points, fill=255, width=1)
        return np.asarray(canvas) > 0
    x, y = _grid(n)
    if shape == "ellipse":
        a, b = rng.uniform(0.3, 0.5, 2) * n
        return ((x - centre) / a) ** 2 + ((y - centre) / b) ** 2 <= 1.0
    if shape == "blob":  # a disc with a ragged edge; the centre pixel is always inside
        noise = gaussian_filter(rng.normal(0, 1, (n, n)), n / 8)
        noise /= np.abs(noise).max() + 1e-9
        radius = rng.uniform(0.3, 0.5) * n
        return np.hypot(x - centre, y - centre) / radius + 0.35 * noise < 1.0
    raise ValueError(shape)


def _small_defect(rng, size: int, region: np.ndarray, n: int, shape: str) -> np.ndarray:
    """A full-size mask holding one small shape centred on a random pixel of ``region``."""
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    local = _small_shape(rng, n, shape)
    top, left = ys[i] - (n - 1) // 2, xs[i] - (n - 1) // 2
    mask = np.zeros((size, size), dtype=bool)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + n, size), min(left + n, size)
    mask[y0:y1, x0:x1] = local[y0 - top:y1 - top, x0 - left:x1 - left]
    return mask


_TEXTURE_SHAPES = {"scratch": "line", "crack": "jagged", "hole": "ellipse", "stain": "blob"}
_OBJECT_SHAPES = {"scratch": "line", "crack": "jagged", "stain": "blob",
                  "missing_piece": "blob"}


def add_texture_defect(rng, img, kind, defect_px: int = 0):
    """Paint a defect onto a grayscale texture; returns (image, exact mask).

    ``defect_px`` 0: the defect scales with the image; n: it fits in an n x n pixel box.
    """
    size = img.shape[0]
    everywhere = np.zeros_like(img, dtype=bool)
    everywhere[size // 8: -size // 8, size // 8: -size // 8] = True
    if defect_px and kind in _TEXTURE_SHAPES:
        mask = _small_defect(rng, size, everywhere, defect_px, _TEXTURE_SHAPES[kind])
        if kind == "hole":
            value = 0.03 + rng.uniform(0, 0.03)
        else:
            value = {"scratch": 0.97, "crack": 0.02, "stain": img * 0.35}[kind]
        return np.where(mask, value, img), mask
    if kind == "scratch":
        mask, value = _scratch(rng, size, everywhere)
        img = np.where(mask, value, img)
    elif kind == "crack":
        mask, value = _crack(rng, size, everywhere)
        img = np.where(mask, value, img)
    elif kind == "hole":
        mask = _ellipse(rng, size, everywhere)
        img = np.where(mask, 0.03 + rng.uniform(0, 0.03), img)
    elif kind == "stain":
        mask = _blob(rng, size, everywhere, (0.06, 0.11))
        img = np.where(mask, img * 0.35, img)
    else:
        raise ValueError(kind)
    return img, mask


def add_object_defect(rng, img, part, kind, defect_px: int = 0):
    """Paint a defect onto the part of an RGB object image; returns (image, exact mask).

    ``defect_px`` 0: the defect scales with the image; n: it fits in an n x n pixel box.
    """
    size = img.shape[0]
    # Margins in pixels at 64 px and above; narrower below, or at 32 px the ring has no
    # interior left to draw a scratch on.
    margin = min(1.0, size / 64)
    inner = part & (gaussian_filter(part.astype(float), 2 * margin) > 0.99)
    if defect_px and kind in _OBJECT_SHAPES:
        if kind == "missing_piece":  # a bite out of the rim
            rim = part & ~(gaussian_filter(part.astype(float), 3 * margin) > 0.99)
            mask = _small_defect(rng, size, rim, defect_px, "blob") & part
        else:
            mask = _small_defect(rng, size, inner, defect_px, _OBJECT_SHAPES[kind]) & part
        paint = {"scratch": 0.97, "crack": 0.02, "missing_piece": 0.08,
                 "stain": 0.5 * img + 0.5 * np.array([0.1, 0.6, 0.55])}
        return np.clip(np.where(mask[..., None], paint[kind], img), 0, 1), mask
    if kind == "scratch":
        line, value = _scratch(rng, size, inner)
        mask = line & part
        img = np.where(mask[..., None], value, img)
    elif kind == "crack":
        line, value = _crack(rng, size, inner)
        mask = line & part
        img = np.where(mask[..., None], value, img)
    elif kind == "stain":
        mask = _blob(rng, size, inner, (0.05, 0.09)) & part
        img = np.where(mask[..., None], 0.5 * img + 0.5 * np.array([0.1, 0.6, 0.55]), img)
    elif kind == "missing_piece":
        rim = part & ~(gaussian_filter(part.astype(float), 3 * margin) > 0.99)
        mask = _blob(rng, size, rim, (0.07, 0.11)) & part
        img = np.where(mask[..., None], 0.08, img)
    else:
        raise ValueError(kind)
    return np.clip(img, 0, 1), mask


# ---------------------------------------------------------------------------- writing
def _png_options(size: int) -> dict:
    # zlib level 1 above 512 px: a 1024-px RGB image saves in 0.4 s instead of 1.4 s, for
    # a file 16% larger (measured); smaller sizes keep PIL's default, byte for byte.
    return {"compress_level": 1} if size > EXACT_NOISE_MAX else {}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array * 255).astype(np.uint8)).save(
        path, **_png_options(array.shape[0]))


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, **_png_options(mask.shape[0]))


def _render(name: str, spec: SynthSpec, key: list[int], kind: str | None,
            image_path: Path, mask_path: Path | None) -> None:
    """Draw and save one image (and its mask): a good one where ``kind`` is None.

    Everything random comes from ``key`` alone, so images can be drawn in any order or in
    parallel with the same result.
    """
    r = np.random.default_rng(key)
    if name == "synthetic_texture":
        img = texture_image(r, spec.size)
        if kind is not None:
            img, mask = add_texture_defect(r, img, kind, spec.defect_px)
    else:
        img, part = object_image(r, spec.size)
        if kind is not None:
            img, mask = add_object_defect(r, img, part, kind, spec.defect_px)
    _save(img, image_path)
    if mask_path is not None:
        _save_mask(mask, mask_path)


def _write_category(out: Path, name: str, spec: SynthSpec, defects: tuple[str, ...],
                    index: int, workers: int) -> None:
    folder = out / name
    if folder.exists():
        if not (folder / MARKER).exists():
            raise FlawscopeError(f"{folder}: exists and was not written by flawscope synth; "
                                 "choose another output folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    small = f" defect_px={spec.defect_px}" if spec.defect_px else ""
    (folder / MARKER).write_text(f"seed={spec.seed} size={spec.size}{small}\n")

    jobs = []  # (random key, defect kind or None, image path, mask path or None)
    for i in range(spec.n_train):
        jobs.append(([spec.seed, index, 0, i], None,
                     folder / "train" / "good" / f"{i:03d}.png", None))
    for i in range(spec.n_test_good):
        jobs.append(([spec.seed, index, 1, i], None,
                     folder / "test" / "good" / f"{i:03d}.png", None))
    for d, kind in enumerate(defects):
        for i in range(spec.n_test_per_defect):
            jobs.append(([spec.seed, index, 2 + d, i], kind,
                         folder / "test" / kind / f"{i:03d}.png",
                         folder / "ground_truth" / kind / f"{i:03d}_mask.png"))
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            _render(name, spec, *job)
        return
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        for done in [pool.submit(_render, name, spec, *job) for job in jobs]:
            done.result()  # re-raises a worker's error


def generate(out: str | Path, spec: SynthSpec = SynthSpec(),
             categories: tuple[str, ...] = CATEGORIES, workers: int = 1) -> list[Path]:
    """Write the synthetic dataset under ``out``; returns the category folders.

    ``workers`` > 1 draws images in that many processes (0: one per CPU core); the files
    are the same.
    """
    workers = workers or os.cpu_count() or 1
    out = Path(out)
    size = spec.size
    if size < 32:
        raise FlawscopeError(f"--size {size}: synthetic images need at least 32 pixels")
    if spec.defect_px and not 3 <= spec.defect_px <= size // 4:
        raise FlawscopeError(f"--defect-px {spec.defect_px}: small defects need 3 to "
                             f"{size // 4} pixels at --size {size} (0 = scale with the image)")
    defects = {"synthetic_texture": TEXTURE_DEFECTS, "synthetic_object": OBJECT_DEFECTS}
    written = []
    for name in categories:
        if name not in defects:
            raise FlawscopeError(f"unknown synthetic category {name!r}; "
                                 f"choose from {', '.join(CATEGORIES)}")
        _write_category(out, name, spec, defects[name], CATEGORIES.index(name), workers)
        written.append(out / name)
    return written
