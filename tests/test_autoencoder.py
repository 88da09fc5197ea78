"""The autoencoders: network shapes, score reductions, detection on synthetic defects,
exact resumption after an interruption, training pictures, save/load."""

import csv
import logging
import math
import os
import signal

import numpy as np
import pytest
import torch
from conftest import fast_preset_auroc, fitted_image_auroc, shared_category
from sklearn.metrics import roc_auc_score

from flawscope.data import ImageDataset, open_category
from flawscope.errors import FlawscopeError
from flawscope.modelfile import load_model, save_model
from flawscope.models import get_model_class
from flawscope.models.autoencoder import ConvAutoencoder, reduce_map
from flawscope.synth import SynthSpec, generate

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: the timings hold on a shared 2-core machine (two threads competing with
    other processes run several times slower), and results are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth_object(tmp_path_factory):
    """The synthetic object category at 64 px with few images (well under a second)."""
    root = tmp_path_factory.mktemp("synth_ae")
    generate(root, SynthSpec(size=SIZE, n_train=32, n_test_good=10, n_test_per_defect=4,
                             seed=1), categories=("synthetic_object",))
    return open_category(root / "synthetic_object")


def small(name: str, **overrides):
    """A model at 64 px with a short, fixed training budget."""
    settings = {"image_size": SIZE, "batch_size": 16, "batches_per_epoch": 4, "epochs": 2,
                **overrides}
    return get_model_class(name).from_settings("fast", settings)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_tensors().items()}


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_network_reproduces_the_input_shape(size):
    net = ConvAutoencoder(size, latent_dim=8)
    assert net(torch.zeros(2, 3, size, size)).shape == (2, 3, size, size)
    # the dense bottleneck: one latent vector per image
    assert net.encoder(torch.zeros(1, 3, size, size)).shape == (1, 8, 1, 1)


@pytest.mark.parametrize("size", [48 + 1, 16, 192])
def test_unsupported_sizes_are_refused_clearly(size):
    with pytest.raises(FlawscopeError, match="image_size"):
        get_model_class("ae_l2").from_settings("fast", {"image_size": size})


def test_presets_fast_is_default_and_paper_is_the_seeds():
    for name in ("ae_l2", "ae_ssim"):
        cls = get_model_class(name)
        assert cls.default_preset == "fast"
        c = cls.from_settings("paper").config
        assert (c.image_size, c.latent_dim, c.epochs, c.batch_size, c.lr, c.hflip) == \
            (256, 1024, 300, 70, 1e-3, True)
        assert cls.from_settings(None).preset == "fast"


def test_score_reductions():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, :5] = 1.0  # five hot pixels
    maps[1] = 0.1
    assert reduce_map(maps, "max", 0.01).tolist() == pytest.approx([1.0, 0.1])
    assert reduce_map(maps, "mean", 0.01).tolist() == pytest.approx([0.05, 0.1])
    assert reduce_map(maps, "topk", 0.1).tolist() == pytest.approx([0.5, 0.1])
    with pytest.raises(FlawscopeError, match="score_reduction"):
        get_model_class("ae_l2").from_settings("fast", {"score_reduction": "median"})


@pytest.fixture(scope="module")
def synth_object32(tmp_path_factory):
    """The synthetic object made at 32 px, the detection test's resolution: one-pixel
    scratches and cracks stay sharp instead of being halved in contrast by a resize. 24 good
    and 32 defective test images: one image moves the AUROC by 1/768 or less (with 10 and 16
    made at 64 px, by up to 1/160, and training seeds scattered from 0.63 to 0.96)."""
    root = tmp_path_factory.mktemp("synth_ae32")
    generate(root, SynthSpec(size=32, n_train=60, n_test_good=24, n_test_per_defect=8,
                             seed=1), categories=("synthetic_object",))
    return open_category(root / "synthetic_object")


#: The detection test's run: 10 epochs of 15 batches of 16 at 32 px (lr 1e-3, the presets').
#: Image AUROC over training seeds 0-6 on the set above (AMD EPYC, 1 thread): 0.870, 0.917,
#: 0.876, 0.876, 0.902, 0.901, 0.896 (mean 0.890). Seed 2 collapsed at epoch 8 (SSIM loss
#: 1.0, output running away) and was recovered by the training loop at half the learning
#: rate. With MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
#: seeds 0 and 2 scored the same. With oneDNN limited to SSE4.1 and ATen to its unvectorized
#: kernels (another rounding, as on another CPU) seeds 0-4 scored 0.870, 0.926, 0.900, 0.882,
#: 0.912: seed 2 then did not collapse, so one CPU's rounding decides whether a run needs the
#: recovery, and the recovery keeps the result above the bar either way.
DETECTION_RUN = {"image_size": 32, "batch_size": 16, "batches_per_epoch": 15, "epochs": 10}
EPOCHS = DETECTION_RUN["epochs"]


def test_ssim_autoencoder_ranks_synthetic_defects_above_good_images(synth_object32, tmp_path):
    """Seconds of training at 32 px separate the defects (AUROC about 0.9, see above).

    The L2 autoencoder does not pass this bar in seconds on this category (measured with the
    same run, training seeds 0-2: AUROC 0.681, 0.720, 0.712; the blur at the rims of the
    randomly rotated part outweighs thin cracks and colour stains), which is the weakness of
    L2 that Bergmann et al. 2019 set out to fix.
    """
    size = DETECTION_RUN["image_size"]
    model = get_model_class("ae_ssim").from_settings("fast", DETECTION_RUN)
    model.fit(ImageDataset(synth_object32.train, size), workdir=tmp_path)
    test = synth_object32.test
    images = torch.stack([ImageDataset([t.path], size)[0] for t in test])
    labels = np.array([t.is_anomalous for t in test])
    assert labels.sum() == 32 and (~labels).sum() == 24
    scores, maps = model.score_tensor(images)
    assert maps.shape == (len(test), size, size)
    assert roc_auc_score(labels, scores.numpy()) > 0.8
    # the training pictures and loss curve are there, and the loss went down
    for name in ("losses.csv", "losses.png", "reconstructions.png", "checkpoint.pt"):
        assert (tmp_path / name).is_file()
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    assert len(rows) == EPOCHS
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    rec = model.reconstruct(images[:2])
    assert rec.shape == images[:2].shape and 0 <= float(rec.min()) <= float(rec.max()) <= 1


def test_l2_map_is_hottest_where_the_image_was_changed(synth_object):
    """A white patch on good parts is where the L2 map peaks, well above a good part's peak.

    Over training seeds 0-4 (AMD EPYC, 1 thread) every peak lay inside the patch and was 4.1
    to 5.1 times the unchanged image's: the factor 2 asserted below leaves room for rounding.
    """
    size = 32
    model = get_model_class("ae_l2").from_settings("fast", {
        "image_size": size, "batch_size": 16, "batches_per_epoch": 10, "epochs": 3,
        "smooth_sigma": 2.0, "map_normalization": "none"})  # the raw map the figures are of
    model.fit(ImageDataset(synth_object.train, size))
    good = [t for t in synth_object.test if not t.is_anomalous][:4]
    images = torch.stack([ImageDataset([t.path], size)[0] for t in good])
    changed = images.clone()
    changed[:, :, 12:18, 8:14] = 1.0  # a white patch on the part
    _, maps = model.score_tensor(changed)
    _, base = model.score_tensor(images)
    for m in maps:
        y, x = divmod(int(m.argmax()), size)
        assert 10 <= y < 20 and 6 <= x < 16
    assert (maps.flatten(1).amax(1) > 2 * base.flatten(1).amax(1)).all()


@pytest.mark.parametrize("name", ["ae_l2", "ae_ssim"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_fit(name, synth_object, tmp_path):
    data = ImageDataset(synth_object.train[:12], SIZE)
    straight = small(name, epochs=4, batches_per_epoch=2, batch_size=4)
    straight.fit(data)  # no workdir: no checkpoint at all

    first = small(name, epochs=2, batches_per_epoch=2, batch_size=4)
    first.fit(data, workdir=tmp_path)  # "interrupted" after epoch 2
    resumed = small(name, epochs=4, batches_per_epoch=2, batch_size=4)
    resumed.fit(data, workdir=tmp_path)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]


def test_ctrl_c_leaves_a_checkpoint_that_resumes_mid_epoch(synth_object, tmp_path,
                                                           monkeypatch):
    data = ImageDataset(synth_object.train[:12], SIZE)
    straight = small("ae_l2", epochs=2, batches_per_epoch=3, batch_size=4)
    straight.fit(data)

    interrupted = small("ae_l2", epochs=2, batches_per_epoch=3, batch_size=4)
    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def step_and_press_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, batch 2: Ctrl-C arrives inside the optimizer step
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_and_press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(data, workdir=tmp_path)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert calls["n"] == 5  # the batch in progress was finished, no further one started
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2)

    resumed = small("ae_l2", epochs=2, batches_per_epoch=3, batch_size=4)
    resumed.fit(data, workdir=tmp_path)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_huge_learning_rate_stops_with_an_error_naming_the_epoch(synth_object):
    data = ImageDataset(synth_object.train[:8], SIZE)
    model = small("ae_l2", epochs=2, batches_per_epoch=2, batch_size=4, lr=1e6)
    with pytest.raises(FlawscopeError, match=r"training ae_l2: training diverged at epoch 1 "
                                             r"\(loss (nan|inf)\).*after 3 recoveries"):
        model.fit(data)


def test_a_nan_loss_is_recovered_with_a_lower_learning_rate(synth_object, tmp_path, caplog,
                                                            monkeypatch):
    data = ImageDataset(synth_object.train[:8], SIZE)
    model = small("ae_ssim", epochs=3, batches_per_epoch=2, batch_size=4)
    real_loss, calls = model.loss, {"n": 0}

    def loss_with_one_nan(x, rec):
        calls["n"] += 1
        value = real_loss(x, rec)
        return value * math.nan if calls["n"] == 4 else value  # epoch 2, batch 2

    monkeypatch.setattr(model, "loss", loss_with_one_nan)
    with caplog.at_level(logging.WARNING, logger="flawscope.trainloop"):
        model.fit(data, workdir=tmp_path)
    assert "diverged at epoch 2 (loss nan)" in caplog.text
    assert calls["n"] == 3 * 2 + 2  # epoch 2 trained twice
    assert [r["epoch"] for r in model.history] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in model.history)
    assert all(bool(torch.isfinite(v).all()) for v in weights(model).values())
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["recoveries"] == 1
    assert saved["optimizers"]["net"]["param_groups"][0]["lr"] == pytest.approx(0.5e-3)


def test_a_checkpoint_of_the_earlier_loop_layout_resumes(synth_object, tmp_path):
    """Checkpoints written before the shared training loop (net / optimizer / loss_sum)."""
    data = ImageDataset(synth_object.train[:12], SIZE)
    straight = small("ae_l2", epochs=2, batches_per_epoch=3, batch_size=4)
    straight.fit(data)
    first = small("ae_l2", epochs=1, batches_per_epoch=3, batch_size=4)
    first.fit(data, workdir=tmp_path)
    new = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = {"fingerprint": new["fingerprint"], "epoch": new["epoch"], "batch": 0,
           "order": None, "loss_sum": 0.0, "history": new["history"], "rng": new["rng"],
           "net": new["modules"]["net"], "optimizer": new["optimizers"]["net"]}
    torch.save(old, tmp_path / "checkpoint.pt")
    resumed = small("ae_l2", epochs=2, batches_per_epoch=3, batch_size=4)
    resumed.fit(data, workdir=tmp_path)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == straight.history


def test_checkpoint_of_other_settings_is_not_resumed(synth_object, tmp_path):
    data = ImageDataset(synth_object.train[:8], SIZE)
    small("ae_l2", epochs=1, batches_per_epoch=1, batch_size=4).fit(data, workdir=tmp_path)
    other = small("ae_l2", epochs=1, batches_per_epoch=1, batch_size=4, lr=5e-4)
    fresh = small("ae_l2", epochs=1, batches_per_epoch=1, batch_size=4, lr=5e-4)
    other.fit(data, workdir=tmp_path)
    fresh.fit(data)
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in weights(other).items())


def test_same_scores_after_save_and_load(synth_object, tmp_path):
    model = small("ae_ssim", epochs=1, batches_per_epoch=1, batch_size=4,
                  score_reduction="topk")
    model.fit(ImageDataset(synth_object.train[:8], SIZE))
    save_model(model, tmp_path / "m")
    loaded, manifest = load_model(tmp_path / "m")
    images = torch.stack([ImageDataset([t.path], SIZE)[0] for t in synth_object.test[:3]])
    s1, m1 = model.score_tensor(images)
    s2, m2 = loaded.score_tensor(images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert manifest["config"]["score_reduction"] == "topk"


@pytest.mark.parametrize("name, reduction", [("ae_l2", "topk"), ("ae_ssim", "max")])
def test_onnx_export_matches_pytorch(name, reduction, tmp_path):
    pytest.importorskip("onnxruntime")
    from flawscope.export import export_onnx

    model = get_model_class(name).from_settings("fast", {"image_size": 32,
                                                         "score_reduction": reduction})
    export_onnx(model, tmp_path / "m.onnx")  # raises if onnxruntime disagrees with PyTorch
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.slow
def test_ssim_fast_preset_detects_on_the_default_synthetic_object(tmp_path):
    """The ``fast`` preset as shipped, on the default ``flawscope synth`` output (128 px), for
    two of the ten (data seed, training seed) runs it was chosen on: measured 0.906 and 0.927
    (AMD EPYC, 2 threads); over all ten runs 0.878 on average and 0.823 at worst (see
    ``SSIM_FAST``). The bars are the preset's targets: 0.85 on average, 0.80 in every run."""
    aurocs = [fast_preset_auroc(tmp_path, "ae_ssim", data_seed) for data_seed in (3, 4)]
    assert min(aurocs) >= 0.80 and float(np.mean(aurocs)) >= 0.85, aurocs


@pytest.mark.slow
def test_l2_fast_preset_detects_on_the_default_synthetic_object(tmp_path):
    """``ae_l2``'s ``fast`` preset as shipped (32 px, map standardized per pixel by the good
    training images), on the default ``flawscope synth`` output, for two of the ten runs it
    was chosen on: data seeds 0 and 3, training seed 0, measured 0.906 and 0.941 (AMD EPYC,
    2 threads, fits of 5 s); over all ten runs 0.873 on average and 0.729 at worst (see
    ``L2_FAST``; the raw map scored 0.598 / 0.439 on the same fits). The bars leave 0.1 for
    another CPU's rounding and sit above the preset's target of 0.75 on average."""
    aurocs = [fast_preset_auroc(tmp_path, "ae_l2", data_seed) for data_seed in (0, 3)]
    assert min(aurocs) >= 0.80 and float(np.mean(aurocs)) >= 0.82, aurocs


@pytest.mark.slow
def test_ssim_aligned_preset_beats_the_per_pixel_baseline_on_the_aligned_toothbrush():
    """``ae_ssim``'s ``aligned`` preset (64 px, no mirrored training images, map standardized
    per pixel) on MVTec AD toothbrush, a part in a fixed pose: measured 0.986 against the
    per-pixel ``gaussian`` baseline's 0.886 (AMD EPYC; the ``fast`` preset scores 0.514).
    The bars leave margin for another CPU's rounding."""
    category = open_category(shared_category("mvtec_ad", "toothbrush"))
    aligned = fitted_image_auroc(get_model_class("ae_ssim").from_settings("aligned"), category)
    baseline = fitted_image_auroc(get_model_class("gaussian").from_settings(None), category)
    assert aligned >= 0.93 and aligned >= baseline + 0.03, (aligned, baseline)
