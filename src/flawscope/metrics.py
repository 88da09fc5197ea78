"""Evaluation metrics, as functions of plain NumPy arrays.

Image level (one score per image, label 1 = defective): ROC AUC, average precision (the area
under the precision-recall curve, as scikit-learn computes it), F1-max with its threshold, and
ROC AUC per defect type (each type against the good images only).

Pixel level (anomaly maps against ground-truth masks): ROC AUC over all pixels, and AU-PRO,
the area under the per-region-overlap curve up to a false-positive rate of 0.3, normalized to
[0, 1] (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021). Both are exact
(every distinct score is a threshold). They hold maps as float32 (never the whole category
as float64) but sort all pixels, which costs about 50 bytes per pixel at the peak: a
1,000-image category at 256 x 256 needs about 3.3 GB. For evaluation at each mask's own
resolution, :class:`flawscope.pixelmetrics.PixelMetrics` computes both pixel metrics one
image at a time in fixed memory, within a reported bound (about 1e-6) of these values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _check_labels(labels: np.ndarray) -> None:
    if labels.min() == labels.max():
        raise ValueError("need both good (0) and defective (1) samples")


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of image scores (label 1 = defective)."""
    labels = np.asarray(labels).astype(int)
    _check_labels(labels)
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def image_ap(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Average precision, scikit-learn's step-wise area under the precision-recall curve."""
    labels = np.asarray(labels).astype(int)
    _check_labels(labels)
    return float(average_precision_score(labels, np.asarray(scores, dtype=np.float64)))


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (score >= t is defective)."""
    labels = np.asarray(labels).astype(int)
    _check_labels(labels)
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores, float))
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def per_defect_auroc(defect_types: Sequence[str], scores: Sequence[float],
                     good: str = "good") -> dict[str, float]:
    """Image ROC AUC of each defect type against the good images."""
    types = np.asarray(defect_types)
    scores = np.asarray(scores, dtype=np.float64)
    is_good = types == good
    if not is_good.any():
        raise ValueError("per-defect AUROC needs good images")
    result = {}
    for kind in sorted(set(types[~is_good].tolist())):
        chosen = is_good | (types == kind)
        result[kind] = float(roc_auc_score((types[chosen] == kind).astype(int), scores[chosen]))
    return result


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels of all images; ``masks`` bool, ``maps`` same shape."""
    masks = np.asarray(masks, dtype=bool).ravel()
    if masks.all() or not masks.any():
        raise ValueError("pixel AUROC needs both defect and normal pixels")
    return float(roc_auc_score(masks, np.asarray(maps, dtype=np.float32).ravel()))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive rate and per-region overlap for every distinct score threshold.

    A region is a connected component (8-connectivity) of a ground-truth mask; its overlap
    at threshold t is the fraction of its pixels with score >= t, and PRO is the mean over
    all regions of all images. FPR is the fraction of normal pixels with score >= t.
    The curve starts at (0, 0) and ends at (1, 1).
    """
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float32)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    # Global region ids: 0 = normal pixel, 1..R = defect regions (int32 to save memory).
    region = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        region[i] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += count
    if n_regions == 0 or masks.all():
        raise ValueError("AU-PRO needs defect regions and normal pixels")
    region = region.ravel()
    region_size = np.bincount(region, minlength=n_regions + 1).astype(np.float64)
    # What one pixel of each region adds to the PRO curve when the threshold passes it.
    pixel_weight = np.r_[0.0, 1.0 / (region_size[1:] * n_regions)]
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    sorted_scores = maps.ravel()[order]
    sorted_region = region[order]
    del order, region
    fpr = np.cumsum(sorted_region == 0, dtype=np.float64)
    fpr /= region_size[0]
    pro = np.cumsum(pixel_weight[sorted_region])
    # Among tied scores only the last position is a real threshold.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr, pro = fpr[last_of_tie], pro[last_of_tie]
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Trapezoid area under a PRO curve for FPR in [0, fpr_limit], divided by fpr_limit.

    ``fpr`` ascending from 0; the curve is cut at the limit, interpolating PRO there.
    """
    keep = fpr <= fpr_limit
    fpr_cut, pro_cut = fpr[keep], pro[keep]
    if fpr_cut[-1] < fpr_limit:
        pro_at_limit = np.interp(fpr_limit, fpr, pro)
        fpr_cut = np.r_[fpr_cut, fpr_limit]
        pro_cut = np.r_[pro_cut, pro_at_limit]
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit."""
    fpr, pro = pro_curve(masks, maps)
    return area_to_limit(fpr, pro, fpr_limit)


def compute_all(labels: Sequence[int], scores: Sequence[float], defect_types: Sequence[str],
                masks: np.ndarray | None = None, maps: np.ndarray | None = None) -> dict:
    """Every metric flawscope reports, as a JSON-ready dict (None where undefined)."""
    labels = np.asarray(labels).astype(int)
    result: dict = {"image_auroc": None, "image_ap": None, "f1_max": None,
                    "f1_threshold": None, "pixel_auroc": None, "pixel_aupro": None,
                    "per_defect": {}}
    if labels.min() != labels.max():
        result["image_auroc"] = image_auroc(labels, scores)
        result["image_ap"] = image_ap(labels, scores)
        result["f1_max"], result["f1_threshold"] = f1_max(labels, scores)
        result["per_defect"] = per_defect_auroc(defect_types, scores)
    if masks is not None and maps is not None and masks.any() and not masks.all():
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["pixel_aupro"] = aupro(masks, maps)
    return result
