"""ONNX export: onnxruntime reproduces PyTorch's scores and maps within 1e-4 relative."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import shared_category

from flawscope.cli import cli
from flawscope.data import ImageDataset, open_category
from flawscope.errors import FlawscopeError
from flawscope.export import TOLERANCE, compare, export_onnx, onnx_session, torch_outputs
from flawscope.modelfile import load_model
from flawscope.models.base import AnomalyModel
from flawscope.pipeline import fit_model


def _images(category, size, n):
    cat = open_category(category)
    paths = [t.path for t in cat.test][:: max(1, len(cat.test) // n)][:n]
    return torch.stack([ImageDataset(paths, size)[i] for i in range(len(paths))])


def _check_file(model, path, images):
    session = onnx_session(path, threads=1)
    scores, maps = session.run(None, {"images": images.numpy()})
    ref_scores, ref_maps = model.score_batch(images)
    s_err, m_err = compare((scores, maps), (ref_scores.numpy(), ref_maps.numpy()))
    assert s_err < TOLERANCE and m_err < TOLERANCE
    return scores


def test_cli_export_gaussian_matches_pytorch_on_test_images(synth_root, tmp_path):
    data = synth_root / "synthetic_object"
    fit_model(data, "gaussian", tmp_path / "m", holdout=0.1)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    model, manifest = load_model(tmp_path / "m")
    images = _images(data, model.image_size, 7)  # a batch size the export never traced
    scores = _check_file(model, tmp_path / "m" / "model.onnx", images)
    assert scores.shape == (7,)
    # The file carries the decision rule, so it can be used without the manifest.
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m" / "model.onnx")).metadata_props}
    assert meta["flawscope_model"] == "gaussian"
    assert json.loads(meta["threshold"])["value"] == manifest["threshold"]["value"]
    # The model directory still loads (the checksum covers the weights only).
    load_model(tmp_path / "m")


def test_model_without_a_graph_gets_a_clear_error(tmp_path):
    class Opaque(AnomalyModel):
        name = "opaque"
        Config = dict

        def __init__(self):
            self.config = {"image_size": 8}

        @property
        def image_size(self):
            return 8

        def fit(self, images, workdir=None):
            pass

        def score_batch(self, images):
            s = np.abs(images.numpy()).mean(axis=(1, 2, 3))
            return torch.from_numpy(s), images[:, 0]

        def state_tensors(self):
            return {}

        def load_state_tensors(self, tensors):
            pass

    with pytest.raises(FlawscopeError, match="cannot be exported to ONNX"):
        export_onnx(Opaque(), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_export_that_drifts_from_pytorch_is_not_written(tmp_path, monkeypatch):
    from flawscope import export
    from flawscope.models.gaussian import GaussianConfig, GaussianModel

    model = GaussianModel(GaussianConfig(image_size=16))
    real = export.torch_outputs

    def drifted(module, images):
        s, m = real(module, images)
        return s * 1.01, m

    monkeypatch.setattr(export, "torch_outputs", drifted)
    with pytest.raises(FlawscopeError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "g.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gaussian_export_on_real_images(tmp_path):
    category = shared_category("mvtec_ad", "screw")
    fit_model(category, "gaussian", tmp_path / "m", overrides={"image_size": 128})
    model, manifest = load_model(tmp_path / "m")
    images = _images(category, model.image_size, 6)
    export_onnx(model, tmp_path / "m.onnx", manifest, check_images=images)
    _check_file(model, tmp_path / "m.onnx", images)
    assert torch_outputs(model.onnx_module(), images)[0].shape == (6,)


TINY = {"ae_l2": {"image_size": 64, "epochs": 1, "batches_per_epoch": 1, "batch_size": 4},
        "fanogan": {},
        "padim": {"image_size": 128}}


@pytest.mark.parametrize("name", sorted(TINY))
def test_learned_models_export_and_match_pytorch(name, synth_root, tmp_path):
    """Parity does not depend on how well a model is trained: a briefly fitted one is enough."""
    from flawscope.models import get_model_class

    cls = get_model_class(name)
    model = cls.from_settings("fast" if "fast" in cls.presets else None, TINY[name])
    category = open_category(synth_root / "synthetic_object")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if name == "padim":
            model.fit(ImageDataset(category.train[:4], model.image_size))
        images = _images(synth_root / "synthetic_object", model.image_size, 3)
        report = export_onnx(model, tmp_path / f"{name}.onnx", check_images=images)
        assert max(report.score_rel_err, report.map_rel_err) < TOLERANCE
        _check_file(model, report.path, images[:2])
    finally:
        torch.set_num_threads(before)


def test_export_in_a_fresh_process_of_a_backbone_model(synth_root, tmp_path):
    """Regression: in a new process timm's first forward lazily runs a torchvision check
    that the tracer recorded as an unsupported op; the CLI export must still work."""
    import subprocess
    import sys

    from flawscope.data import ImageDataset, open_category
    from flawscope.modelfile import save_model
    from flawscope.models import get_model_class

    model = get_model_class("padim").from_settings(None, {"image_size": 64})
    model.fit(ImageDataset(open_category(synth_root / "synthetic_texture").train[:6], 64))
    save_model(model, tmp_path / "padim")
    proc = subprocess.run([sys.executable, "-m", "flawscope", "export", str(tmp_path / "padim"),
                           "--format", "onnx", "--out", str(tmp_path / "padim.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "padim.onnx").is_file()
