"""Inference engines: onnxruntime gives PyTorch's scores and decisions; stale exports refused."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import torch_threads

from flawscope.data import ImageDataset, open_category
from flawscope.engines import (
    EngineError,
    OnnxRuntimeEngine,
    TorchEngine,
    open_engine,
    openvino_available,
)
from flawscope.enginespeed import engine_speeds
from flawscope.errors import FlawscopeError
from flawscope.export import TOLERANCE, export_model_dir
from flawscope.modelfile import load_model, read_manifest, save_model, update_manifest
from flawscope.pipeline import fit_model


@pytest.fixture(scope="module")
def patchcore_dir(synth_root, tmp_path_factory):
    """A small PatchCore fitted on the synthetic object, exported with its speeds recorded."""
    out = tmp_path_factory.mktemp("engines") / "pc"
    with torch_threads(1):
        fit_model(synth_root / "synthetic_object", "patchcore", out,
                  overrides={"image_size": 64, "coreset_ratio": 0.25})
        export_model_dir(out, measure_s=0.05)
    return out


def _test_images(synth_root, size):
    category = open_category(synth_root / "synthetic_object")
    paths = [t.path for t in category.test]
    labels = np.array([t.is_anomalous for t in category.test])
    return torch.stack([ImageDataset(paths, size)[i] for i in range(len(paths))]), labels


def test_onnxruntime_engine_gives_the_same_scores_and_decisions(patchcore_dir, synth_root):
    model, manifest = load_model(patchcore_dir)
    images, labels = _test_images(synth_root, model.image_size)
    eager = open_engine(model, patchcore_dir, "torch")
    ort = open_engine(model, patchcore_dir, "onnxruntime", threads=1)
    assert (eager.name, ort.name) == ("torch", "onnxruntime")
    (s1, m1), (s2, m2) = eager(images), ort(images)
    # 1e-4 relative: float32 sums in another order (oneDNN vs MLAS kernels) differ by ~1e-6.
    assert torch.allclose(s2, s1, rtol=TOLERANCE, atol=0)
    assert m1.shape == m2.shape and (m1 - m2).abs().max() <= TOLERANCE * m1.abs().max()
    threshold = manifest["threshold"]["value"]
    assert torch.equal(s1 > threshold, s2 > threshold)
    # The model detects: defects score above good images (the decisions are not all equal).
    assert s1[torch.from_numpy(labels)].mean() > s1[~torch.from_numpy(labels)].mean()


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO not installed")
def test_openvino_engine_gives_the_same_scores_and_decisions(patchcore_dir, synth_root):
    model, manifest = load_model(patchcore_dir)
    images, _ = _test_images(synth_root, model.image_size)
    (s1, m1), (s2, m2) = open_engine(model, patchcore_dir, "torch")(images), open_engine(
        model, patchcore_dir, "openvino", threads=1)(images)
    # Same 1e-4 bound as onnxruntime: only the order of float32 sums differs.
    assert torch.allclose(s2, s1, rtol=TOLERANCE, atol=0)
    assert (m1 - m2).abs().max() <= TOLERANCE * m1.abs().max()
    threshold = manifest["threshold"]["value"]
    assert torch.equal(s1 > threshold, s2 > threshold)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_exported_engines_score_concurrent_callers_like_one(patchcore_dir, synth_root, name):
    """With two streams (the service's two scoring threads), batches scored at the same time
    from two threads get the scores of the same batches scored one at a time."""
    if name == "openvino" and not openvino_available():
        pytest.skip("OpenVINO not installed")
    from concurrent.futures import ThreadPoolExecutor

    model, _ = load_model(patchcore_dir)
    images, _ = _test_images(synth_root, model.image_size)
    batches = [images[i:i + 4] for i in range(0, 24, 4)]
    single = open_engine(model, patchcore_dir, name, threads=2)
    streams = open_engine(model, patchcore_dir, name, threads=2, streams=2)
    alone = [single(batch) for batch in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(streams, batches))
    for (s1, m1), (s2, m2) in zip(alone, together, strict=True):
        assert torch.allclose(s2, s1, rtol=TOLERANCE, atol=0)
        assert (m1 - m2).abs().max() <= TOLERANCE * m1.abs().max()


def test_export_records_parity_and_speed_in_the_manifest(patchcore_dir):
    entry = read_manifest(patchcore_dir)["exports"]["onnx"]
    assert entry["file"] == "model.onnx" and entry["parity_ok"] is True
    assert max(entry["score_rel_err"], entry["map_rel_err"]) <= TOLERANCE
    assert entry["weights_sha256"] == read_manifest(patchcore_dir)["weights_sha256"]
    engines = {"torch", "onnxruntime"} | ({"openvino"} if openvino_available() else set())
    assert set(entry["img_per_s"]) == engines
    assert all(v > 0 for v in entry["img_per_s"].values())
    if openvino_available():
        assert entry["openvino"]["parity_ok"] is True


def test_engine_speeds_are_timed_in_fresh_processes(patchcore_dir):
    # Each engine runs in a child process: the figures come back, and nothing of the child
    # (an engine, its threads) is left in this process.
    speeds = engine_speeds([("torch", patchcore_dir), ("onnxruntime", patchcore_dir /
                                                       "model.onnx")],
                           image_size=64, threads=1, batch_size=2, min_s=0.01)
    assert set(speeds) == {"torch", "onnxruntime"} and all(v > 0 for v in speeds.values())
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        engine_speeds([("tensorrt", patchcore_dir)], image_size=64, threads=1)
    # A child that fails reports the engine and the file, not a broken pipe.
    with pytest.raises(FlawscopeError, match=r"timing the onnxruntime engine on .*gone\.onnx"):
        engine_speeds([("onnxruntime", patchcore_dir / "gone.onnx")], image_size=64, threads=1)


def test_auto_takes_the_faster_recorded_engine(patchcore_dir, tmp_path):
    import shutil

    work = tmp_path / "pc"
    shutil.copytree(patchcore_dir, work)
    model, manifest = load_model(work)
    exports = manifest["exports"]
    exports["onnx"]["img_per_s"].pop("openvino", None)
    for torch_speed, expected in ((1.0, OnnxRuntimeEngine), (1e9, TorchEngine)):
        exports["onnx"]["img_per_s"]["torch"] = torch_speed
        update_manifest(work, exports=exports)
        assert isinstance(open_engine(model, work), expected)
    if openvino_available():  # recorded faster than onnxruntime and checked: auto takes it
        exports["onnx"]["img_per_s"] = {"torch": 1.0, "onnxruntime": 2.0, "openvino": 3.0}
        update_manifest(work, exports=exports)
        assert open_engine(model, work).name == "openvino"
        exports["onnx"]["openvino"]["parity_ok"] = False
        update_manifest(work, exports=exports)
        assert open_engine(model, work).name == "onnxruntime"
    # Without a model directory only PyTorch can run.
    assert isinstance(open_engine(model, None), TorchEngine)
    with pytest.raises(EngineError, match="directory"):
        open_engine(model, None, "onnxruntime")


def test_stale_export_is_refused_or_skipped_with_a_message(patchcore_dir, tmp_path, caplog):
    import shutil

    work = tmp_path / "pc"
    shutil.copytree(patchcore_dir, work)
    model, _ = load_model(work)
    exports = read_manifest(work)["exports"]
    exports["onnx"]["img_per_s"] = {"torch": 1.0, "onnxruntime": 2.0}
    update_manifest(work, exports=exports)
    # Fitting again rewrites the weights; the old model.onnx stays in the directory.
    model.memory_bank = model.memory_bank[: len(model.memory_bank) // 2].clone()
    save_model(model, work)
    assert (work / "model.onnx").is_file()
    refit, _ = load_model(work)
    with pytest.raises(EngineError, match=r"other weights.*flawscope export"):
        open_engine(refit, work, "onnxruntime")
    # The manifest entry is gone, but the file's own metadata gives the staleness away even
    # when an entry claiming speed is put back.
    update_manifest(work, exports=exports | {"onnx": {**exports["onnx"],
                                                      "weights_sha256": None}})
    with caplog.at_level(logging.WARNING, logger="flawscope.engines"):
        engine = open_engine(refit, work, "auto")
    assert engine.name == "torch"
    assert "other weights" in caplog.text and "flawscope export" in caplog.text
    # Re-exporting makes it usable again.
    export_model_dir(work, measure_s=0)
    assert open_engine(refit, work, "onnxruntime").name == "onnxruntime"


def test_missing_export_and_bad_input_give_clear_errors(patchcore_dir, tmp_path):
    model, _ = load_model(patchcore_dir)
    save_model(model, tmp_path / "bare")
    with pytest.raises(EngineError, match=r"no ONNX export.*flawscope export"):
        open_engine(model, tmp_path / "bare", "onnxruntime")
    assert open_engine(model, tmp_path / "bare").name == "torch"
    with pytest.raises(EngineError, match="unknown engine"):
        open_engine(model, tmp_path / "bare", "tensorrt")
    for engine in (open_engine(model, patchcore_dir, "onnxruntime"), TorchEngine(model)):
        with pytest.raises(EngineError, match=r"\(B, 3, 64, 64\)"):
            engine(torch.rand(2, 3, 32, 32))


def test_exported_file_names_its_weights(patchcore_dir):
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(patchcore_dir / "model.onnx")).metadata_props}
    assert meta["weights_sha256"] == read_manifest(patchcore_dir)["weights_sha256"]
    assert json.loads(meta["threshold"])["value"] == read_manifest(
        patchcore_dir)["threshold"]["value"]
