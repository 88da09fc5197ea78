"""Decision thresholds: when is a score high enough to call the part defective?

On a real line there are no labelled defects when a model is set up, so the default
threshold is set from **good images only**: the scores of the good training images that
``fit`` held out (never seen while fitting) show what normal scores look like, and the
threshold is placed so that at most a target fraction ``alpha`` of good parts is flagged
(``--max-false-alarm``, default 1%).

Estimators, chosen by how many held-out good images ``n`` there are:

``good_quantile`` (``n >= 1/alpha - 1``, e.g. 99 images for 1%)
    The ``ceil((n+1)(1-alpha))``-th smallest held-out score: the split-conformal
    ``(1-alpha)`` quantile. If new good images are like the held-out ones, the expected
    false-alarm rate is at most ``alpha``.
``good_gaussian_tail`` (``2 <= n < 1/alpha - 1``)
    Too few images to observe a ``alpha`` tail, so it is extrapolated: ``mean + z * std`` of
    the held-out scores with ``z`` the standard-normal ``(1-alpha)`` quantile, and never below
    the highest held-out score. This is an estimate and is stored with a warning.
``none`` (``n < 2``)
    No threshold at all. ``predict`` and the service then report ``is_anomalous: null``
    ("undecided") instead of guessing. The classic failure of other tools is a threshold
    that silently flags everything (e.g. F1-max on a validation set with no defects, or a
    threshold taken from the in-sample training scores of a model that memorizes them); here
    the fallback is explicit and visible.

A threshold can also be set from labelled validation images at the F1-max point
(``f1_max``; refused unless there are both good and defective images), or by hand
(``manual``); see ``flawscope threshold``.

The **normalized score** maps a raw score through a logistic curve so that the threshold
maps to 0.5 and the median held-out good score to 0.1 (``scale = (threshold - median) /
ln 9``). So 0.1 is "a typical good part", 0.5 is "on the threshold", 0.9 is "as far above the
threshold as the threshold is above a typical good part". It is a readable ordering, not a
probability.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from .errors import FlawscopeError

log = logging.getLogger(__name__)

DEFAULT_MAX_FALSE_ALARM = 0.01
#: Fewest held-out good scores from which any threshold is derived.
MIN_GOOD_SCORES = 2
_LN9 = math.log(9.0)

METHODS = ("good_quantile", "good_gaussian_tail", "f1_max", "manual", "none")


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise FlawscopeError(f"max false-alarm rate must be between 0 and 0.5, got {alpha}")


def images_needed(alpha: float) -> int:
    """Held-out good images needed before the empirical (conformal) quantile exists."""
    return math.ceil(1 / alpha - 1)


def _scale(threshold: float, good: np.ndarray) -> float:
    """Spread of the logistic mapping: median good score -> 0.1, threshold -> 0.5."""
    if len(good):
        scale = (threshold - float(np.median(good))) / _LN9
        if scale > 0:
            return scale
        spread = float(np.std(good))
        if spread > 0:
            return spread
    return max(abs(threshold) * 1e-3, 1e-12)


def from_good_scores(scores: Sequence[float] | None, alpha: float = DEFAULT_MAX_FALSE_ALARM
                     ) -> dict[str, Any]:
    """The threshold record (as stored in the manifest) for held-out good scores."""
    check_alpha(alpha)
    good = np.sort(np.asarray(scores if scores is not None else [], dtype=np.float64))
    n = len(good)
    record: dict[str, Any] = {"max_false_alarm": alpha, "n_good": n,
                              "set_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if n < MIN_GOOD_SCORES:
        record.update(value=None, method="none", scale=None, estimated_false_alarm=None,
                      warning=f"only {n} held-out good image(s): no threshold was set, so every "
                              "prediction is 'undecided'. Refit with more good images or "
                              "--holdout > 0, or set one with `flawscope threshold`.")
        return record
    needed = images_needed(alpha)
    if n >= needed:
        k = math.ceil((n + 1) * (1 - alpha))
        value = float(good[k - 1])
        method, warning = "good_quantile", None
    else:
        z = NormalDist().inv_cdf(1 - alpha)
        value = max(float(good.mean() + z * good.std(ddof=1)), float(good[-1]))
        method = "good_gaussian_tail"
        warning = (f"only {n} held-out good images; measuring a {alpha:.2%} false-alarm rate "
                   f"needs at least {needed}. The threshold is extrapolated from a normal fit "
                   "of their scores: treat the false-alarm rate as an estimate.")
    record.update(value=value, method=method, scale=_scale(value, good),
                  estimated_false_alarm=float(np.mean(good > value)), warning=warning)
    return record


def from_labelled_scores(labels: Sequence[int], scores: Sequence[float],
                         good_reference: Sequence[float] | None = None) -> dict[str, Any]:
    """Threshold at the best F1 on labelled validation scores (1 = defective).

    Refused unless there are both good and defective images: F1-max without defects puts the
    threshold at the lowest score and flags every part. ``good_reference`` (held-out good
    scores) sets the spread of the normalized score; the validation good images are used
    when it is absent.
    """
    from .metrics import f1_max

    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    n_bad = int(labels.sum())
    n_good = int(len(labels) - n_bad)
    if n_bad == 0 or n_good == 0:
        raise FlawscopeError(f"an F1 threshold needs good and defective validation images; got "
                             f"{n_good} good and {n_bad} defective. Without defects use the "
                             "good-only threshold (--method good).")
    f1, at = f1_max(labels, scores)
    # f1_max flags score >= at; decisions here flag score > value, so step just below it.
    value = float(np.nextafter(at, -np.inf))
    good = np.asarray(good_reference if good_reference else scores[labels == 0], np.float64)
    return {"value": float(value), "method": "f1_max", "f1": f1, "n_good": n_good,
            "n_defective": n_bad, "scale": _scale(float(value), good),
            "estimated_false_alarm": float(np.mean(scores[labels == 0] > value)),
            "detection_rate": float(np.mean(scores[labels == 1] > value)),
            "set_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "warning": None if n_good >= 20 and n_bad >= 20 else
            f"F1 threshold from only {n_good} good and {n_bad} defective images"}


def manual(value: float, good_reference: Sequence[float] | None = None) -> dict[str, Any]:
    """A threshold typed in by a user (e.g. agreed with quality engineering)."""
    good = np.asarray(good_reference or [], dtype=np.float64)
    return {"value": float(value), "method": "manual", "n_good": len(good),
            "scale": _scale(float(value), good),
            "estimated_false_alarm": float(np.mean(good > value)) if len(good) else None,
            "set_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "warning": None}


class Decision:
    """Applies a stored threshold record to raw scores."""

    def __init__(self, record: dict[str, Any] | None):
        self.record = record or {"value": None, "method": "none", "scale": None}
        value = self.record.get("value")
        self.value = None if value is None else float(value)
        scale = self.record.get("scale")
        self.scale = float(scale) if scale else max(abs(self.value or 0) * 1e-3, 1e-12)

    @property
    def has_threshold(self) -> bool:
        return self.value is not None

    def normalized(self, score: float) -> float | None:
        if self.value is None:
            return None
        x = (score - self.value) / self.scale
        return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0

    def is_anomalous(self, score: float) -> bool | None:
        """``score > threshold``; None when the model has no threshold (undecided)."""
        return None if self.value is None else bool(score > self.value)

    def __call__(self, score: float) -> dict[str, Any]:
        return {"score": float(score), "normalized_score": self.normalized(score),
                "is_anomalous": self.is_anomalous(score), "threshold": self.value}


def decision_for(manifest: dict[str, Any]) -> Decision:
    """The decision rule stored in a model manifest (older manifests: none)."""
    record = manifest.get("threshold")
    return Decision(record if isinstance(record, dict) else None)


def labelled_images(folder: str | Path) -> list[tuple[Path, int]]:
    """Labelled validation images: ``folder/good/*`` are good, ``folder/<defect>/*`` defective.

    ``folder`` may be an MVTec category (its ``test/`` is used) or a folder laid out like
    ``test/``. No masks are needed.
    """
    from .data import GOOD, list_images

    root = Path(folder)
    if (root / "test").is_dir():
        root = root / "test"
    if not root.is_dir():
        raise FlawscopeError(f"{folder}: validation folder not found")
    out: list[tuple[Path, int]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        out.extend((path, int(sub.name != GOOD)) for path in list_images(sub))
    if not out:
        raise FlawscopeError(f"{root}: no labelled images (expected good/ and <defect>/ folders)")
    return out


def from_validation(model, folder: str | Path,
                    good_reference: Sequence[float] | None = None,
                    geometry=None) -> dict[str, Any]:
    """Score the labelled images under ``folder`` (in the model's ``geometry``, see
    :mod:`flawscope.geometry`) and set the threshold at F1-max."""
    from .pipeline import score_paths

    items = labelled_images(folder)
    scores, _ = score_paths(model, [p for p, _ in items], desc="validation",
                            geometry=geometry)
    record = from_labelled_scores([label for _, label in items], scores, good_reference)
    record["data"] = str(folder)
    return record


def rates(record: dict[str, Any] | None, labels: Sequence[int],
          scores: Sequence[float]) -> dict[str, Any]:
    """How a stored threshold does on labelled scores: false-alarm and detection rates."""
    decide = Decision(record)
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    if not decide.has_threshold:
        return {"threshold": None, "false_alarm_rate": None, "detection_rate": None}
    flagged = scores > decide.value
    good, bad = labels == 0, labels == 1
    return {"threshold": decide.value, "threshold_method": decide.record.get("method"),
            "false_alarm_rate": float(flagged[good].mean()) if good.any() else None,
            "detection_rate": float(flagged[bad].mean()) if bad.any() else None}
