"""Decision thresholds: when is a score high enough to call the part defective?

On a real line there are no labelled defects when a model is set up, so the default
threshold is set from **good images only**: calibration scores of good images from a model
that did not see them (leave-one-out, k-fold or held-out; :mod:`flawscope.calibration`) show
what normal scores look like, and the threshold is placed so that at most a target fraction
``alpha`` of good parts is flagged (``--max-false-alarm``, default 1%).

Estimators, chosen by how many calibration scores ``n`` there are:

``good_quantile`` (``n >= 1/alpha - 1``, e.g. 99 images for 1%)
    The ``k = ceil((n+1)(1-alpha))``-th smallest score: the split-conformal ``(1-alpha)``
    quantile. If new good images are exchangeable with the calibration ones, the expected
    false-alarm rate is at most ``alpha``. Given the calibration set, the false-alarm rate of
    this threshold is distributed as Beta(n + 1 - k, k) (Vovk, "Conditional validity of
    inductive conformal predictors", 2012); its 95% quantile is stored as
    ``false_alarm_upper``.
``good_pareto_tail`` (``MIN_TAIL_SCORES < n < 1/alpha - 1``)
    Too few scores to observe an ``alpha`` tail, so it is extrapolated with the
    peaks-over-threshold model of extreme-value theory (Pickands 1975; Coles, "An
    Introduction to Statistical Modeling of Extreme Values", 2001, ch. 4): the top
    ``m = max(MIN_TAIL_SCORES, ceil(n / 4))`` scores, as excesses over the next one ``u``,
    follow a generalized Pareto distribution, so ``P(score > x) = m/n * GPD.sf(x - u)`` and
    the threshold solves ``= alpha``. Shape and scale are estimated by probability-weighted
    moments (Hosking & Wallis, Technometrics 1987), which are stable for the 10-30 excesses
    available here where maximum likelihood is not (scipy's ``genpareto.fit`` gave shapes
    below -1 on 12 excesses). The threshold is never below the highest calibration score.
    ``false_alarm_upper`` is a 95% percentile-bootstrap upper bound of the false-alarm rate
    at that threshold (the data resampled, the tail refitted). It assumes the tail model and
    is optimistic: on Pareto-tailed draws of 20 scores it was above the true rate in 59% of
    draws, not 95%. So the record also keeps ``false_alarm_upper_free``, the bound that
    assumes nothing: no calibration score exceeds the threshold, and if its rate were ``p``
    that happens with probability ``(1 - p)^n``, so ``p <= 1 - 0.05^(1/n)`` at 95% (7.8% for
    37 images). Stored with a warning that names both.

    Measured on real scores (benchmarks/calibration_table.py: the leave-one-out PaDiM scores
    of MVTec screw, 320, and magnetic tile, 762; 200 draws of n of them as calibration, false
    alarms counted on the rest; 1% target): mean false-alarm rate 2.9% / 2.0% / 1.4% (screw)
    and 2.8% / 1.8% / 1.6% (tile) for n = 20 / 40 / 60, against 3.6% / 2.2% / 1.4% and
    3.3% / 2.0% / 1.7% for the Gaussian tail, which it therefore replaces. Neither
    reaches 1%: with n scores the floor at the highest one alone allows 1/(n+1), so below
    about 99 images the promise is "near the target", and the record says so.
``good_gaussian_tail`` (``2 <= n <= MIN_TAIL_SCORES``)
    Too few scores even for a tail fit: ``mean + z * std`` with ``z`` the standard-normal
    ``(1-alpha)`` quantile, never below the highest score. A rough guess, stored with a
    warning and no upper bound.
``none`` (``n < 2``)
    No threshold at all. ``predict`` and the service then report ``is_anomalous: null``
    ("undecided") instead of guessing. The classic failure of other tools is a threshold
    that silently flags everything (e.g. F1-max on a validation set with no defects, or a
    threshold taken from the in-sample training scores of a model that memorizes them); here
    the fallback is explicit and visible.

The **pixel threshold** of defect regions (:mod:`flawscope.regions`) is the same estimator
applied to the largest map value of each calibration image (``map_max_per_image``): a good
image reports a region only if its map somewhere exceeds a value that at most ``alpha`` of
good images exceed, so at most ``alpha`` of good images report any region. It is stored as
``pixel_value`` (with ``pixel_method``).

A threshold can also be set from labelled validation images at the F1-max point
(``f1_max``; refused unless there are both good and defective images), or by hand
(``manual``); see ``flawscope threshold``.

The **normalized score** maps a raw score through a logistic curve so that the threshold
maps to 0.5 and the median calibration score to 0.1 (``scale = (threshold - median) /
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
from scipy import stats

from .errors import FlawscopeError

log = logging.getLogger(__name__)

DEFAULT_MAX_FALSE_ALARM = 0.01
#: Fewest calibration scores from which any threshold is derived.
MIN_GOOD_SCORES = 2
#: Fewest top scores (excesses) in a generalized-Pareto tail fit; with fewer calibration
#: scores than this plus one, the Gaussian tail is used.
MIN_TAIL_SCORES = 10
#: Bootstrap resamples of the tail fit's upper bound.
BOOTSTRAP = 2000
_LN9 = math.log(9.0)

METHODS = ("good_quantile", "good_pareto_tail", "good_gaussian_tail", "f1_max", "manual",
           "none")


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise FlawscopeError(f"max false-alarm rate must be between 0 and 0.5, got {alpha}")


def images_needed(alpha: float) -> int:
    """Calibration scores needed before the empirical (conformal) quantile exists."""
    return math.ceil(1 / alpha - 1)


def clopper_pearson(count: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a rate observed as ``count`` out of ``n``."""
    if n <= 0:
        raise FlawscopeError("a rate needs at least one observation")
    ci = stats.binomtest(int(count), int(n)).proportion_ci(level, method="exact")
    return float(ci.low), float(ci.high)


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


def decision_margin(threshold: dict[str, Any]) -> float | None:
    """How far a typical good part scores below the threshold, from a manifest's threshold
    entry: ``ln 9`` times its normalized-score ``scale`` (see :func:`_scale`), i.e. the
    threshold minus the median good calibration score where that is positive. None for an
    entry without a threshold."""
    if threshold.get("value") is None or not threshold.get("scale"):
        return None
    return float(threshold["scale"]) * _LN9


def gaussian_tail(scores: Sequence[float], alpha: float) -> float:
    """``mean + z_(1-alpha) * std`` of the scores, never below the highest one."""
    good = np.asarray(scores, dtype=np.float64)
    z = NormalDist().inv_cdf(1 - alpha)
    return max(float(good.mean() + z * good.std(ddof=1)), float(good.max()))


def tail_size(n: int) -> int:
    """Number of top scores the generalized-Pareto fit uses out of ``n``."""
    return min(n - 1, max(MIN_TAIL_SCORES, math.ceil(n / 4)))


def _pwm_gpd(excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Generalized-Pareto shape and scale of excesses ``(..., m)`` sorted ascending along the
    last axis, by probability-weighted moments (Hosking & Wallis 1987); vectorized over the
    leading axes. Shape in scipy's sign convention (positive = heavy tail)."""
    m = excess.shape[-1]
    a0 = excess.mean(-1)
    weights = (m - 1 - np.arange(m)) / (m - 1)        # (m - i) / (m - 1) for i = 1..m
    a1 = (excess * weights).mean(-1)
    denom = np.maximum(a0 - 2 * a1, 1e-300)
    shape = 2 - a0 / denom                            # Hosking's k is -shape
    scale = 2 * a0 * a1 / denom
    return shape, np.maximum(scale, 1e-300)


def _tail_exceedance(sorted_scores: np.ndarray, x: float | np.ndarray) -> np.ndarray:
    """Estimated ``P(score > x)`` from scores sorted along the last axis (vectorized)."""
    n = sorted_scores.shape[-1]
    m = tail_size(n)
    u = sorted_scores[..., n - m - 1]
    shape, scale = _pwm_gpd(sorted_scores[..., n - m:] - u[..., None])
    return m / n * stats.genpareto.sf(np.asarray(x) - u, shape, 0, scale)


def pareto_tail(scores: Sequence[float], alpha: float, seed: int = 0,
                bootstrap: int = BOOTSTRAP) -> tuple[float, float]:
    """Threshold with an estimated false-alarm rate ``alpha`` from a generalized-Pareto fit
    of the upper tail, and a 95% bootstrap upper bound of its false-alarm rate.

    Example: ``value, upper = pareto_tail(loo_scores, 0.01)``.
    """
    good = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(good)
    if n <= MIN_TAIL_SCORES:
        raise FlawscopeError(f"a tail fit needs more than {MIN_TAIL_SCORES} scores, got {n}")
    m = tail_size(n)
    u = good[n - m - 1]
    shape, scale = _pwm_gpd(good[n - m:] - u)
    value = max(float(u + stats.genpareto.isf(alpha * n / m, shape, 0, scale)),
                float(good[-1]))
    rng = np.random.default_rng(seed)
    resampled = np.sort(rng.choice(good, size=(bootstrap, n), replace=True), axis=1)
    upper = float(np.quantile(_tail_exceedance(resampled, value), 0.95))
    return value, upper


def from_calibration(calibration: dict[str, Any] | None,
                     alpha: float = DEFAULT_MAX_FALSE_ALARM) -> dict[str, Any]:
    """The threshold record of a calibration record (:mod:`flawscope.calibration`): image
    threshold from its scores, pixel threshold from its per-image map maxima."""
    calibration = calibration or {}
    record = from_good_scores(calibration.get("scores"), alpha,
                              calibration.get("map_max_per_image"))
    if calibration.get("method"):
        record["calibration"] = calibration["method"]
    return record


def from_good_scores(scores: Sequence[float] | None, alpha: float = DEFAULT_MAX_FALSE_ALARM,
                     pixel_scores: Sequence[float] | None = None) -> dict[str, Any]:
    """The threshold record (as stored in the manifest) for calibration good scores.

    ``pixel_scores``, the largest map value of each calibration image, adds the pixel
    threshold of defect regions (``pixel_value``) set by the same estimator.
    """
    check_alpha(alpha)
    good = np.sort(np.asarray(scores if scores is not None else [], dtype=np.float64))
    n = len(good)
    record: dict[str, Any] = {"max_false_alarm": alpha, "n_good": n,
                              "set_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if pixel_scores is not None and len(pixel_scores) >= MIN_GOOD_SCORES:
        pixel = _estimate(np.sort(np.asarray(pixel_scores, dtype=np.float64)), alpha)
        record.update(pixel_value=pixel[0], pixel_method=pixel[1])
    if n < MIN_GOOD_SCORES:
        record.update(value=None, method="none", scale=None, estimated_false_alarm=None,
                      false_alarm_upper=None, false_alarm_upper_free=None,
                      warning=f"only {n} calibration good image(s): no threshold was set, so "
                              "every prediction is 'undecided'. Refit with more good images "
                              "or --calibration loo, or set one with `flawscope threshold`.")
        return record
    value, method, upper = _estimate(good, alpha)
    needed = images_needed(alpha)
    # Distribution-free 95% bound from the count of calibration scores above the threshold
    # (Clopper-Pearson, one-sided): for the conformal quantile it is the Beta bound above.
    above = int(np.sum(good > value))
    free = float(stats.beta.ppf(0.95, above + 1, n - above))
    warning = None
    if method == "good_pareto_tail":
        warning = (f"only {n} calibration good images; measuring a {alpha:.2%} false-alarm "
                   f"rate needs at least {needed}. The threshold is extrapolated from a "
                   f"generalized-Pareto fit of their top {tail_size(n)} scores: estimated "
                   f"false-alarm rate {alpha:.2%}, 95% upper bound {upper:.2%} under that "
                   f"model; without it, {n} images only show it is below {free:.1%}.")
    elif method == "good_gaussian_tail":
        warning = (f"only {n} calibration good images; measuring a {alpha:.2%} false-alarm "
                   f"rate needs at least {needed}, and a tail fit more than "
                   f"{MIN_TAIL_SCORES}. The threshold is a guess from a normal fit of their "
                   "scores: its false-alarm rate is unknown.")
    record.update(value=value, method=method, scale=_scale(value, good),
                  estimated_false_alarm=float(np.mean(good > value)),
                  false_alarm_upper=upper, false_alarm_upper_free=free, warning=warning)
    return record


def _estimate(good: np.ndarray, alpha: float) -> tuple[float, str, float | None]:
    """(threshold, method, 95% upper bound of its false-alarm rate) from sorted scores."""
    n = len(good)
    if n >= images_needed(alpha):
        k = math.ceil((n + 1) * (1 - alpha))
        upper = float(stats.beta.ppf(0.95, n + 1 - k, k))
        return float(good[k - 1]), "good_quantile", upper
    if n > MIN_TAIL_SCORES:
        value, upper = pareto_tail(good, alpha)
        return value, "good_pareto_tail", upper
    return gaussian_tail(good, alpha), "good_gaussian_tail", None


def describe(record: dict[str, Any] | None) -> str:
    """One line on what a good-image threshold promises, for ``flawscope threshold``."""
    record = record or {}
    if record.get("value") is None or not str(record.get("method", "")).startswith("good"):
        return ""
    upper = record.get("false_alarm_upper")
    text = (f"target false-alarm rate {record['max_false_alarm']:.2%} from "
            f"{record.get('n_good')} calibration images ({record['method']}"
            f"{', ' + record['calibration'] if record.get('calibration') else ''})")
    text += (f"; 95% upper bound {upper:.2%}" if upper is not None
             else "; no upper bound (too few images)")
    if record.get("pixel_value") is not None:
        text += f"; region pixel threshold {record['pixel_value']:.6g}"
    return text


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
    """How a stored threshold does on labelled scores: false-alarm and detection rates, the
    counts they rest on and the Clopper-Pearson 95% interval of the false-alarm rate."""
    decide = Decision(record)
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    good, bad = labels == 0, labels == 1
    out: dict[str, Any] = {"threshold": decide.value, "n_good": int(good.sum()),
                           "n_defective": int(bad.sum()), "false_alarms": None,
                           "false_alarm_rate": None, "false_alarm_ci": None,
                           "detections": None, "detection_rate": None}
    if not decide.has_threshold:
        return out
    flagged = scores > decide.value
    out["threshold_method"] = decide.record.get("method")
    out["target_false_alarm"] = decide.record.get("max_false_alarm")
    if good.any():
        count = int(flagged[good].sum())
        out.update(false_alarms=count, false_alarm_rate=count / int(good.sum()),
                   false_alarm_ci=list(clopper_pearson(count, int(good.sum()))))
    if bad.any():
        count = int(flagged[bad].sum())
        out.update(detections=count, detection_rate=count / int(bad.sum()))
    return out
