"""Streaming pixel metrics against the exact ones and MVTec AD's official AU-PRO procedure."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
from conftest import shared_category
from PIL import Image
from scipy import ndimage

from flawscope import metrics
from flawscope.data import open_category
from flawscope.pixelmetrics import PixelMetrics

# The acceptance bound on |streamed - exact| for pixel AUROC and AU-PRO.
TOLERANCE = 1e-4


# ------------------------------------------------------------------ official reference
def official_pro_curve(anomaly_maps, ground_truth_maps):
    """The PRO curve as MVTec AD's evaluation code computes it (compute_pro in
    mvtec_ad_evaluation/pro_curve_util.py, Bergmann et al. 2021), step by step: per-pixel
    FPR increments (uint32) and PRO increments (1 / region size, float64), one descending
    sort of all scores, cumulative sums with the FPR turned into float32, the last point of
    every run of tied scores kept, values clipped at 1, (0, 0) and (1, 1) added at the ends.
    Written from the published procedure; maps of one shape, as the original requires.
    """
    n_maps = len(anomaly_maps)
    height, width = anomaly_maps[0].shape
    fp_step = np.zeros((n_maps, height, width), dtype=np.uint32)
    pro_step = np.zeros((n_maps, height, width), dtype=np.float64)
    n_ok, n_regions = 0, 0
    for i, truth in enumerate(ground_truth_maps):
        labelled, count = ndimage.label(truth, np.ones((3, 3), dtype=int))
        n_regions += count
        ok = labelled == 0
        n_ok += int(ok.sum())
        fp_step[i][ok] = 1
        for k in range(1, count + 1):
            region = labelled == k
            pro_step[i][region] = 1.0 / region.sum()
    scores = np.array(anomaly_maps).ravel()
    order = np.argsort(scores).astype(np.uint32)[::-1]
    scores = scores[order]
    fprs = np.cumsum(fp_step.ravel()[order]).astype(np.float32) / np.float32(n_ok)
    pros = np.cumsum(pro_step.ravel()[order]) / n_regions
    last_of_tie = np.append(np.diff(scores) != 0, True)
    fprs = np.clip(fprs[last_of_tie], None, 1.0)
    pros = np.clip(pros[last_of_tie], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def official_trapezoid(x, y, x_max):
    """The official area routine (generic_util.trapezoid): finite points only, the last
    trapezoid cut at x_max with linear interpolation."""
    x, y = np.asarray(x), np.asarray(y)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def official_aupro(maps, masks, limit=0.3):
    fprs, pros = official_pro_curve(maps, masks)
    return official_trapezoid(fprs, pros, limit) / limit


# ------------------------------------------------------------------ data
def realistic_map(rng, mask, blur=3.0, gain=2.0):
    """An anomaly map like a feature model's: blurred defect, smooth and pixel noise, a
    false-alarm blob, a per-image offset."""
    height, width = mask.shape
    amap = gain * ndimage.gaussian_filter(mask.astype(np.float64), blur)
    amap += 0.4 * ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), 4) * 4
    amap += rng.normal(0, 0.05, (height, width))
    y, x = rng.integers(0, height), rng.integers(0, width)
    yy, xx = np.ogrid[:height, :width]
    amap += 0.6 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (height / 30) ** 2))
    return (amap + rng.uniform(-0.1, 0.1)).astype(np.float32)


def random_masks(rng, n, height, width, n_good):
    masks = np.zeros((n, height, width), dtype=bool)
    yy, xx = np.ogrid[:height, :width]
    for i in range(n_good, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, height), rng.integers(0, width)
            ry, rx = rng.uniform(1, height / 8), rng.uniform(0.5, width / 8)
            masks[i] |= ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1
        if rng.random() < 0.5:  # a thin line: many pixels, few regions
            masks[i, rng.integers(height), : width // 2] = True
    return masks


def streamed(maps, masks, **kwargs):
    acc = PixelMetrics(**kwargs)
    for amap, mask in zip(maps, masks, strict=True):
        acc.add(amap, mask if mask.any() else None)
    return acc, acc.result()


@pytest.fixture(scope="module")
def synthetic_set():
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 16, 96, 128, n_good=5)
    maps = np.stack([realistic_map(rng, m) for m in masks])
    return maps, masks


# ------------------------------------------------------------------ agreement
def test_exact_aupro_matches_the_official_procedure(synthetic_set):
    maps, masks = synthetic_set
    # The official code turns FPR into float32 (relative error 6e-8 per point).
    assert metrics.aupro(masks, maps) == pytest.approx(official_aupro(maps, masks), abs=1e-6)


def test_streamed_metrics_agree_with_exact_and_official(synthetic_set):
    maps, masks = synthetic_set
    _, result = streamed(maps, masks)
    exact_auroc, exact_aupro = metrics.pixel_auroc(masks, maps), metrics.aupro(masks, maps)
    assert 0.6 < exact_aupro < 0.99 and 0.8 < exact_auroc < 0.999  # not a trivial case
    assert abs(result["pixel_auroc"] - exact_auroc) <= TOLERANCE
    assert abs(result["pixel_aupro"] - exact_aupro) <= TOLERANCE
    assert abs(result["pixel_aupro"] - official_aupro(maps, masks)) <= TOLERANCE
    assert result["pixel_auroc_max_error"] < TOLERANCE
    assert result["pixel_aupro_max_error"] < TOLERANCE


@pytest.mark.parametrize("bins", [1024, 4096])
def test_the_error_bound_holds_even_with_coarse_bins(synthetic_set, bins):
    maps, masks = synthetic_set
    _, result = streamed(maps, masks, bins=bins)
    exact_auroc, exact_aupro = metrics.pixel_auroc(masks, maps), metrics.aupro(masks, maps)
    auroc_error = abs(result["pixel_auroc"] - exact_auroc)
    aupro_error = abs(result["pixel_aupro"] - exact_aupro)
    # The bound is a worst case, so the real error must not pass it (1e-12: float sums).
    assert auroc_error <= result["pixel_auroc_max_error"] + 1e-12
    assert aupro_error <= result["pixel_aupro_max_error"] + 1e-12
    # And coarse bins really do lose something the bound reports.
    assert result["pixel_aupro_max_error"] > 1e-5


def test_images_of_different_sizes_are_each_labelled_at_their_own_size():
    rng = np.random.default_rng(2)
    shapes = [(64, 64), (40, 90), (90, 33), (64, 64), (20, 120)]
    masks = [random_masks(rng, 1, h, w, n_good=0)[0] for h, w in shapes]
    masks[3][:] = False  # a good image
    maps = [realistic_map(rng, m, blur=2.0) for m in masks]
    _, result = streamed(maps, masks)
    region, scores = flatten_per_image(maps, masks)
    assert abs(result["pixel_auroc"] - metrics.pixel_auroc(region > 0, scores)) <= TOLERANCE
    exact_aupro = metrics.area_to_limit(*_pro_curve_of_regions(region, scores))
    assert abs(result["pixel_aupro"] - exact_aupro) <= TOLERANCE


def flatten_per_image(maps, masks):
    """All pixels in one row with global region ids (0 = normal), labelled per image."""
    region, offset = [], 0
    for mask in masks:
        labelled, count = ndimage.label(mask, np.ones((3, 3)))
        region.append(np.where(labelled > 0, labelled + offset, 0).ravel())
        offset += count
    return np.concatenate(region), np.concatenate([m.ravel() for m in maps])


def _pro_curve_of_regions(region, scores):
    """Exact PRO curve given each pixel's global region id (0 = normal)."""
    sizes = np.bincount(region).astype(np.float64)
    weight = np.r_[0.0, 1.0 / (sizes[1:] * (len(sizes) - 1))]
    order = np.argsort(scores, kind="stable")[::-1]
    fpr = np.cumsum(region[order] == 0) / sizes[0]
    pro = np.cumsum(weight[region[order]])
    last = np.r_[scores[order][1:] != scores[order][:-1], True]
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


# ------------------------------------------------------------------ behaviour
def test_one_region_worked_by_hand():
    # Same case as the exact test: curve (0,0) (0,.5) (.1,.5) (.1,1), then PRO 1.
    scores = np.array([0.9, 0.5, 0.7] + [0.01 * k for k in range(1, 10)], dtype=np.float32)
    mask = np.zeros(12, dtype=bool)
    mask[:2] = True
    acc = PixelMetrics()
    acc.add(scores.reshape(1, 12), mask.reshape(1, 12))
    result = acc.result()
    # Every score has a bin of its own here, so the values are exact.
    assert result["pixel_aupro"] == pytest.approx(0.25 / 0.3, abs=1e-12)
    assert result["pixel_aupro_max_error"] == 0.0
    # Defect pixels 0.9 and 0.5 against 10 normal: 10 + 9 of 20 pairs ordered correctly.
    assert result["pixel_auroc"] == pytest.approx(19 / 20, abs=1e-12)


def test_bins_widen_exactly_as_binning_at_the_final_width_would():
    rng = np.random.default_rng(9)
    masks = random_masks(rng, 6, 32, 32, n_good=2)
    # Growing ranges in both directions force several merges after the first image.
    maps = [realistic_map(rng, m) * (3.0 ** i) - i for i, m in enumerate(masks)]
    grown, _ = streamed(maps, masks, bins=1024)
    direct = PixelMetrics(bins=1024)
    direct.width, direct.first = grown.width, grown.first
    for amap, mask in zip(maps, masks, strict=True):
        direct.add(amap, mask)
    assert grown.width > PixelMetrics(bins=1024, score_range=(maps[0].min(), maps[0].max())).width
    np.testing.assert_array_equal(grown.normal, direct.normal)
    np.testing.assert_array_equal(grown.defect, direct.defect)
    # Sums of 1 / region size in another order: equal to float64 rounding.
    np.testing.assert_allclose(grown.overlap, direct.overlap, rtol=1e-12, atol=1e-15)


def test_image_order_does_not_change_the_result(synthetic_set):
    maps, masks = synthetic_set
    _, forward = streamed(maps, masks)
    _, backward = streamed(maps[::-1], masks[::-1])
    for key in ("pixel_auroc", "pixel_aupro"):
        # Different orders may end at different bin widths; each is within its own bound of
        # the exact value (1e-12: float sums).
        bounds = forward[f"{key}_max_error"] + backward[f"{key}_max_error"]
        assert abs(forward[key] - backward[key]) <= bounds + 1e-12


def test_no_defect_pixels_gives_none_not_zero():
    rng = np.random.default_rng(0)
    acc = PixelMetrics()
    acc.add(rng.random((8, 8)), None)
    acc.add(rng.random((8, 8)), np.zeros((8, 8), dtype=bool))
    assert acc.result()["pixel_auroc"] is None and acc.result()["pixel_aupro"] is None
    assert PixelMetrics().result()["pixel_aupro"] is None  # nothing added at all


def test_defective_images_without_masks_give_none_not_zero():
    # A category without ground_truth/: every image, good or defective, comes without mask.
    acc = PixelMetrics()
    acc.add(np.full((16, 16), 0.1, np.float32), None)
    acc.add(np.full((16, 16), 0.9, np.float32), None)
    assert acc.result()["pixel_auroc"] is None and acc.result()["pixel_aupro"] is None


def test_constant_first_map_then_a_wide_one():
    acc = PixelMetrics(bins=1024)
    acc.add(np.zeros((4, 4), np.float32), None)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    amap = np.zeros((4, 4), np.float32)
    amap[0, 0] = 1e6
    acc.add(amap, mask)
    assert acc.result()["pixel_auroc"] == 1.0 and acc.result()["pixel_aupro"] == 1.0


def test_an_extreme_outlier_costs_precision_and_says_so(synthetic_set, caplog):
    maps, masks = synthetic_set
    maps = maps.copy()
    maps[-1, 0, 0] = 1e9  # one broken pixel: the bins must widen a billion-fold
    with caplog.at_level("WARNING", logger="flawscope.pixelmetrics"):
        _, result = streamed(maps, masks)
    exact_aupro = metrics.aupro(masks, maps)
    assert result["pixel_aupro_max_error"] > TOLERANCE
    assert abs(result["pixel_aupro"] - exact_aupro) <= result["pixel_aupro_max_error"] + 1e-12
    assert "may differ from the exact values" in caplog.text


def test_bad_input_is_refused_clearly():
    acc = PixelMetrics()
    with pytest.raises(ValueError, match="differ in shape"):
        acc.add(np.zeros((4, 4)), np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="NaN or infinite"):
        acc.add(np.full((2, 2), np.nan), None)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        acc.add(np.zeros((2, 2, 3)), None)
    with pytest.raises(ValueError, match="power of two"):
        PixelMetrics(bins=1000)


# ------------------------------------------------------------------ real masks
@pytest.mark.slow
@pytest.mark.parametrize("category", ["mvtec_ad/screw", "mvtec_ad/toothbrush",
                                      "magnetic_tile/magnetic_tile", "battery_weld/welding"])
def test_real_masks_at_native_size_agree_with_exact_and_official(category):
    items = open_category(shared_category(*category.split("/"))).test
    rng = np.random.default_rng(0)
    # A subset keeps the exact and official computations to a few GB and seconds.
    defective = [t for t in items if t.mask_path is not None][:20]
    good = [t for t in items if not t.is_anomalous][:6]
    masks = [np.asarray(Image.open(t.mask_path).convert("L")) > 127 for t in defective]
    # Good images first, so that the bins start narrow and must widen; they take the size
    # of the first defective image (magnetic tiles vary in size).
    masks = [np.zeros_like(masks[0]) for _ in good] + masks
    maps = [realistic_map(rng, m, blur=0.01 * max(m.shape), gain=rng.uniform(0.4, 1.2))
            for m in masks]
    _, result = streamed(maps, masks)
    same_shape = len({m.shape for m in masks}) == 1
    if same_shape:
        exact_auroc = metrics.pixel_auroc(np.stack(masks), np.stack(maps))
        exact_aupro = metrics.aupro(np.stack(masks), np.stack(maps))
        official = official_aupro(maps, masks)
        assert abs(result["pixel_aupro"] - official) <= TOLERANCE
    else:  # exact reference over flattened pixels, regions labelled per image
        region, scores = flatten_per_image(maps, masks)
        exact_auroc = metrics.pixel_auroc(region > 0, scores)
        exact_aupro = metrics.area_to_limit(*_pro_curve_of_regions(region, scores))
    print(f"\n{category}: {len(masks)} maps, {sum(m.size for m in masks) / 1e6:.1f} Mpx; "
          f"exact AUROC {exact_auroc:.6f} AU-PRO {exact_aupro:.6f}; streamed - exact: "
          f"AUROC {result['pixel_auroc'] - exact_auroc:+.1e} "
          f"(bound {result['pixel_auroc_max_error']:.1e}), AU-PRO "
          f"{result['pixel_aupro'] - exact_aupro:+.1e} "
          f"(bound {result['pixel_aupro_max_error']:.1e})"
          + (f"; streamed - official AU-PRO {result['pixel_aupro'] - official:+.1e}"
             if same_shape else ""))
    assert abs(result["pixel_auroc"] - exact_auroc) <= TOLERANCE
    assert abs(result["pixel_aupro"] - exact_aupro) <= TOLERANCE
    assert result["pixel_aupro_max_error"] < TOLERANCE
