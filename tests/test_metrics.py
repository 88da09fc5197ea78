"""Every metric against values worked out by hand."""

import numpy as np
import pytest

from flawscope import metrics

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_image_auroc_counts_correctly_ordered_pairs():
    # Pairs (defect, good): 0.35>0.1 yes, 0.35>0.4 no, 0.8>both yes -> 3 of 4.
    assert metrics.image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_image_ap_is_precision_weighted_by_recall_steps():
    # Ranked: 0.8 (defect) P=1 R=.5; 0.4 (good); 0.35 (defect) P=2/3 R=1.
    assert metrics.image_ap(LABELS, SCORES) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_f1_max_and_its_threshold():
    # t=0.35 flags {0.8, 0.4, 0.35}: P=2/3, R=1, F1=0.8 (best; t=0.8 gives 2/3).
    f1, threshold = metrics.f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_per_defect_auroc_compares_each_type_with_good_only():
    types = ["good", "good", "crack", "hole"]
    assert metrics.per_defect_auroc(types, SCORES) == {"crack": 0.5, "hole": 1.0}


def test_image_metrics_refuse_a_single_class():
    with pytest.raises(ValueError, match="both good"):
        metrics.image_auroc([1, 1], [0.2, 0.3])


def test_pixel_auroc_on_a_tiny_map():
    masks = np.array([[[0, 1], [0, 1]]], dtype=bool)
    maps = np.array([[[0.1, 0.9], [0.5, 0.4]]], dtype=np.float32)
    # Defect pixels {0.9, 0.4} vs normal {0.1, 0.5}: 0.9 beats both, 0.4 beats one -> 3/4.
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.75)


def test_aupro_on_one_region_worked_by_hand():
    # 10 normal pixels, one region of 2 pixels, in a 1x12 image.
    scores = np.array([0.9, 0.5, 0.7] + [0.01 * k for k in range(1, 10)], dtype=np.float32)
    mask = np.zeros(12, dtype=bool)
    mask[:2] = True
    # Curve: (0,0) (0,.5)@0.9 (.1,.5)@0.7 (.1,1)@0.5 then FPR grows with PRO=1.
    # Area to FPR .3: .1*.5 + .2*1 = .25; normalized: .25/.3.
    value = metrics.aupro(mask.reshape(1, 1, 12), scores.reshape(1, 1, 12))
    assert value == pytest.approx(0.25 / 0.3)


def test_aupro_averages_regions_not_pixels():
    # Image 1: region A (1 pixel, score 1.0) + 5 normal; image 2: region B (3 pixels, score
    # 0.2) + 3 normal. All 8 normal pixels score 0.3..0.37, above B. Up to FPR 0.3 only A is
    # found, so PRO = mean(1, 0) = 0.5 throughout (pixel overlap would be 1/4).
    masks = np.zeros((2, 1, 6), dtype=bool)
    maps = np.zeros((2, 1, 6), dtype=np.float32)
    masks[0, 0, 0] = True
    maps[0, 0] = [1.0, 0.30, 0.31, 0.32, 0.33, 0.34]
    masks[1, 0, :3] = True
    maps[1, 0] = [0.2, 0.2, 0.2, 0.35, 0.36, 0.37]
    assert metrics.aupro(masks, maps) == pytest.approx(0.5)


def test_pro_regions_are_eight_connected():
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    maps = np.zeros((1, 3, 3), dtype=np.float32)
    maps[0, 0, 0] = 1.0  # finds half of that one region first
    fpr, pro = metrics.pro_curve(masks, maps)
    assert pro[1] == pytest.approx(0.5)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_perfect_maps_give_perfect_pixel_metrics():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 16, 16)) > 0.9
    maps = masks + rng.random(masks.shape).astype(np.float32) * 0.5
    assert metrics.pixel_auroc(masks, maps) == 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(1.0)


def test_compute_all_reports_none_where_undefined():
    result = metrics.compute_all([0, 0], [0.1, 0.2], ["good", "good"])
    assert result["image_auroc"] is None and result["pixel_aupro"] is None
