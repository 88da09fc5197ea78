"""The steps every command is made of: fit a model on a category, score a category, predict.

These functions never look at which model they run: they only use the
:class:`~flawscope.models.AnomalyModel` interface, so every model gets the same held-out
calibration, the same timings and the same metrics.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .data import Category, ImageDataset, TestDataset, open_category
from .metrics import compute_all
from .modelfile import save_model
from .models import AnomalyModel, get_model_class
from .models.base import resize_maps
from .threshold import DEFAULT_MAX_FALSE_ALARM, check_alpha, from_calibration

log = logging.getLogger(__name__)

#: Resolution (square) at which anomaly maps and masks are compared for pixel metrics.
DEFAULT_PIXEL_SIZE = 256
#: Fraction of train/good held out from fitting and scored afterwards, so that what "normal"
#: scores look like is known without any labelled defect (used for thresholds and heat-map
#: colour scales).
DEFAULT_HOLDOUT = 0.1


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_holdout(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Deterministic split of good training images into (fit, held-out).

    Tiny training sets (fewer than 10 images) are not split: every image is needed to fit.
    """
    if fraction <= 0 or len(paths) < 10:
        return list(paths), []
    n_hold = max(1, round(fraction * len(paths)))
    order = np.random.default_rng(seed).permutation(len(paths))
    hold = sorted(order[:n_hold].tolist())
    held = set(hold)
    return [p for i, p in enumerate(paths) if i not in held], [paths[i] for i in hold]


@torch.no_grad()
def score_paths(model: AnomalyModel, paths: list[Path], batch_size: int = 16,
                desc: str = "scoring") -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps (at the model's resolution, float32) of images given by path."""
    loader = torch.utils.data.DataLoader(ImageDataset(paths, model.image_size),
                                         batch_size=batch_size)
    scores, maps = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        s, m = model.score_tensor(batch)
        scores.append(s.numpy())
        maps.append(m.numpy())
    return np.concatenate(scores), np.concatenate(maps)


def calibration_from(scores: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
    """What normal looks like on held-out good images: their scores and map statistics."""
    return {
        "n_images": int(len(scores)),
        "scores": [float(s) for s in scores],
        "map_p50": float(np.percentile(maps, 50)),
        "map_p99": float(np.percentile(maps, 99)),
        "map_max": float(maps.max()),
    }


@dataclass
class FitResult:
    model: AnomalyModel
    model_dir: Path
    fit_s: float
    n_train: int
    n_holdout: int
    calibration: dict[str, Any] | None = None
    threshold: dict[str, Any] | None = None


def fit_model(data_dir: str | Path, model_name: str, out_dir: str | Path,
              preset: str | None = None, overrides: dict[str, Any] | None = None,
              holdout: float = DEFAULT_HOLDOUT,
              max_false_alarm: float = DEFAULT_MAX_FALSE_ALARM,
              calibration: str = "holdout", folds: int = 5) -> FitResult:
    """Fit ``model_name`` on ``data_dir``/train/good and save it to ``out_dir``.

    ``calibration`` (``auto|holdout|loo|kfold``, see :mod:`flawscope.calibration`) says how
    the good images' calibration scores are made; the decision threshold is set from them for
    a false-alarm rate of ``max_false_alarm`` (see :mod:`flawscope.threshold`).
    """
    from .calibration import calibrate

    check_alpha(max_false_alarm)
    category = open_category(data_dir)
    cls = get_model_class(model_name)
    seed = int(cls.from_settings(preset, overrides).config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("fitting %s on the good images of %s (calibration: %s)", model_name,
             category.root, calibration)
    result = calibrate(lambda: cls.from_settings(preset, overrides), category.train,
                       calibration, holdout, folds, seed, workdir=out_dir / "training")
    model, fit_s = result.model, result.fit_s
    fit_paths, held_paths = range(result.n_fit), range(result.n_holdout)
    calibration = result.calibration
    fit_info = {"fit_s": fit_s, "n_train": len(fit_paths), "n_holdout": len(held_paths),
                "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
                "data": str(category.root), "calibration": result.method}
    threshold = from_calibration(calibration, max_false_alarm)
    if threshold["warning"]:
        log.warning("%s", threshold["warning"])
    save_model(model, out_dir, extra={"fit_info": fit_info, "calibration": calibration,
                                      "threshold": threshold})
    return FitResult(model, out_dir, fit_s, len(fit_paths), len(held_paths), calibration,
                     threshold)


@dataclass
class Evaluation:
    """Everything scored on a category's test set, ready for metrics and reports."""

    category: Category
    scores: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    maps: np.ndarray  # (N, P, P) float32 at the pixel-metric resolution
    masks: np.ndarray  # (N, P, P) bool
    infer_s: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [t.path for t in self.category.test]


@torch.no_grad()
def evaluate(model: AnomalyModel, data_dir: str | Path, pixel_size: int = DEFAULT_PIXEL_SIZE,
             batch_size: int = 16) -> Evaluation:
    """Score every test image of a category and compute all metrics.

    ``infer_s`` counts only the model's scoring (not image decoding), so images/s compares
    models rather than disks.
    """
    category = open_category(data_dir)
    items = category.require_test()
    n = len(items)
    maps = np.zeros((n, pixel_size, pixel_size), dtype=np.float32)
    masks = np.zeros((n, pixel_size, pixel_size), dtype=bool)
    scores = np.zeros(n, dtype=np.float64)
    loader = torch.utils.data.DataLoader(TestDataset(items, model.image_size, pixel_size),
                                         batch_size=batch_size)
    infer_s = 0.0
    for images, batch_masks, index in tqdm(loader, desc=f"testing {category.name}",
                                           leave=False, disable=None):
        start = time.perf_counter()
        s, m = model.score_tensor(images)
        infer_s += time.perf_counter() - start
        idx = index.numpy()
        scores[idx] = s.numpy()
        maps[idx] = resize_maps(m, (pixel_size, pixel_size)).numpy()
        masks[idx] = batch_masks.numpy()
    labels = np.array([int(t.is_anomalous) for t in items])
    defect_types = [t.defect_type for t in items]
    metrics = compute_all(labels, scores, defect_types, masks, maps)
    return Evaluation(category, scores, labels, defect_types, maps, masks, infer_s, metrics)
