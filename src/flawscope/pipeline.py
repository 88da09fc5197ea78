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
from .data import (
    Category,
    ImageDataset,
    TestDataset,
    as_image,
    collate_test,
    open_category,
    open_checked,
    read_image,
    read_mask,
)
from .errors import FlawscopeError
from .geometry import Geometry, check_grid, score_images
from .metrics import compute_all
from .modelfile import save_model
from .models import AnomalyModel, get_model_class
from .models.base import resize_maps
from .pixelmetrics import PixelMetrics
from .threshold import DEFAULT_MAX_FALSE_ALARM, check_alpha, from_calibration, rates

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
                desc: str = "scoring", engine: Engine | None = None,
                geometry: Geometry | None = None) -> tuple[np.ndarray, np.ndarray | list]:
    """Scores and maps (float32) of images (paths, PIL images or arrays): an ``(N, S, S)``
    array at the model's resolution for ``resize``, else a list of maps at each image's
    working resolution (see :mod:`flawscope.geometry`)."""
    if geometry is not None and geometry.tiled:
        scored = [score_images(model, [as_image(p)], geometry, engine, batch_size)[0]
                  for p in tqdm(paths, desc=desc, leave=False, disable=None)]
        return (np.array([s for s, _ in scored], dtype=np.float32),
                [m.numpy() for _, m in scored])
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
    geometry: Geometry = field(default_factory=Geometry)

    @property
    def manifest_fields(self) -> dict[str, Any]:
        """What the model directory's manifest records about this fit."""
        return {"fit_info": self.fit_info, "calibration": self.calibration,
                "threshold": self.threshold, "geometry": self.geometry.to_dict()}


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
              max_false_alarm: float = DEFAULT_MAX_FALSE_ALARM,
              calibration: str = "auto", folds: int = 5,
              geometry: Geometry | None = None) -> FitResult:
    """Fit ``model_name`` on good images (see :func:`good_images`), calibrate it and, with
    ``out_dir``, save it there.

    ``calibration`` (``auto|holdout|loo|kfold``, see :mod:`flawscope.calibration`) says how
    the good images' calibration scores are made; the decision threshold is set from them for
    a false-alarm rate of ``max_false_alarm`` (see :mod:`flawscope.threshold`). Without
    ``out_dir`` nothing is written (training checkpoints go to a temporary folder).
    ``geometry`` (default ``resize``) says how images become model inputs
    (:mod:`flawscope.geometry`); it is saved in the manifest with its defaults filled in.
    """
    from .calibration import calibrate

    check_alpha(max_false_alarm)
    # The model first: a typo in its name or settings fails before any image is read.
    cls = get_model_class(model_name)
    probe = cls.from_settings(preset, overrides)
    seed = int(probe.config.seed)
    geometry = (geometry or Geometry()).resolved(probe.image_size)
    images, source = good_images(data)
    log.info("fitting %s on %d good images of %s (calibration: %s)", model_name, len(images),
             source, calibration)
    with tempfile.TemporaryDirectory(prefix="flawscope-fit-") as scratch:
        workdir = Path(out_dir) / "training" if out_dir is not None else Path(scratch)
        result = calibrate(lambda: cls.from_settings(preset, overrides), images, calibration,
                           holdout, folds, seed, workdir=workdir, geometry=geometry)
    model, fit_s, record = result.model, result.fit_s, result.calibration
    if record is not None:
        check_scores_usable(np.asarray(record["scores"]), "the good calibration images")
    else:
        check_scores_usable(score_paths(model, images[:8], desc="checking",
                                        geometry=geometry)[0], "training images")
    fit_info = {"fit_s": fit_s, "n_train": result.n_fit, "n_holdout": result.n_holdout,
                "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
                "data": source, "calibration": result.method}
    threshold = from_calibration(record, max_false_alarm)
    if threshold["warning"]:
        log.warning("%s", threshold["warning"])
    result = FitResult(model, Path(out_dir) if out_dir is not None else None, fit_s,
                       result.n_fit, result.n_holdout, record, threshold, fit_info, geometry)
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
             engine: Engine | None = None, geometry: Geometry | None = None) -> Evaluation:
    """Score every test image of a category and compute all metrics.

    Only ``test/`` (and ``ground_truth/`` where it exists) is read. Pixel metrics compare each
    map with its mask at the mask's own resolution (``pixel_size=None``, the official MVTec
    protocol) or with both resized to ``pixel_size`` squared; they are streamed image by image
    (:class:`~flawscope.pixelmetrics.PixelMetrics`), so memory does not grow with the pixel
    count. ``manifest`` (the model directory's) adds the stored decision threshold's
    false-alarm and detection rates and the fit's figures. ``infer_s`` counts only the model's
    scoring (not image decoding), so images/s compares models rather than disks. ``geometry``
    (default: the manifest's, else ``resize``) says how images become model inputs; in a
    tiled geometry each image's map is stitched at its working resolution first.
    """
    category = open_category(data_dir, train=False, test=True)
    items = category.require_test()
    n, size = len(items), model.image_size
    maps = np.zeros((n, size, size), dtype=np.float32)  # for the report's pictures
    masks = np.zeros((n, size, size), dtype=bool)
    scores = np.zeros(n, dtype=np.float64)
    pixels = PixelMetrics() if category.has_masks else None
    if geometry is None:
        geometry = Geometry.from_manifest(manifest or {})
    if geometry.tiled:
        infer_s = _evaluate_tiled(model, items, geometry, pixel_size, batch_size, engine,
                                  scores, maps, masks, pixels, category.name)
        return _finish(model, category, items, scores, maps, masks, infer_s, manifest,
                       data_dir, pixel_size, pixels)
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
            _add_mask(masks, i, batch_masks[j], size)
            if pixels is not None:
                pixels.add(resize_maps(m[j][None], targets[j])[0].numpy(), batch_masks[j])
    return _finish(model, category, items, scores, maps, masks, infer_s, manifest, data_dir,
                   pixel_size, pixels)


def _add_mask(masks: np.ndarray, i: int, mask: np.ndarray | None, size: int) -> None:
    """Keep a mask at the pictures' size (nearest neighbour)."""
    if mask is not None:
        masks[i] = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def _evaluate_tiled(model: AnomalyModel, items: list, geometry: Geometry,
                    pixel_size: int | None, batch_size: int, engine: Engine | None,
                    scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                    pixels: PixelMetrics | None, name: str) -> float:
    """Fill ``scores``, ``maps``, ``masks`` and the pixel metrics image by image in a tiled
    geometry; returns the seconds spent scoring (tiling and stitching included, decoding
    not)."""
    size = model.image_size
    infer_s = 0.0
    for i, item in enumerate(tqdm(items, desc=f"testing {name}", leave=False, disable=None)):
        image = read_image(item.path)
        check_grid(model, geometry, image.width, image.height, item.path)
        start = time.perf_counter()
        [(score, amap)] = score_images(model, [image], geometry, engine, batch_size)
        infer_s += time.perf_counter() - start
        scores[i] = score
        maps[i] = resize_maps(amap[None], (size, size))[0].numpy()
        target = ((image.height, image.width) if pixel_size is None
                  else (pixel_size, pixel_size))
        mask = None if item.mask_path is None else read_mask(item.mask_path, pixel_size)
        _add_mask(masks, i, mask, size)
        if pixels is not None:
            pixels.add(resize_maps(amap[None], target)[0].numpy(), mask)
    return infer_s


def _finish(model: AnomalyModel, category: Category, items: list, scores: np.ndarray,
            maps: np.ndarray, masks: np.ndarray, infer_s: float,
            manifest: dict[str, Any] | None, data_dir: str | Path,
            pixel_size: int | None, pixels: PixelMetrics | None) -> Evaluation:
    labels = np.array([int(t.is_anomalous) for t in items])
    defect_types = [t.defect_type for t in items]
    metrics = compute_all(labels, scores, defect_types)
    if pixels is not None:
        metrics.update(pixels.result())
    evaluation = Evaluation(category, scores, labels, defect_types, maps, masks, infer_s)
    evaluation.metrics = metrics_record(metrics, evaluation, model, manifest or {}, data_dir,
                                        pixel_size)
    return evaluation


def _mpix_per_s(evaluation: Evaluation) -> float | None:
    """Megapixels of the test images (at their own size) scored per second."""
    if evaluation.infer_s <= 0:
        return None
    pixels = 0
    for path in evaluation.paths:
        with open_checked(path, path, min_side=1) as im:
            pixels += im.width * im.height
    return pixels / 1e6 / evaluation.infer_s


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
        "geometry": Geometry.from_manifest(manifest).to_dict(),
        "infer_s": evaluation.infer_s,
        "infer_mpix_per_s": _mpix_per_s(evaluation),
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
