"""The CLI verbs end to end on small synthetic data, through the real command parser."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flawscope.cli import cli
from flawscope.data import ImageDataset, open_category
from flawscope.modelfile import load_model
from flawscope.models import available_models


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def fitted(synth_root, tmp_path_factory):
    """gaussian fitted and tested on the synthetic object through the CLI."""
    out = tmp_path_factory.mktemp("cli")
    before = snapshot(synth_root)
    data = synth_root / "synthetic_object"
    fit = run("fit", "--data", data, "--model", "gaussian", "--out", out / "model")
    assert fit.exit_code == 0, fit.output
    test = run("test", "--model", out / "model", "--data", data, "--out", out / "results")
    assert test.exit_code == 0, test.output
    assert snapshot(synth_root) == before, "nothing may be written into a dataset"
    return out, data, test.output


def test_fit_and_test_write_metrics_and_find_synthetic_defects(fitted):
    out, _, output = fitted
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "f1_max",
                "f1_threshold", "per_defect", "model", "dataset", "n_images", "fit_s",
                "infer_img_per_s", "peak_rss_mb"):
        assert key in metrics, key
    assert metrics["model"] == "gaussian" and metrics["n_images"] == 30
    assert metrics["image_auroc"] > 0.9
    assert metrics["pixel_auroc"] > 0.9
    assert set(metrics["per_defect"]) == {"crack", "missing_piece", "scratch", "stain"}
    assert "image AUROC" in output
    with open(out / "results" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and {r["label"] for r in rows} == {"0", "1"}


def test_saved_model_scores_exactly_like_the_fitted_one(fitted, synth_root):
    from flawscope.pipeline import fit_model

    out, data, _ = fitted
    fresh = fit_model(data, "gaussian", out / "again")
    loaded, manifest = load_model(out / "again")
    images = torch.stack([ImageDataset(open_category(data).train, 128)[i] for i in range(4)])
    s1, m1 = fresh.model.score_tensor(images)
    s2, m2 = loaded.score_tensor(images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert manifest["model"] == "gaussian" and manifest["calibration"]["n_images"] == 4
    assert manifest["fit_info"]["n_train"] == 36


def test_predict_writes_scores_and_heatmaps(fitted, tmp_path):
    out, data, _ = fitted
    result = run("predict", "--model", out / "model", data / "test" / "stain",
                 data / "test" / "good" / "000.png", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert all(np.isfinite(x["score"]) for x in lines)
    heatmap = tmp_path / "000_heatmap.png"
    assert heatmap.is_file()
    stain_scores = [x["score"] for x in lines[:5]]
    assert min(stain_scores) > lines[5]["score"]  # stains score above the good image


def test_predict_on_a_corrupt_file_is_a_clean_error(fitted, tmp_path):
    out, _, _ = fitted
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = run("predict", "--model", out / "model", bad, "--out", tmp_path / "p")
    assert result.exit_code != 0
    assert "broken.jpg" in result.output and "Traceback" not in result.output


def test_unknown_model_and_bad_setting_are_clean_errors(synth_root, tmp_path):
    data = synth_root / "synthetic_object"
    result = run("fit", "--data", data, "--model", "nope", "--out", tmp_path / "m")
    assert result.exit_code != 0 and "unknown model 'nope'" in result.output
    result = run("fit", "--data", data, "--set", "sigma=abc", "--out", tmp_path / "m")
    assert result.exit_code != 0 and "sigma" in result.output


def test_model_directory_that_is_not_one_is_a_clean_error(tmp_path):
    result = run("test", "--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "r")
    assert result.exit_code != 0 and "not a flawscope model directory" in result.output


def test_benchmark_writes_tables_and_skips_finished_pairs(synth_root, tmp_path):
    args = ("benchmark", "--data", synth_root, "--models", "gaussian",
            "--categories", "synthetic_texture,synthetic_object", "--out", tmp_path)
    result = run(*args)
    assert result.exit_code == 0, result.output
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["category"] for r in rows] == ["synthetic_texture", "synthetic_object"]
    assert list(rows[0])[:10] == ["model", "category", "image_auroc", "image_ap", "pixel_auroc",
                                  "pixel_aupro", "f1_max", "fit_s", "infer_img_per_s",
                                  "peak_rss_mb"]
    assert all(float(r["image_auroc"]) > 0.8 and float(r["peak_rss_mb"]) > 0 for r in rows)
    assert "| gaussian | synthetic_object |" in (tmp_path / "results.md").read_text()
    finished = tmp_path / "gaussian" / "synthetic_object" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    assert run(*args).exit_code == 0
    assert finished.stat().st_mtime_ns == stamp


def test_benchmark_rejects_an_unknown_category_before_fitting(synth_root, tmp_path):
    result = run("benchmark", "--data", synth_root, "--models", "gaussian",
                 "--categories", "carpet", "--out", tmp_path)
    assert result.exit_code != 0 and "carpet" in result.output


def test_benchmark_set_reaches_every_fit_and_a_bad_key_fails_before_fitting(synth_root,
                                                                            tmp_path):
    args = ("benchmark", "--data", synth_root, "--models", "gaussian",
            "--categories", "synthetic_object")
    result = run(*args, "--set", "sigma=3.5", "--set", "image_size=64", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    manifest = json.loads(
        (tmp_path / "a" / "gaussian" / "synthetic_object" / "model" / "manifest.json").read_text())
    assert manifest["config"]["sigma"] == 3.5 and manifest["config"]["image_size"] == 64
    result = run(*args, "--set", "sigma_typo=1", "--out", tmp_path / "b")
    assert result.exit_code != 0 and "sigma_typo" in result.output
    assert not (tmp_path / "b" / "gaussian").exists()


def test_synth_verb_and_models_verb(tmp_path):
    result = run("synth", tmp_path, "--size", "48", "--train", "3", "--test-good", "1",
                 "--test-defect", "1", "--categories", "synthetic_texture")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "synthetic_texture" / "train" / "good").iterdir())) == 3
    listing = run("models")
    assert listing.exit_code == 0
    lines = listing.output.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(available_models())
    assert all(line.endswith(".") for line in lines), lines  # whole sentences, not cut off


def test_demo_is_the_main_job_on_built_in_data(tmp_path):
    result = run("demo", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "| gaussian | synthetic_texture |" in result.output
    assert "| gaussian | synthetic_object |" in result.output
    assert (tmp_path / "results" / "results.csv").is_file()
