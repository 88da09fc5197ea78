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
from flawscope.export import TOLERANCE, compare, export_onnx, onnx_session
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


#: Small settings per registered model: parity does not depend on how well a model is
#: trained, so the backbone models are fitted on four images (simplenet for two optimizer
#: steps) and the networks keep their initial weights.
TINY = {"ae_l2": {"image_size": 64, "epochs": 1, "batches_per_epoch": 1, "batch_size": 4},
        "ae_ssim": {"image_size": 64, "epochs": 1, "batches_per_epoch": 1, "batch_size": 4},
        "fanogan": {},
        "gaussian": {"image_size": 64},
        "padim": {"image_size": 128},
        "patchcore": {"image_size": 128},
        # two backbones: the exported graph holds both and the concatenated bank
        "patchcore:ensemble": {"image_size": 64,
                               "backbone": "efficientnet_lite0+efficientnet_lite2"},
        "patchcore:reweight": {"image_size": 96, "reweight": True, "coreset_ratio": 0.25},
        # each image standardized to one mean and spread inside the graph
        "patchcore:standardized": {"image_size": 64, "intensity": "standardized"},
        # each image less its blurred grey level inside the graph
        "patchcore:highpass": {"image_size": 64, "intensity": "highpass"},
        # the fine preset: stride-4 patches, images matched to the training intensity (a
        # fitted constant of the graph), the image score from the smoothed map
        "patchcore:fine": {"image_size": 64, "stages": (1, 2, 4), "intensity": "matched",
                           "image_score": "map_max"},
        "simplenet": {"image_size": 64, "epochs": 1, "batches_per_epoch": 2, "batch_size": 256}}
#: Fitted before export: the backbone models, and simplenet, whose feature standardization
#: and batch-norm statistics come from its training features.
FITTED = ("gaussian", "padim", "patchcore", "simplenet")


def tiny_model(name, category):
    """A briefly fitted (or, for networks, freshly initialized) model of ``name``."""
    from flawscope.models import get_model_class

    cls = get_model_class(name.split(":")[0])
    model = cls.from_settings("fast" if "fast" in cls.presets else None, TINY[name])
    if name.split(":")[0] in FITTED:
        model.fit(ImageDataset(open_category(category).train[:4], model.image_size))
    return model


def test_every_registered_model_has_tiny_export_settings():
    from flawscope.models import available_models

    assert set(available_models()) <= {n.split(":")[0] for n in TINY}


def _export_and_check(name, category, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model(name, category)
        images = _images(category, model.image_size, 3)
        report = export_onnx(model, tmp_path / f"{name}.onnx", check_images=images)
        assert max(report.score_rel_err, report.map_rel_err) < TOLERANCE
        _check_file(model, report.path, images[:2])  # a batch size not checked at export
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_exports_and_matches_pytorch(name, synth_root, tmp_path):
    _export_and_check(name, synth_root / "synthetic_object", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_matches_pytorch_on_real_images(name, tmp_path):
    _export_and_check(name, shared_category("mvtec_ad", "screw"), tmp_path)


def test_patchcore_graph_holds_for_any_batch_and_equals_clustered_search(tmp_path):
    """The exported brute-force search gives the clustered search's scores: a bank big
    enough to be clustered (the pruning is PyTorch-only), batch sizes 1 and 5."""
    from flawscope.models.patchcore import PatchCoreConfig, PatchCoreModel
    from flawscope.nnsearch import MIN_ROWS_TO_CLUSTER

    model = PatchCoreModel(PatchCoreConfig(image_size=64))
    g = torch.Generator().manual_seed(0)
    model._set_bank(torch.randn(MIN_ROWS_TO_CLUSTER, 152, generator=g).half())
    assert model._search.n_clusters > 1
    images = torch.rand(5, 3, 64, 64, generator=g)
    report = export_onnx(model, tmp_path / "pc.onnx", check_images=images)
    for batch in (images[:1], images):
        _check_file(model, report.path, batch)


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
