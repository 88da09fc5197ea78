"""Pictures for the report, chosen and drawn when a category is tested.

``flawscope report`` must rebuild a report from saved results without loading or re-running
any model, but galleries need anomaly maps and reconstructions, which only exist while the
model is loaded. So ``flawscope test`` calls :func:`save_report_assets` right after scoring:
it picks the few test images a quality engineer wants to look at and writes them as small
JPEGs plus an index (``assets.json``) into ``<results>/report_assets/``.

What is chosen, per (model, category):

- ``false_alarms``: the highest-scoring good images (what the model finds suspicious in good
  parts);
- ``misses``: the lowest-scoring defective images (what it would let through);
- ``examples``: one defective image per defect type, the one with the median score of its
  type, so the example is typical rather than the easiest;
- ``reconstructions`` (models whose ``reconstruct()`` returns images): original,
  reconstruction and residual of two good images and of the per-type examples;
- ``samples`` (models with a ``sample(n)`` method, e.g. f-AnoGAN's generator, or whose
  training folder holds ``*sample*.png`` pictures): a grid of generated images;
- ``training``: loss curves (``*loss*.png``) the model's training drew in its workdir.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import __version__
from .data import image_to_tensor, read_image
from .pipeline import Evaluation
from .visualize import display_range, heatmap_overlay

log = logging.getLogger(__name__)

ASSETS_DIR = "report_assets"
#: How many false-alarm candidates and misses each gallery shows.
GALLERY_SIZE = 4
#: Longest side of gallery pictures; small enough that a report with many pairs stays light.
THUMB = 224
N_SAMPLES = 16


def select_gallery(scores: np.ndarray, labels: np.ndarray, defect_types: list[str],
                   k: int = GALLERY_SIZE) -> dict[str, list[int]]:
    """Indices of the test images each gallery section shows (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    # Stable sorts so ties keep file order and the choice is reproducible.
    false_alarms = good[np.argsort(-scores[good], kind="stable")][:k]
    misses = bad[np.argsort(scores[bad], kind="stable")][:k]
    examples = []
    for kind in sorted({t for t, lab in zip(defect_types, labels, strict=True) if lab == 1}):
        of_kind = np.array([i for i in bad if defect_types[i] == kind])
        ordered = of_kind[np.argsort(scores[of_kind], kind="stable")]
        examples.append(int(ordered[(len(ordered) - 1) // 2]))
    return {"false_alarms": [int(i) for i in false_alarms],
            "misses": [int(i) for i in misses], "examples": examples}


def machine_info() -> dict[str, Any]:
    """Versions and hardware, recorded when results are made (the report may be built
    elsewhere later)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"flawscope": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": installed("torchvision"),
            "numpy": np.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _thumb(image: Image.Image) -> Image.Image:
    if max(image.size) <= THUMB:
        return image
    scale = THUMB / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.BILINEAR)


def _aspect_kept(image: Image.Image, side: int) -> Image.Image:
    """The image with its longer side at ``side`` pixels and its own shape (the maps, stored
    square, are stretched back onto it by :func:`heatmap_overlay`)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if image.size == size else image.resize(size, Image.BILINEAR)


def _outline_only(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with only the ground-truth outline drawn (no heat map)."""
    zero = np.zeros(mask.shape, dtype=np.float32)
    return heatmap_overlay(image, zero, (0.0, 1.0), mask=mask, alpha=0.0)


def _save(image: Image.Image, folder: Path, name: str) -> str:
    """JPEG at high quality without chroma subsampling (keeps the 1-pixel green outline
    sharp): a third the size of PNG, which matters in a report embedding every picture."""
    name = f"{name}.jpg"
    image.convert("RGB").save(folder / name, quality=90, subsampling=0)
    return name


def _gallery_entries(evaluation: Evaluation, indices: dict[str, list[int]],
                     vrange: tuple[float, float], folder: Path) -> dict[str, list[dict]]:
    """Draw image-with-outline and heat-map overlay for every chosen test image."""
    size = evaluation.maps.shape[-1]
    drawn: dict[int, dict] = {}
    sections: dict[str, list[dict]] = {}
    for section, chosen in indices.items():
        sections[section] = []
        for i in chosen:
            if i not in drawn:
                image = _aspect_kept(read_image(evaluation.paths[i]), size)
                mask = evaluation.masks[i]
                drawn[i] = {
                    "index": i, "file": evaluation.paths[i].name,
                    "defect_type": evaluation.defect_types[i],
                    "label": int(evaluation.labels[i]),
                    "score": float(evaluation.scores[i]),
                    "rank": int((evaluation.scores > evaluation.scores[i]).sum()) + 1,
                    "image": _save(_thumb(_outline_only(image, mask)), folder, f"img_{i}"),
                    "overlay": _save(_thumb(heatmap_overlay(image, evaluation.maps[i], vrange,
                                                            mask=mask)),
                                     folder, f"overlay_{i}"),
                }
            sections[section].append(drawn[i])
    return sections


def _to_image(t: torch.Tensor) -> Image.Image:
    arr = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def _residual_image(residual: np.ndarray, vmax: float) -> Image.Image:
    from matplotlib import colormaps

    rgb = colormaps["inferno"](np.clip(residual / vmax, 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@torch.no_grad()
def _reconstructions(model, evaluation: Evaluation, indices: list[int],
                     folder: Path) -> dict | None:
    """Original / reconstruction / residual rows, or None if the model does not reconstruct."""
    if not indices:
        return None
    x = torch.stack([image_to_tensor(read_image(evaluation.paths[i]), model.image_size)
                     for i in indices])
    rec = model.reconstruct(x)
    if rec is None:
        return None
    rec = rec.float().cpu()
    residual = (x - rec).abs().mean(1).numpy()
    # One colour scale for all rows of this model, so residuals compare between images.
    vmax = max(float(np.percentile(residual, 99.5)), 1e-6)
    rows = []
    for j, i in enumerate(indices):
        rows.append({
            "index": i, "file": evaluation.paths[i].name,
            "defect_type": evaluation.defect_types[i], "score": float(evaluation.scores[i]),
            "original": _save(_thumb(_to_image(x[j])), folder, f"rec_in_{i}"),
            "reconstruction": _save(_thumb(_to_image(rec[j])), folder, f"rec_out_{i}"),
            "residual": _save(_thumb(_residual_image(residual[j], vmax)), folder,
                              f"rec_res_{i}"),
            "residual_mean": float(residual[j].mean()),
        })
    return {"residual_max": vmax, "rows": rows}


def _grid(images: torch.Tensor, columns: int = 8) -> Image.Image:
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(3, rows * (h + 2), columns * (w + 2))
    for k in range(n):
        r, c = divmod(k, columns)
        canvas[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = \
            images[k]
    return _to_image(canvas)


@torch.no_grad()
def _samples(model, model_dir: Path | None, folder: Path) -> dict | None:
    """Generated images: from ``model.sample(n)`` if the model has it, else the newest
    ``*sample*.png`` its training wrote (e.g. a GAN's per-epoch sample grid)."""
    sample = getattr(model, "sample", None)
    if callable(sample):
        images = sample(N_SAMPLES)
        if images is not None:
            return {"source": f"{type(model).__name__}.sample({N_SAMPLES})",
                    "image": _save(_grid(images.float().cpu()), folder, "samples")}
    if model_dir is not None and (model_dir / "training").is_dir():
        found = sorted((model_dir / "training").glob("*sample*.png"))
        if found:
            shutil.copyfile(found[-1], folder / "samples.png")
            return {"source": f"training picture {found[-1].name}", "image": "samples.png"}
    return None


def _training_pictures(model_dir: Path | None, folder: Path) -> list[dict]:
    """Loss curves a model's training drew into ``<model>/training/`` (e.g. losses.png),
    copied so the report shows whether training converged."""
    if model_dir is None or not (model_dir / "training").is_dir():
        return []
    found = sorted((model_dir / "training").glob("*loss*.png"))[:2]
    for path in found:
        shutil.copyfile(path, folder / f"training_{path.name}")
    return [{"image": f"training_{path.name}", "source": path.name} for path in found]


def save_report_assets(model, manifest: dict, evaluation: Evaluation, out: str | Path,
                       model_dir: str | Path | None = None) -> Path:
    """Write ``out/report_assets/`` (pictures + ``assets.json``) for one tested category.

    Any previous assets are replaced, so a re-test never mixes two runs' pictures.
    """
    folder = Path(out) / ASSETS_DIR
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    indices = select_gallery(evaluation.scores, evaluation.labels, evaluation.defect_types)
    calibration = manifest.get("calibration")
    # Calibrated maps share one colour scale; otherwise one scale for the whole gallery
    # (not per image), so a hot false alarm is visibly hotter than a cool good image.
    vrange = display_range(evaluation.maps, calibration)
    assets: dict[str, Any] = {
        "colour_scale": {"low": vrange[0], "high": vrange[1],
                         "from": "held-out good images" if calibration and
                         calibration.get("map_max") is not None else "test maps"},
        "gallery": _gallery_entries(evaluation, indices, vrange, folder),
        "machine": machine_info(),
        "config": model.config_dict(),
        "preset": model.preset,
    }
    good_typical = [int(i) for i in np.flatnonzero(evaluation.labels == 0)[:2]]
    model_dir = Path(model_dir) if model_dir else None
    # The optional, model-specific pictures must never cost the metrics of a long fit: if
    # a model's reconstruct()/sample() breaks, the report says so instead.
    assets["problems"] = []
    optional = {
        "reconstructions": lambda: _reconstructions(
            model, evaluation, good_typical + indices["examples"], folder),
        "samples": lambda: _samples(model, model_dir, folder),
        "training": lambda: _training_pictures(model_dir, folder),
    }
    for key, draw in optional.items():
        try:
            assets[key] = draw()
        except Exception as exc:
            log.warning("report pictures: %s failed: %s", key, exc)
            assets[key] = None
            assets["problems"].append(f"{key}: {type(exc).__name__}: {exc}")
    (folder / "assets.json").write_text(json.dumps(assets, indent=2))
    return folder
