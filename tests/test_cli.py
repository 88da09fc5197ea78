"""The CLI verbs end to end on small synthetic data, through the real command parser."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

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
    fit = run("fit", "--data", data, "--model", "gaussian", "--calibration", "holdout",
              "--out", out / "model")
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
    # The API's default calibration (auto: leave-one-out for the gaussian baseline) fits on
    # all 40 good images and calibrates on all of them.
    assert manifest["model"] == "gaussian" and manifest["calibration"]["n_images"] == 40
    assert manifest["fit_info"]["n_train"] == 40 and manifest["calibration"]["method"] == "loo"


def test_predict_writes_scores_and_heatmaps(fitted, tmp_path):
    out, data, _ = fitted
    result = run("predict", "--model", out / "model", data / "test" / "stain",
                 data / "test" / "good" / "000.png", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert all(np.isfinite(x["score"]) and x["error"] is None for x in lines)
    assert (tmp_path / "heatmaps" / "stain" / "000.png").is_file()
    assert (tmp_path / "heatmaps" / "000.png").is_file()
    stain_scores = [x["score"] for x in lines[:5]]
    assert min(stain_scores) > lines[5]["score"]  # stains score above the good image


def test_predict_on_folders_with_equal_file_names_keeps_every_heat_map(fitted, tmp_path):
    out, data, _ = fitted
    result = run("predict", "--model", out / "model", data / "test" / "crack",
                 data / "test" / "good", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    heatmaps = {r["heatmap"] for r in records}
    assert len(records) == 15 and len(heatmaps) == 15
    assert all(Path(h).is_file() for h in heatmaps)
    assert str(tmp_path / "heatmaps" / "crack" / "000.png") in heatmaps
    assert str(tmp_path / "heatmaps" / "good" / "000.png") in heatmaps


def test_predict_goes_on_past_bad_files_and_says_so_in_the_exit_code(fitted, tmp_path):
    out, data, _ = fitted
    folder = tmp_path / "line"
    (folder / "station2").mkdir(parents=True)
    good = sorted((data / "test" / "good").glob("*.png"))
    for i, path in enumerate(good[:3]):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    (folder / "1.png").write_bytes(good[1].read_bytes()[:300])  # truncated
    (folder / "readme.txt").write_text("camera 1")
    (folder / "station2" / "0.png").write_bytes(good[3].read_bytes())
    result = run("predict", "--model", out / "model", folder, "--out", tmp_path / "p")
    assert result.exit_code == 3, result.output
    records = [json.loads(x)
               for x in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in records] == ["0.png", "1.png", "2.png"]
    assert records[1]["error"] and "1.png" in records[1]["error"]
    assert records[0]["error"] is None and records[2]["error"] is None
    assert "Traceback" not in result.output
    recursive = run("predict", "--model", out / "model", folder, "-r", "--no-heatmaps",
                    "--out", tmp_path / "r")
    records = [json.loads(x)
               for x in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert recursive.exit_code == 3 and len(records) == 4
    assert records[-1]["path"].endswith("station2/0.png") and records[-1]["heatmap"] is None
    stop = run("predict", "--model", out / "model", folder, "--on-error", "stop",
               "--out", tmp_path / "s")
    assert stop.exit_code == 1 and "1.png" in stop.output
    assert len((tmp_path / "s" / "predictions.jsonl").read_text().splitlines()) == 1


def test_predict_saves_raw_maps_at_the_image_size(fitted, tmp_path):
    out, data, _ = fitted
    image = data / "test" / "scratch" / "000.png"
    for fmt in ("npy", "tiff"):
        result = run("predict", "--model", out / "model", image, "--save-maps", fmt,
                     "--annotate", "--out", tmp_path / fmt)
        assert result.exit_code == 0, result.output
        [record] = [json.loads(x) for x in
                    (tmp_path / fmt / "predictions.jsonl").read_text().splitlines()]
        saved = (np.load(record["map"]) if fmt == "npy"
                 else np.asarray(Image.open(record["map"])))
        assert saved.dtype == np.float32 and saved.shape == (record["height"], record["width"])
        assert saved.max() > 0
    npy = np.load(tmp_path / "npy" / "maps" / "000.npy")
    assert np.array_equal(npy, np.asarray(Image.open(tmp_path / "tiff" / "maps" / "000.tiff")))


def test_predict_on_a_corrupt_file_is_a_clean_error(fitted, tmp_path):
    out, _, _ = fitted
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = run("predict", "--model", out / "model", bad, "--out", tmp_path / "p")
    assert result.exit_code == 3
    assert "broken.jpg" in result.output and "Traceback" not in result.output


def test_unknown_model_and_bad_setting_are_clean_errors(synth_root, tmp_path):
    data = synth_root / "synthetic_object"
    result = run("fit", "--data", data, "--model", "nope", "--out", tmp_path / "m")
    assert result.exit_code != 0 and "unknown model 'nope'" in result.output
    # ...before any data is read: a missing folder is not what it complains about
    result = run("fit", "--data", tmp_path / "absent", "--model", "nope", "--out", tmp_path / "m")
    assert "unknown model 'nope'" in result.output
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
    heads = [line for line in listing.output.splitlines() if not line.startswith(" ")]
    assert sorted(line.split(":")[0] for line in heads) == sorted(available_models())
    assert all(line.endswith(".") for line in heads), heads  # whole sentences, not cut off
    gaussian = run("models", "gaussian").output
    assert "default preset: none" in gaussian and "ONNX export: yes" in gaussian
    assert "sigma=2.0" in gaussian and "image_size=128" in gaussian


def test_every_option_of_every_verb_has_help():
    import click

    missing = [f"{name} {param.opts[0]}" for name, command in cli.commands.items()
               for param in command.params
               if isinstance(param, click.Option) and not param.help]
    assert not missing, missing


def test_fit_reads_only_good_images_and_test_needs_no_train(synth_root, tmp_path):
    import shutil

    data = tmp_path / "cat"
    shutil.copytree(synth_root / "synthetic_object", data)
    next((data / "ground_truth" / "crack").glob("*.png")).unlink()  # a test-set problem
    fit = run("fit", "--data", data, "--model", "gaussian", "--out", tmp_path / "m")
    assert fit.exit_code == 0, fit.output
    assert "--categories" not in run("test", "--model", tmp_path / "m", "--data", data,
                                     "--out", tmp_path / "r").output
    shutil.rmtree(data / "train")
    shutil.rmtree(data / "ground_truth")  # defect photos without masks: image level only
    result = run("test", "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.8
    assert metrics["pixel_auroc"] is None and metrics["pixel_aupro"] is None
    assert "no ground_truth/ masks" in result.output


def test_test_prints_the_decision_at_the_stored_threshold(fitted):
    out, _, output = fitted
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert f"detection rate {metrics['detection_rate']:.1%}" in output
    assert f"false-alarm rate {metrics['false_alarm_rate']:.1%}" in output
    low, high = metrics["false_alarm_ci"]  # Clopper-Pearson, with the count it rests on
    assert f"({metrics['false_alarms']} of {metrics['n_good']} good images; 95% interval " \
           f"{low:.1%}-{high:.1%})" in output
    assert "from 4 good images" in output and "warning:" in output  # few: a visible warning


def test_holdout_on_too_few_images_is_not_silent(synth_root, tmp_path, caplog):
    folder = tmp_path / "five"
    folder.mkdir()
    for path in sorted((synth_root / "synthetic_object" / "train" / "good").glob("*.png"))[:5]:
        (folder / path.name).write_bytes(path.read_bytes())
    result = run("fit", "--data", folder, "--model", "gaussian", "--calibration", "holdout",
                 "--holdout", "0.5", "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "none held out" in caplog.text and "threshold: none" in result.output


def test_benchmark_finds_nested_categories_and_lists_them_on_a_typo(synth_root, tmp_path):
    root = tmp_path / "root"
    (root / "synthetic").mkdir(parents=True)
    (root / "synthetic" / "synthetic_object").symlink_to(synth_root / "synthetic_object")
    bad = run("benchmark", "--data", root, "--models", "gaussian", "--categories", "carpet",
              "--out", tmp_path / "b")
    assert bad.exit_code != 0 and "synthetic/synthetic_object" in bad.output
    good = run("benchmark", "--data", root, "--models", "gaussian", "--categories",
               "synthetic_object", "--set", "image_size=64", "--out", tmp_path / "b")
    assert good.exit_code == 0, good.output
    # Not a terminal (CliRunner): a line per step instead of a silent progress bar.
    assert "[1/1] gaussian on synthetic_object: done in" in good.output


def test_demo_is_the_main_job_on_built_in_data(tmp_path):
    result = run("demo", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "| gaussian | synthetic_texture |" in result.output
    assert "| gaussian | synthetic_object |" in result.output
    assert (tmp_path / "results" / "results.csv").is_file()
