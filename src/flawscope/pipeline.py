"""The steps every command is made of: fit a model, score images, evaluate a category.

These functions never look at which model they run: they only use the
:class:`~flawscope.models.AnomalyModel` interface, so every model gets the same held-out
calibration, the same timings and the same metrics. :class:`flawscope.Detector` is the
public face of this module.
"""

from __future__ import annotations

import logging
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import __version__
from .data import Category, ImageDataset, TestDataset, collate_test, open_category
from .errors import FlawscopeError
from .metrics import compute_all
from .modelfile import save_model
from .models import AnomalyModel, get_model_class
from .models.base import resize_maps
from .pixelmetrics import PixelMetrics
from .threshold import DEFAULT_MAX_FALSE_ALARM, check_alpha, from_good_scores, rates

log = logging.getLogger(__name__)

#: Resolution at which anomaly maps and masks are compared for pixel metrics: None = each
#: mask's own (the official MVTec AD protocol), or a square size.
DEFAULT_PIXEL_SIZE = None
#: Fraction of train/good held out from fitting and scored afterwards, so that what "normal"
#: scores look like is known without any labelled defect (used for thresholds and heat-map
#: colour scales).
DEFAULT_HOLDOUT = 0.1
#: Fewest good images from which any are held out: below it every image is needed to fit.
MIN_IMAGES_TO_SPLIT = 10
#: A scoring function: ``(B, 3, S, S)`` images in [0, 1] -> ``(scores (B,), maps (B, h, w))``,
#: such as ``model.score_batch`` or an exported graph (see ``AnomalyModel.score_tensor``).
Engine = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_holdout(paths: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split of good training images into (fit, held-out).

    Fewer than :data:`MIN_IMAGES_TO_SPLIT` images are not split (every image is needed to
    fit); that is logged as a warning, since the model then gets no threshold.
    """
    if fraction <= 0:
        return list(paths), []
    if len(paths) < MIN_IMAGES_TO_SPLIT:
        log.warning("only %d good images: none held out (a hold-out needs at least %d), so "
                    "no decision threshold can be set from good images", len(paths),
                    MIN_IMAGES_TO_SPLIT)
        return list(paths), []
    n_hold = max(1, round(fraction * len(paths)))
    order = np.random.default_rng(seed).permutation(len(paths))
    hold = sorted(order[:n_hold].tolist())
    held = set(hold)
    return [p for i, p in enumerate(paths) if i not in held], [paths[i] for i in hold]


@torch.no_grad()
def score_paths(model: AnomalyModel, paths: list, batch_size: int = 16,
                desc: str = "scoring", engine: Engine | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps (at the model's resolution, float32) of images (paths, PIL images or
    arrays)."""
    loader = torch.utils.data.DataLoader(ImageDataset(paths, model.image_size),
                                         batch_size=batch_size)
    scores, maps = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        s, m = model.score_tensor(batch, engine)
        scores.append(s.numpy())
        maps.append(m.numpy())
    return np.concatenate(scores), np.concatenate(maps)


def check_scores_usable(scores: np.ndarray, what: str) -> None:
    """Refuse a fitted model whose scores on good images cannot rank anything: non-finite
    values, or one constant value (the signature of a diverged network that outputs a
    constant: every score identical, every AUROC 0.5)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise FlawscopeError(f"the fitted model gives {bad} non-finite score(s) on {what}: "
                             "training failed (a diverged loss?); the model was not saved")
    if len(scores) >= 2 and float(np.ptp(scores)) == 0.0:
        raise FlawscopeError(f"the fitted model gives the same score ({scores[0]:.6g}) to all "
                             f"{len(scores)} {what}: it cannot tell images apart (training "
                             "collapsed); the model was not saved")


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
    model_dir: Path | None
    fit_s: float
    n_train: int
    n_holdout: int
    calibration: dict[str, Any] | None = None
    threshold: dict[str, Any] | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest_fields(self) -> dict[str, Any]:
        """What the model directory's manifest records about this fit."""
        return {"fit_info": self.fit_info, "calibration": self.calibration,
                "threshold": self.threshold}


def good_images(data: str | Path | Sequence) -> tuple[list, str]:
    """The good images to fit on, and a description of where they came from.

    ``data``: an MVTec-layout category (its ``train/good``), a plain folder of good images,
    or a list of images (paths, PIL images or arrays).
    """
    if isinstance(data, (str, Path)):
        category = open_category(data, train=True, test=False)
        return list(category.train), str(category.root)
    items = list(data)
    if not items:
        raise FlawscopeError("no good images to fit on (an empty list was given)")
    return items, f"{len(items)} images given in memory"


def fit_model(data: str | Path | Sequence, model_name: str, out_dir: str | Path | None = None,
              preset: str | None = None, overrides: dict[str, Any] | None = None,
              holdout: float = DEFAULT_HOLDOUT,
              max_false_alarm: float = DEFAULT_MAX_FALSE_ALARM) -> FitResult:
    """Fit ``model_name`` on good images (see :func:`good_images`), calibrate it on the
    held-out ones and, with ``out_dir``, save it there.

    The decision threshold is set from the held-out good scores for a false-alarm rate of
    ``max_false_alarm`` (see :mod:`flawscope.threshold`). Without ``out_dir`` nothing is
    written (training checkpoints go to a temporary folder).
    """
    check_alpha(max_false_alarm)
    # The model first: a typo in its name or settings fails before any image is read.
    model = get_model_class(model_name).from_settings(preset, overrides)
    images, source = good_images(data)
    fit_images, held = split_holdout(images, holdout, int(model.config.seed))
    log.info("fitting %s on %d good images of %s (%d held out)", model.name, len(fit_images),
             source, len(held))
    with tempfile.TemporaryDirectory(prefix="flawscope-fit-") as scratch:
        workdir = Path(out_dir) / "training" if out_dir is not None else Path(scratch)
        torch.manual_seed(int(model.config.seed))
        start = time.perf_counter()
        model.fit(ImageDataset(fit_images, model.image_size), workdir=workdir)
        fit_s = time.perf_counter() - start
    calibration = None
    if held:
        scores, maps = score_paths(model, held, desc="held-out")
        check_scores_usable(scores, "the held-out good images")
        calibration = calibration_from(scores, maps)
    else:
        check_scores_usable(score_paths(model, fit_images[:8], desc="checking")[0],
                            "training images")
    fit_info = {"fit_s": fit_s, "n_train": len(fit_images), "n_holdout": len(held),
                "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
                "data": source}
    threshold = from_good_scores(calibration["scores"] if calibration else [], max_false_alarm)
    if threshold["warning"]:
        log.warning("%s", threshold["warning"])
    result = FitResult(model, Path(out_dir) if out_dir is not None else None, fit_s,
                       len(fit_images), len(held), calibration, threshold, fit_info)
    if out_dir is not None:
        save_model(model, out_dir, extra=result.manifest_fields)
    return result


@dataclass
class Evaluation:
    """Everything scored on a category's test set, ready for metrics and reports."""

    category: Category
    scores: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    maps: np.ndarray  # (N, S, S) float32 at the model's resolution, for pictures
    masks: np.ndarray  # (N, S, S) bool, the masks at the same size
    infer_s: float
    #: Everything ``flawscope test`` writes to metrics.json (see :mod:`flawscope.results`).
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [t.path for t in self.category.test]


@torch.no_grad()
def evaluate(model: AnomalyModel, data_dir: str | Path, pixel_size: int | None = None,
             batch_size: int = 16, manifest: dict[str, Any] | None = None,
             engine: Engine | None = None) -> Evaluation:
    """Score every test image of a category and compute all metrics.

    Only ``test/`` (and ``ground_truth/`` where it exists) is read. Pixel metrics compare each
    map with its mask at the mask's own resolution (``pixel_size=None``, the official MVTec
    protocol) or with both resized to ``pixel_size`` squared; they are streamed image by image
    (:class:`~flawscope.pixelmetrics.PixelMetrics`), so memory does not grow with the pixel
    count. ``manifest`` (the model directory's) adds the stored decision threshold's
    false-alarm and detection rates and the fit's figures. ``infer_s`` counts only the model's
    scoring (not image decoding), so images/s compares models rather than disks.
    """
    category = open_category(data_dir, train=False, test=True)
    items = category.require_test()
    n, size = len(items), model.image_size
    maps = np.zeros((n, size, size), dtype=np.float32)  # for the report's pictures
    masks = np.zeros((n, size, size), dtype=bool)
    scores = np.zeros(n, dtype=np.float64)
    pixels = PixelMetrics() if category.has_masks else None
    loader = torch.utils.data.DataLoader(TestDataset(items, size, pixel_size),
                                         batch_size=batch_size, collate_fn=collate_test)
    infer_s = 0.0
    for images, batch_masks, indices, targets in tqdm(loader, desc=f"testing {category.name}",
                                                      leave=False, disable=None):
        start = time.perf_counter()
        s, m = model.score_tensor(images, engine)
        infer_s += time.perf_counter() - start
        for j, i in enumerate(indices):
            scores[i], maps[i] = float(s[j]), m[j].numpy()
            mask = batch_masks[j]
            if mask is not None:
                masks[i] = np.asarray(Image.fromarray(mask).resize((size, size),
                                                                   Image.NEAREST))
            if pixels is not None:
                pixels.add(resize_maps(m[j][None], targets[j])[0].numpy(), mask)
    labels = np.array([int(t.is_anomalous) for t in items])
    defect_types = [t.defect_type for t in items]
    metrics = compute_all(labels, scores, defect_types)
    if pixels is not None:
        metrics.update(pixels.result())
    evaluation = Evaluation(category, scores, labels, defect_types, maps, masks, infer_s)
    evaluation.metrics = metrics_record(metrics, evaluation, model, manifest or {}, data_dir,
                                        pixel_size)
    return evaluation


def metrics_record(metrics: dict[str, Any], evaluation: Evaluation, model: AnomalyModel,
                   manifest: dict[str, Any], data_dir: str | Path,
                   pixel_size: int | None) -> dict[str, Any]:
    """The metrics.json record: the metrics, the stored decision on this test set, the
    fit's and the scoring's figures, and versions."""
    fit_info = manifest.get("fit_info") or {}
    threshold = manifest.get("threshold") or {}
    n = len(evaluation.scores)
    return {
        **metrics,
        "model": model.name,
        "preset": model.preset,
        "dataset": str(data_dir),
        "category": evaluation.category.name,
        "n_images": n,
        "n_defective": int(evaluation.labels.sum()),
        "pixel_size": (None if not evaluation.category.has_masks
                       else "native" if pixel_size is None else pixel_size),
        "fit_s": fit_info.get("fit_s"),
        "infer_s": evaluation.infer_s,
        "infer_img_per_s": n / evaluation.infer_s if evaluation.infer_s > 0 else None,
        **rates(threshold, evaluation.labels, evaluation.scores),
        "threshold_n_good": threshold.get("n_good"),
        "threshold_max_false_alarm": threshold.get("max_false_alarm"),
        "threshold_warning": threshold.get("warning"),
        "peak_rss_mb": max(peak_rss_mb(), float(fit_info.get("peak_rss_mb") or 0)),
        "threads": torch.get_num_threads(),
        "flawscope_version": __version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
