"""Per-pixel standardization of anomaly maps by good images: the arithmetic, and that saved
models keep it (and models saved without it score as before)."""

import json

import pytest
import torch

from flawscope.data import ImageDataset
from flawscope.errors import FlawscopeError, ModelFileError
from flawscope.modelfile import MANIFEST, load_model, save_model
from flawscope.models import get_model_class
from flawscope.models._mapnorm import EPS_FRACTION, GoodPixelNorm
from flawscope.synth import SynthSpec, generate


def test_standardizes_each_pixel_by_the_good_maps():
    # Three good maps of 1 x 2 pixels: pixel 0 is always 1 (std 0), pixel 1 is 0, 2, 4
    # (mean 2, sample std 2). Mean std = 1, so eps = EPS_FRACTION.
    good = torch.tensor([[[1.0, 0.0]], [[1.0, 2.0]], [[1.0, 4.0]]])
    square = torch.rand(4, 2, 2)
    assert torch.equal(GoodPixelNorm(2)(square), square)  # the identity until fitted
    norm = GoodPixelNorm(2)
    norm.fit(good)
    eps = EPS_FRACTION * 1.0
    z = norm(torch.tensor([[[1.5, 8.0]]]))
    assert z[0, 0, 0].item() == pytest.approx(0.5 / eps)
    assert z[0, 0, 1].item() == pytest.approx(6.0 / (2.0 + eps))
    with pytest.raises(FlawscopeError, match="at least two"):
        norm.fit(good[:1])


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_norm")
    generate(root, SynthSpec(size=32, n_train=12, n_test_good=3, n_test_per_defect=1, seed=2),
             categories=("synthetic_object",))
    from flawscope.data import open_category
    return open_category(root / "synthetic_object")


def _fit(name, category, **settings):
    tiny = {"ae_l2": {"epochs": 1, "batches_per_epoch": 2, "batch_size": 4},
            "fanogan": {"width": 4, "latent_dim": 8, "batch_size": 4, "batches_per_epoch": 2,
                        "stage1_epochs": 1, "stage2_epochs": 1}}[name]
    model = get_model_class(name).from_settings("fast", {"image_size": 32, **tiny,
                                                         **settings})
    model.fit(ImageDataset(category.train, 32))
    return model


def _test_images(category):
    data = ImageDataset([t.path for t in category.test], 32)
    return torch.stack([data[i] for i in range(len(data))])


@pytest.mark.parametrize("name, reduction", [("ae_l2", "max"), ("fanogan", "topk")])
def test_fitted_statistics_are_those_of_the_training_maps_and_survive_save_load(
        name, reduction, category, tmp_path):
    model = _fit(name, category, map_normalization="good_pixels", score_reduction=reduction)
    train = torch.stack([ImageDataset(category.train, 32)[i] for i in range(12)])
    _, z = model.score_batch(train)
    # Standardized by their own statistics, the training maps have mean 0 at every pixel.
    assert z.mean(0).abs().max().item() < 1e-4
    assert {"map_norm.mean", "map_norm.scale"} <= set(model.state_tensors())
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    images = _test_images(category)
    s1, m1 = model.score_batch(images)
    s2, m2 = loaded.score_batch(images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


@pytest.mark.parametrize("name", ["ae_l2", "fanogan"])
def test_a_model_saved_before_the_setting_existed_loads_and_scores_as_before(name, category,
                                                                              tmp_path):
    paper_score = {"score_reduction": "izi_f"} if name == "fanogan" else {}
    model = _fit(name, category, map_normalization="none", **paper_score)
    assert not any(k.startswith("map_norm.") for k in model.state_tensors())
    save_model(model, tmp_path / "m")
    manifest_path = tmp_path / "m" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for key in ("map_normalization", "smooth_sigma", "score_reduction", "score_topk"):
        if name == "fanogan" or key == "map_normalization":
            manifest["config"].pop(key)  # settings an older flawscope did not write
    manifest_path.write_text(json.dumps(manifest))
    loaded, _ = load_model(tmp_path / "m")
    images = _test_images(category)
    s1, m1 = model.score_batch(images)
    s2, m2 = loaded.score_batch(images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    if name == "fanogan":  # the paper's score and residual map, untouched
        x = images * 2 - 1
        rec = loaded.generator(loaded.encoder(x))
        assert torch.allclose(m2, (x - rec).abs().mean(1) / 2)

    # A file that claims the normalization but lacks its tensors is refused, naming the file.
    manifest["config"]["map_normalization"] = "good_pixels"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="map_norm.mean"):
        load_model(tmp_path / "m")


def test_bad_settings_are_refused_clearly():
    with pytest.raises(FlawscopeError, match="map_normalization"):
        get_model_class("ae_l2").from_settings("fast", {"map_normalization": "per_image"})
    with pytest.raises(FlawscopeError, match="score_reduction"):
        get_model_class("fanogan").from_settings("fast", {"score_reduction": "median"})


@pytest.mark.parametrize("name", ["ae_l2", "fanogan"])
def test_onnx_export_keeps_the_statistics(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from flawscope.export import export_onnx

    model = get_model_class(name).from_settings(
        "fast", {"image_size": 32, "map_normalization": "good_pixels", "score_reduction": "max"})
    gen = torch.Generator().manual_seed(0)
    model.map_norm.fit(torch.rand(5, 32, 32, generator=gen))  # statistics that are not 0/1
    # export_onnx raises if onnxruntime's scores or maps disagree with PyTorch's
    export_onnx(model, tmp_path / "m.onnx", check_images=torch.rand(3, 3, 32, 32,
                                                                    generator=gen))
    assert (tmp_path / "m.onnx").stat().st_size > 0
