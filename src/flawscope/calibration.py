"""Calibration: the scores of good images from a model that did not see them.

A threshold set from good images (:mod:`flawscope.threshold`) is only as good as the scores it
rests on: they must be what a *new* good part would score, so they cannot come from images the
model was fitted on (a memory bank contains its own training patches and scores them near 0).
Four ways to get them, ``fit --calibration``:

``loo`` (leave-one-out)
    The model is fitted on every good image, then each one is scored as if it had been left
    out, exactly and without refitting (:meth:`AnomalyModel.leave_one_out_scores`: PatchCore
    excludes the image's own rows from its memory bank, PaDiM and the Gaussian baseline
    down-date their statistics in closed form). Nothing is held out, and there are as many
    calibration scores as good images.
``kfold``
    The good images are split into ``folds`` parts; a model fitted on all but one part scores
    that part, for each part; the saved model is fitted on all images. ``folds + 1`` fits,
    or cheaper where the model can cross-fit from features computed once
    (:meth:`AnomalyModel.kfold_scores`: PatchCore selects each fold's bank from them).
``holdout``
    A fraction of the good images is held out of the fit and scored (the classic split, and
    the only choice for models whose fit is expensive).
``auto``
    What the model says is best (:meth:`AnomalyModel.auto_calibration`): ``loo`` for PaDiM
    and the Gaussian baseline (their leave-one-out equals a refit), ``kfold`` for PatchCore
    with a coreset (its leave-one-out keeps a coreset chosen with the image, and measured
    too optimistic), ``holdout`` for the trained models. Falls back to ``holdout`` where
    the method cannot run (fewer than 3 images, or ``loo`` in a tiled geometry).

Usage::

    result = calibrate(lambda: get_model_class("padim").from_settings(), paths)
    result.model                      # fitted on every image in ``paths``
    result.calibration["scores"]      # one leave-one-out score per image
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ImageDataset
from .errors import FlawscopeError
from .models import AnomalyModel

log = logging.getLogger(__name__)

METHODS = ("auto", "holdout", "loo", "kfold")
DEFAULT_FOLDS = 5


@dataclass
class Calibrated:
    """A fitted model and the calibration record of its good images."""

    model: AnomalyModel
    calibration: dict[str, Any] | None
    method: str
    n_fit: int
    n_holdout: int
    fit_s: float


def calibration_record(scores: np.ndarray, maps: np.ndarray, method: str) -> dict[str, Any]:
    """What normal looks like: the calibration scores, map statistics and how they were made.

    ``map_max_per_image`` (the largest map value of each image) sets the pixel threshold of
    defect regions (:func:`flawscope.threshold.pixel_threshold`).
    """
    # A list of maps of different sizes in a tiled geometry, else one array.
    per_image = [float(np.max(m)) for m in maps]
    pixels = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    return {
        "method": method,
        "n_images": int(len(scores)),
        "scores": [float(s) for s in scores],
        "map_p50": float(np.percentile(pixels, 50)),
        "map_p99": float(np.percentile(pixels, 99)),
        "map_max": float(pixels.max()),
        "map_max_per_image": per_image,
    }


def resolve_method(model: AnomalyModel, method: str, n_images: int,
                   tiled: bool = False) -> str:
    """The method ``auto`` stands for, or a clear error for one the model cannot do.
    Leave-one-out works per fitted image, so not in a tiled geometry (a model fitted on
    tiles would leave out one tile, not one image)."""
    if method not in METHODS:
        raise FlawscopeError(f"calibration {method!r}: choose from {', '.join(METHODS)}")
    loo_ok = model.supports_leave_one_out and not tiled
    if method == "auto":
        chosen = model.auto_calibration()
        if n_images < 3 or (chosen == "loo" and not loo_ok):
            return "holdout"
        return chosen
    if method == "loo" and not loo_ok:
        raise FlawscopeError(f"model {model.name!r} has no leave-one-out scores; use "
                             "--calibration holdout or kfold")
    return method


def kfold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """A seeded split of ``range(n)`` into ``folds`` parts of near-equal size."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def _fit(make_model: Callable[[], AnomalyModel], paths: Sequence[Path],
         workdir: Path | None, geometry=None) -> tuple[AnomalyModel, ImageDataset, float]:
    from .geometry import Geometry, training_dataset

    model = make_model()
    dataset = training_dataset(list(paths), geometry or Geometry(), model.image_size)
    torch.manual_seed(int(model.config.seed))
    start = time.perf_counter()
    model.fit(dataset, workdir=workdir)
    return model, dataset, time.perf_counter() - start


def _refit_folds(make_model: Callable[[], AnomalyModel], paths: Sequence[Path],
                 split: Sequence[np.ndarray], geometry) -> tuple[np.ndarray, list]:
    """Scores and maps of every image by a model fitted without its part of ``split``."""
    from .pipeline import score_paths

    scores = np.zeros(len(paths), dtype=np.float64)
    maps: list = [None] * len(paths)  # per image: sizes differ in a tiled geometry
    for f, part in enumerate(split):
        inside = set(part.tolist())
        log.info("calibration fold %d of %d", f + 1, len(split))
        fold_model, _, _ = _fit(make_model, [p for i, p in enumerate(paths)
                                             if i not in inside], None, geometry)
        s, m = score_paths(fold_model, [paths[i] for i in part], desc=f"fold {f + 1}",
                           geometry=geometry)
        scores[part] = s
        for i, image_map in zip(part, m, strict=True):
            maps[i] = image_map
    return scores, maps


def calibrate(make_model: Callable[[], AnomalyModel], paths: Sequence[Path],
              method: str = "auto", holdout: float = 0.1, folds: int = DEFAULT_FOLDS,
              seed: int = 0, workdir: Path | None = None, geometry=None) -> Calibrated:
    """Fit a model made by ``make_model`` on good images and calibrate it by ``method``.

    ``holdout`` is the fraction held out by the ``holdout`` method (fewer than 10 images are
    never split, and then there is no calibration); ``folds`` the parts of ``kfold``;
    ``seed`` fixes the split.
    """
    from .pipeline import score_paths, split_holdout

    paths = list(paths)
    if len(paths) == 1:
        log.warning("a single good image: nothing to calibrate a decision threshold on, so "
                    "none is set and every prediction is 'undecided'. Set one by hand "
                    "(`flawscope threshold --value`) or refit with 2 or more good images "
                    "(--calibration loo) before deciding on parts.")
    method = resolve_method(make_model(), method, len(paths),
                            geometry is not None and geometry.tiled)
    if method == "holdout":
        fit_paths, held = split_holdout(paths, holdout, seed)
        model, _, fit_s = _fit(make_model, fit_paths, workdir, geometry)
        record = (calibration_record(*score_paths(model, held, desc="held-out",
                                                  geometry=geometry), "holdout")
                  if held else None)
        return Calibrated(model, record, "holdout", len(fit_paths), len(held), fit_s)
    if method == "kfold":
        k = min(folds, len(paths))
        if k < 2:
            raise FlawscopeError(f"k-fold calibration needs at least 2 good images, got "
                                 f"{len(paths)}")
        split = kfold_indices(len(paths), k, seed)
        model, dataset, fit_s = _fit(make_model, paths, workdir, geometry)
        tiled = geometry is not None and geometry.tiled  # the dataset holds tiles, not images
        cross = None if tiled else model.kfold_scores(dataset, split)
        if cross is None:
            cross = _refit_folds(make_model, paths, split, geometry)
        return Calibrated(model, calibration_record(*cross, "kfold"), "kfold",
                          len(paths), 0, fit_s)
    model, dataset, fit_s = _fit(make_model, paths, workdir)
    result = model.leave_one_out_scores(dataset)
    if result is None:
        raise FlawscopeError(f"model {model.name!r} gave no leave-one-out scores for "
                             f"{len(paths)} images; use --calibration holdout or kfold")
    return Calibrated(model, calibration_record(*result, "loo"), "loo", len(paths), 0, fit_s)
