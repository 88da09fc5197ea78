"""The public Python API (flawscope.Detector) and the README example that shows it."""

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flawscope
from flawscope import Detector, results
from flawscope.errors import DataError, FlawscopeError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def detector(synth_root):
    return Detector.fit(synth_root / "synthetic_object", model="gaussian")


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "models" / "object" / "manifest.json").is_file()
    assert Image.open(tmp_path / "crack_000_heatmap.png").height > 128  # the annotation strip


def test_package_exports_the_api():
    assert flawscope.Detector is Detector
    assert "Detector" in flawscope.__all__ and "patchcore" in flawscope.available_models()


def test_predict_gives_map_at_image_size_and_the_stored_decision(detector, synth_root):
    path = synth_root / "synthetic_object" / "test" / "stain" / "000.png"
    image = Image.open(path).convert("RGB").resize((160, 96))
    p = detector.predict(image)
    assert p.anomaly_map.shape == (96, 160) and p.anomaly_map.dtype == np.float32
    assert (p.width, p.height) == (160, 96)
    assert p.is_anomalous == (p.score > detector.threshold)
    assert p.threshold == detector.threshold
    overlay = p.overlay()
    assert overlay.size == (160, 96)


def test_path_pil_and_array_inputs_score_the_same(detector, synth_root):
    path = synth_root / "synthetic_object" / "test" / "crack" / "001.png"
    image = Image.open(path).convert("RGB")
    array = np.asarray(image)
    scores = [detector.predict(x).score for x in (path, str(path), image, array,
                                                  array.astype(np.float32) / 255.0)]
    assert scores[:4] == [scores[0]] * 4
    # float input is rounded back to the same 8-bit values
    assert scores[4] == pytest.approx(scores[0], rel=1e-6)


def test_predict_many_streams_in_order_and_records_bad_files(detector, synth_root, tmp_path):
    good = sorted((synth_root / "synthetic_object" / "test" / "good").glob("*.png"))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:200])
    inputs = [good[0], truncated, good[1], tmp_path / "absent.png", good[2]]
    predictions = list(detector.predict_many(inputs, batch_size=2))
    assert [p.source for p in predictions] == [str(x) for x in inputs]
    assert [p.ok for p in predictions] == [True, False, True, False, True]
    assert "cut.png" in predictions[1].error and "absent.png" in predictions[3].error
    alone = detector.predict(good[1])
    assert predictions[2].score == pytest.approx(alone.score, rel=1e-5)
    with pytest.raises(DataError, match="cut.png"):
        list(detector.predict_many(inputs, on_error="raise"))


def test_predict_refuses_tiny_and_malformed_arrays(detector):
    with pytest.raises(DataError, match="at least 32 pixels"):
        detector.predict(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(DataError, match="shape"):
        detector.predict(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(DataError, match="NaN"):
        detector.predict(np.full((64, 64), np.nan, np.float32))


def test_fit_on_a_plain_folder_and_on_a_list_of_arrays(synth_root, tmp_path):
    train = sorted((synth_root / "synthetic_object" / "train" / "good").glob("*.png"))
    folder = tmp_path / "good_parts"
    folder.mkdir()
    for path in train[:12]:
        (folder / path.name).write_bytes(path.read_bytes())
    from_folder = Detector.fit(folder, model="gaussian", image_size=64)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in train[:12]]
    from_arrays = Detector.fit(arrays, model="gaussian", image_size=64)
    # The default calibration (auto: leave-one-out for this model) fits on all 12.
    assert from_folder.manifest["fit_info"]["n_train"] == 12
    assert from_folder.manifest["calibration"]["method"] == "loo"
    probe = train[20]
    assert from_folder.predict(probe).score == from_arrays.predict(probe).score


def test_save_load_round_trip_and_readable_weights(detector, synth_root, tmp_path):
    detector.save(tmp_path / "m")
    again = Detector.load(tmp_path / "m")
    probe = synth_root / "synthetic_object" / "test" / "scratch" / "000.png"
    assert again.predict(probe).score == detector.predict(probe).score
    assert again.threshold == detector.threshold
    weights = stat.S_IMODE(os.stat(tmp_path / "m" / "weights.safetensors").st_mode)
    manifest = stat.S_IMODE(os.stat(tmp_path / "m" / "manifest.json").st_mode)
    assert weights == manifest  # whoever reads the manifest can read the weights


def test_evaluate_returns_everything_test_writes(detector, synth_root, tmp_path):
    evaluation = detector.evaluate(synth_root / "synthetic_object", pixel_size=64,
                                   out=tmp_path / "r")
    assert results.read_metrics(tmp_path / "r") == evaluation.metrics
    for key in ("image_auroc", "pixel_aupro", "detection_rate", "false_alarm_rate",
                "threshold", "threshold_method", "threshold_n_good"):
        assert key in evaluation.metrics, key
    labels, scores, _ = results.read_scores(tmp_path / "r")
    assert np.allclose(scores, evaluation.scores, rtol=1e-8)
    assert evaluation.metrics["detection_rate"] == pytest.approx(
        float(np.mean(scores[labels == 1] > detector.threshold)))


def test_unknown_model_fails_before_any_data_is_read(tmp_path):
    with pytest.raises(FlawscopeError, match="unknown model 'nope'"):
        Detector.fit(tmp_path / "does-not-exist", model="nope")
    with pytest.raises(FlawscopeError, match="unknown setting 'sigmaa'"):
        Detector.fit(tmp_path / "does-not-exist", model="gaussian", sigmaa=1)


def test_a_constant_scoring_model_is_never_returned(synth_root, monkeypatch):
    from flawscope.models.gaussian import GaussianModel

    def constant(self, images):
        n = images.shape[0]
        return images.new_full((n,), 1.0), images.new_zeros((n, 8, 8))

    monkeypatch.setattr(GaussianModel, "score_batch", constant)
    with pytest.raises(FlawscopeError, match="same score"):  # on the held-out images
        Detector.fit(synth_root / "synthetic_object", model="gaussian", calibration="holdout")


def test_native_evaluation_agrees_with_the_exact_computation(detector, synth_root):
    """The streamed metrics at each mask's own size, against the exact ones and MVTec AD's
    official AU-PRO procedure on the same maps (resized to the image's size by the same
    function)."""
    from test_pixelmetrics import official_aupro

    from flawscope.data import open_category, read_image, read_mask
    from flawscope.metrics import aupro, pixel_auroc

    data = synth_root / "synthetic_object"
    evaluation = detector.evaluate(data)
    assert evaluation.metrics["pixel_size"] == "native"
    items = open_category(data, train=False).test
    maps = np.stack([detector.predict(t.path).anomaly_map for t in items])
    masks = np.stack([read_mask(t.mask_path) if t.mask_path else
                      np.zeros(read_image(t.path).size[::-1], bool) for t in items])
    exact_auroc, exact_pro = pixel_auroc(masks, maps), aupro(masks, maps)
    # Bounded by the guaranteed binning error, plus float32 rounding of the map resize
    # (the detector's maps are the same function's output, batched differently).
    assert abs(evaluation.metrics["pixel_auroc"] - exact_auroc) <= 1e-4
    assert abs(evaluation.metrics["pixel_aupro"] - exact_pro) <= 1e-4
    assert abs(evaluation.metrics["pixel_aupro"] - official_aupro(maps, masks)) <= 1e-4
    assert evaluation.metrics["pixel_auroc_max_error"] <= 1e-4


def test_exported_engines_decide_like_torch_on_every_test_image(synth_root, tmp_path):
    from click.testing import CliRunner

    from flawscope.cli import cli

    data = synth_root / "synthetic_object"
    Detector.fit(data, model="padim", preset="fast", image_size=64, out=tmp_path / "m")
    exported = CliRunner().invoke(cli, ["export", str(tmp_path / "m")])
    assert exported.exit_code == 0, exported.output
    images = sorted((data / "test").rglob("*.png"))
    torch_run = list(Detector.load(tmp_path / "m", "torch").predict_many(images))
    onnx = Detector.load(tmp_path / "m", "onnxruntime")
    assert onnx.engine_name == "onnxruntime"
    onnx_run = list(onnx.predict_many(images))
    assert [p.is_anomalous for p in onnx_run] == [p.is_anomalous for p in torch_run]
    for a, b in zip(onnx_run, torch_run, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-4)  # the export's parity tolerance
    cli_run = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "m"), "--engine",
                                       "onnxruntime", "--no-heatmaps", str(data / "test"),
                                       "-r", "--out", str(tmp_path / "p")])
    assert cli_run.exit_code == 0, cli_run.output
    import json
    records = [json.loads(x) for x in (tmp_path / "p" / "predictions.jsonl").read_text()
               .splitlines()]
    assert [r["is_anomalous"] for r in records] == [p.is_anomalous for p in torch_run]


def test_predictions_carry_defect_regions_from_the_good_images_pixel_threshold(detector,
                                                                               synth_root):
    data = synth_root / "synthetic_object"
    assert detector.manifest["threshold"].get("pixel_value") is not None
    defect = detector.predict(data / "test" / "missing_piece" / "000.png")
    assert defect.regions, "a missing piece must be reported as a region"
    x0, y0, x1, y1 = defect.regions[0]["bbox"]
    assert 0 <= x0 < x1 <= defect.width and 0 <= y0 < y1 <= defect.height
    assert defect.regions[0]["area_px"] > 0
    assert defect.record()["regions"] == defect.regions
