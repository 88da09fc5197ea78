"""Decision thresholds from good images only, from labelled data, and what predict reports."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from flawscope import threshold as th
from flawscope.cli import cli
from flawscope.errors import FlawscopeError
from flawscope.modelfile import read_manifest


def test_quantile_with_enough_good_images_keeps_false_alarms_under_target():
    rng = np.random.default_rng(0)
    good = rng.gamma(4.0, 1.0, size=199)
    record = th.from_good_scores(good, 0.01)
    assert record["method"] == "good_quantile" and record["warning"] is None
    # ceil(200 * 0.99) = 198th smallest of 199: one held-out image above it.
    assert record["value"] == np.sort(good)[197]
    assert record["estimated_false_alarm"] == pytest.approx(1 / 199)
    # Given the calibration set the false-alarm rate is Beta(n + 1 - k, k) = Beta(2, 198).
    assert record["false_alarm_upper"] == pytest.approx(stats.beta.ppf(0.95, 2, 198))
    assert 0.02 < record["false_alarm_upper"] < 0.03
    # On fresh good images from the same distribution the false-alarm rate is near 1%.
    fresh = rng.gamma(4.0, 1.0, size=200_000)
    assert np.mean(fresh > record["value"]) < 0.03


def test_few_good_images_extrapolate_with_a_warning_and_flag_none_of_them():
    good = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95]
    record = th.from_good_scores(good, 0.01)
    assert record["method"] == "good_gaussian_tail"
    assert "only 6 calibration good images" in record["warning"] and "99" in record["warning"]
    assert "unknown" in record["warning"] and record["false_alarm_upper"] is None
    assert record["value"] >= max(good)
    assert record["value"] == pytest.approx(np.mean(good) + 2.3263 * np.std(good, ddof=1),
                                            rel=1e-4)
    decide = th.Decision(record)
    assert not any(decide.is_anomalous(s) for s in good)


@pytest.mark.parametrize("scores", [None, [], [1.0]])
def test_no_held_out_images_means_no_threshold_never_flag_everything(scores):
    record = th.from_good_scores(scores, 0.01)
    assert record["value"] is None and record["method"] == "none"
    assert "no threshold" in record["warning"]
    decide = th.Decision(record)
    assert decide(5.0) == {"score": 5.0, "normalized_score": None, "is_anomalous": None,
                           "threshold": None}


def test_normalized_score_maps_threshold_to_half_and_typical_good_to_a_tenth():
    good = [1.0, 2.0, 3.0, 2.5, 1.5]  # median 2.0
    decide = th.Decision(th.manual(4.0, good))
    assert decide.normalized(4.0) == pytest.approx(0.5)
    assert decide.normalized(2.0) == pytest.approx(0.1)
    assert decide.normalized(6.0) == pytest.approx(0.9)
    assert decide.normalized(-1e9) == 0.0 and decide.normalized(1e9) == 1.0
    assert decide.is_anomalous(4.0) is False and decide.is_anomalous(4.0001) is True


def test_f1_threshold_needs_defects_and_goods():
    with pytest.raises(FlawscopeError, match="needs good and defective"):
        th.from_labelled_scores([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(FlawscopeError, match="needs good and defective"):
        th.from_labelled_scores([1, 1], [0.1, 0.2])
    record = th.from_labelled_scores([0, 0, 0, 1, 1], [0.1, 0.2, 0.5, 0.5, 0.9])
    decide = th.Decision(record)
    # F1-max flags score >= 0.5; the stored value makes `score > value` agree exactly.
    assert [decide.is_anomalous(s) for s in (0.2, 0.5, 0.9)] == [False, True, True]
    assert record["f1"] == pytest.approx(0.8) and record["detection_rate"] == 1.0


@pytest.mark.parametrize("alpha", [0, 0.5, -0.1, 1.0])
def test_nonsense_false_alarm_targets_are_refused(alpha):
    with pytest.raises(FlawscopeError, match="between 0 and 0.5"):
        th.from_good_scores([1.0, 2.0], alpha)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_fit_threshold_predict_end_to_end(synth_root, tmp_path):
    data = synth_root / "synthetic_object"
    model_dir = tmp_path / "model"
    result = run("fit", "--data", data, "--out", model_dir, "--max-false-alarm", "0.2",
                 "--calibration", "holdout")
    assert result.exit_code == 0, result.output
    assert "threshold:" in result.output
    manifest = read_manifest(model_dir)
    record = manifest["threshold"]
    held = manifest["calibration"]["scores"]
    assert record["method"] == "good_quantile" and record["n_good"] == len(held) == 4
    assert record["value"] == sorted(held)[math.ceil(5 * 0.8) - 1]

    out = tmp_path / "pred"
    result = run("predict", "--model", model_dir, data / "test" / "stain",
                 data / "test" / "good", "--out", out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for line in lines:
        assert set(line) >= {"path", "score", "normalized_score", "is_anomalous", "heatmap"}
        assert line["is_anomalous"] == (line["score"] > record["value"])
        assert (line["normalized_score"] > 0.5) == line["is_anomalous"]
    stains = [x for x in lines if "/stain/" in x["path"]]
    assert all(x["is_anomalous"] for x in stains)
    assert "ANOMALOUS" in result.output

    result = run("threshold", model_dir, "--method", "f1", "--data", data)
    assert result.exit_code == 0, result.output
    assert read_manifest(model_dir)["threshold"]["method"] == "f1_max"
    result = run("threshold", model_dir, "--value", "123.5")
    assert result.exit_code == 0 and read_manifest(model_dir)["threshold"]["value"] == 123.5
    result = run("threshold", model_dir, "--method", "f1", "--data", data / "test" / "good")
    assert result.exit_code == 1 and "folder" in result.output.lower()
    # Back to good images: the image and the region (pixel) threshold, as fit set them.
    result = run("threshold", model_dir, "--method", "good", "--max-false-alarm", "0.2")
    assert result.exit_code == 0, result.output
    again = read_manifest(model_dir)["threshold"]
    assert again["value"] == record["value"] and again["pixel_value"] == record["pixel_value"]


def test_model_without_held_out_images_predicts_undecided(synth_root, tmp_path):
    data = synth_root / "synthetic_texture"
    result = run("fit", "--data", data, "--out", tmp_path / "m", "--calibration", "holdout",
                 "--holdout", "0")
    assert result.exit_code == 0, result.output
    assert "threshold: none" in result.output
    result = run("predict", "--model", tmp_path / "m", data / "test" / "hole", "--out",
                 tmp_path / "p")
    assert result.exit_code == 0, result.output
    jsonl = (tmp_path / "p" / "predictions.jsonl").read_text()
    lines = [json.loads(x) for x in jsonl.splitlines()]
    assert lines and all(x["is_anomalous"] is None for x in lines)
    assert "undecided" in result.output


def test_pareto_tail_extrapolates_a_heavy_tail_that_the_normal_fit_underestimates():
    """Scores with a Pareto (power-law) tail, P(X > x) = x^-4 for x >= 1. From 20 scores the
    1% point can only be extrapolated; over 300 draws the generalized-Pareto threshold's true
    false-alarm rate averages 2.5% (measured), the normal fit's 4.2%, and the highest score
    alone (the floor of both) 1/21 = 4.8%."""
    rng = np.random.default_rng(1)
    tail_fa, normal_fa, uppers, free = [], [], [], []
    for _ in range(300):
        good = rng.pareto(4.0, size=20) + 1.0
        record = th.from_good_scores(good, 0.01)
        assert record["method"] == "good_pareto_tail"
        tail_fa.append(record["value"] ** -4.0)
        normal_fa.append(th.gaussian_tail(good, 0.01) ** -4.0)
        uppers.append(record["false_alarm_upper"])
        free.append(record["false_alarm_upper_free"])
    assert np.mean(tail_fa) < 0.75 * np.mean(normal_fa)
    assert np.mean(tail_fa) < 0.8 / 21
    # The model's bootstrap bound is optimistic (above the true rate in 59% of draws); the
    # distribution-free one, 1 - 0.05^(1/20) = 13.9%, holds in at least 95% of draws.
    assert 0.4 < np.mean(np.array(uppers) >= np.array(tail_fa)) < 0.95
    assert free[0] == pytest.approx(1 - 0.05 ** (1 / 20))
    assert np.mean(np.array(free) >= np.array(tail_fa)) >= 0.95


def test_pareto_tail_record_says_what_it_is_never_silently():
    good = np.random.default_rng(0).gamma(4.0, 1.0, size=40)
    record = th.from_good_scores(good, 0.01)
    assert record["method"] == "good_pareto_tail" and record["value"] >= good.max()
    assert "generalized-Pareto" in record["warning"] and "upper bound" in record["warning"]
    assert 0.01 < record["false_alarm_upper"] < 0.2
    assert "95% upper bound" in th.describe(record)
    # The same scores at 5%: 40 >= 19 images, so the conformal quantile, no warning.
    assert th.from_good_scores(good, 0.05)["method"] == "good_quantile"


def test_probability_weighted_moments_recover_a_generalized_pareto():
    sample = stats.genpareto.rvs(0.2, scale=2.0, size=(20, 5000), random_state=3)
    shape, scale = th._pwm_gpd(np.sort(sample, axis=1))
    assert np.mean(shape) == pytest.approx(0.2, abs=0.03)
    assert np.mean(scale) == pytest.approx(2.0, rel=0.03)


def test_clopper_pearson_by_hand():
    # 0 of 10: the upper end solves (1 - p)^10 = 0.025.
    assert th.clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    lo, hi = th.clopper_pearson(3, 100)
    assert lo == pytest.approx(stats.beta.ppf(0.025, 3, 98))
    assert hi == pytest.approx(stats.beta.ppf(0.975, 4, 97))
    with pytest.raises(FlawscopeError):
        th.clopper_pearson(0, 0)


def test_rates_report_counts_and_interval():
    record = th.manual(0.5)
    r = th.rates(record, [0, 0, 0, 0, 1, 1, 1], [0.1, 0.6, 0.2, 0.3, 0.9, 0.4, 0.7])
    assert (r["false_alarms"], r["n_good"], r["detections"], r["n_defective"]) == (1, 4, 2, 3)
    assert r["false_alarm_rate"] == 0.25 and r["detection_rate"] == pytest.approx(2 / 3)
    assert r["false_alarm_ci"] == pytest.approx(list(th.clopper_pearson(1, 4)))
    none = th.rates(None, [0, 1], [0.1, 0.9])
    assert none["false_alarm_rate"] is None and none["n_good"] == 1


def test_pixel_threshold_uses_the_per_image_map_maxima():
    maxima = np.arange(1.0, 201.0)  # 200 images
    record = th.from_calibration({"scores": maxima / 10, "map_max_per_image": maxima,
                                  "method": "loo"}, 0.01)
    # ceil(201 * 0.99) = 199th smallest of the maxima: 2 of 200 images (1%) exceed it.
    assert record["pixel_value"] == 199.0 and record["pixel_method"] == "good_quantile"
    assert record["calibration"] == "loo" and record["value"] == pytest.approx(19.9)
