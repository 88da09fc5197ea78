"""PaDiM: statistics equal a direct computation, detection on synthetic data, safe files."""

import json

import pytest
import torch
from click.testing import CliRunner

from flawscope.cli import cli
from flawscope.data import ImageDataset, open_category
from flawscope.errors import FlawscopeError
from flawscope.modelfile import load_model
from flawscope.models import get_model_class
from flawscope.synth import SynthSpec, generate


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_padim")
    generate(root, SynthSpec(size=96, n_train=30, n_test_good=10, n_test_per_defect=5, seed=5),
             categories=("synthetic_texture",))
    return root / "synthetic_texture"


@pytest.fixture(scope="module")
def fitted(texture, tmp_path_factory):
    out = tmp_path_factory.mktemp("padim")
    runner = CliRunner()
    fit = runner.invoke(cli, ["fit", "--data", str(texture), "--model", "padim",
                              "--set", "image_size=128", "--out", str(out / "model")])
    assert fit.exit_code == 0, fit.output
    test = runner.invoke(cli, ["test", "--model", str(out / "model"), "--data", str(texture),
                               "--out", str(out / "results")])
    assert test.exit_code == 0, test.output
    return out


def test_padim_finds_synthetic_texture_defects(fitted):
    metrics = json.loads((fitted / "results" / "metrics.json").read_text())
    assert metrics["model"] == "padim"
    assert metrics["image_auroc"] > 0.95
    assert metrics["pixel_auroc"] > 0.9


def test_saved_padim_scores_identically(fitted, texture):
    model, _ = load_model(fitted / "model")
    images = torch.stack([ImageDataset(open_category(texture).train, 128)[i] for i in range(4)])
    before = model.score_tensor(images)
    again, _ = load_model(fitted / "model")
    after = again.score_tensor(images)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_streamed_statistics_equal_direct_mean_covariance_and_mahalanobis(texture):
    model = get_model_class("padim").from_settings(None, {"image_size": 64, "n_features": 12,
                                                          "batch_size": 7})
    data = ImageDataset(open_category(texture).train[:20], 64)
    model.fit(data)
    x = torch.cat([model.embed(torch.stack([data[i] for i in range(20)]))]).double()  # (N,P,d)
    mean = x.mean(0)
    centred = x - mean
    cov = torch.einsum("npi,npj->pij", centred, centred) / (len(x) - 1)
    cov += 0.01 * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(model.mean.double(), mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.inv_cov.double(), torch.linalg.inv(cov), rtol=1e-3,
                               atol=1e-3)
    # Mahalanobis distance of one image, before upsampling, against a direct computation
    query = x[:1]
    delta = query[0] - mean
    direct = torch.einsum("pi,pij,pj->p", delta, torch.linalg.inv(cov), delta).sqrt()
    model.config.sigma = 0
    model.config.image_size = model.grid[0]  # no upsampling: map at patch resolution
    _, maps = model.score_batch(torch.stack([data[0]]))
    torch.testing.assert_close(maps[0].flatten().double(), direct, rtol=1e-3, atol=1e-3)


def test_channel_subset_is_seeded():
    cls = get_model_class("padim")
    a = cls.from_settings(None, {"seed": 1}).channels
    assert torch.equal(a, cls.from_settings(None, {"seed": 1}).channels)
    assert not torch.equal(a, cls.from_settings(None, {"seed": 2}).channels)
    assert len(a) == 100 and len(set(a.tolist())) == 100


def test_too_many_channels_is_a_clear_error():
    with pytest.raises(FlawscopeError, match="n_features=500"):
        get_model_class("padim").from_settings(None, {"n_features": 500})
