"""Decision thresholds from good images only, from labelled data, and what predict reports."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

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
    # On fresh good images from the same distribution the false-alarm rate is near 1%.
    fresh = rng.gamma(4.0, 1.0, size=200_000)
    assert np.mean(fresh > record["value"]) < 0.03


def test_few_good_images_extrapolate_with_a_warning_and_flag_none_of_them():
    good = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95]
    record = th.from_good_scores(good, 0.01)
    assert record["method"] == "good_gaussian_tail"
    assert "only 6 held-out good images" in record["warning"] and "99" in record["warning"]
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
    result = run("fit", "--data", data, "--out", model_dir, "--max-false-alarm", "0.2")
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


def test_model_without_held_out_images_predicts_undecided(synth_root, tmp_path):
    data = synth_root / "synthetic_texture"
    result = run("fit", "--data", data, "--out", tmp_path / "m", "--holdout", "0")
    assert result.exit_code == 0, result.output
    assert "threshold: none" in result.output
    result = run("predict", "--model", tmp_path / "m", data / "test" / "hole", "--out",
                 tmp_path / "p")
    assert result.exit_code == 0, result.output
    jsonl = (tmp_path / "p" / "predictions.jsonl").read_text()
    lines = [json.loads(x) for x in jsonl.splitlines()]
    assert lines and all(x["is_anomalous"] is None for x in lines)
    assert "undecided" in result.output
