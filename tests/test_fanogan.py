"""f-AnoGAN: the WGAN-GP penalty, frozen G and D in stage 2, resumable and reproducible
training, and detection on the synthetic object category."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_preset_auroc
from sklearn.metrics import roc_auc_score

from flawscope.data import ImageDataset, TestDataset, open_category
from flawscope.errors import FlawscopeError
from flawscope.modelfile import load_model, save_model
from flawscope.models.fanogan import FAnoGANConfig, FAnoGANModel, gradient_penalty
from flawscope.synth import SynthSpec, generate

#: The short run of the detection test (about 80 s on one core): 32 px, 800 critic and
#: generator updates (n_critic=1 so that the generator gets enough of them), then 640 encoder
#: updates at a larger step (stage 2 is plain regression onto a fixed G). Over training seeds
#: 0-4 this scored image AUROC 0.871, 0.844, 0.853, 0.857 and 0.892 on the test set below.
SHORT_RUN = dict(image_size=32, width=16, stage1_epochs=40, stage2_epochs=32,
                 batches_per_epoch=20, n_critic=1, encoder_lr=1e-3, picture_every_stage1=10,
                 picture_every_stage2=8, seed=0)
#: Tiny nets for tests of the training machinery, not of the result.
TINY = dict(image_size=16, width=4, latent_dim=8, batch_size=8, batches_per_epoch=3,
            stage1_epochs=2, stage2_epochs=2, picture_every_stage1=0, picture_every_stage2=0)


@pytest.fixture(scope="module")
def synth_object(tmp_path_factory) -> Path:
    # Made at the short run's resolution: one-pixel scratches and cracks stay one sharp pixel
    # instead of being halved in contrast by a resize.
    root = tmp_path_factory.mktemp("synth32")
    generate(root, SynthSpec(size=32, n_train=60, n_test_good=24, n_test_per_defect=8, seed=1),
             categories=("synthetic_object",))
    return root / "synthetic_object"


@pytest.fixture(scope="module")
def trained(synth_object, tmp_path_factory):
    """One short fit shared by the tests below."""
    workdir = tmp_path_factory.mktemp("fanogan") / "training"
    model = FAnoGANModel(FAnoGANConfig(**SHORT_RUN))
    train = open_category(synth_object).train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same result on any machine, and fair to a shared one
    try:
        model.fit(ImageDataset(train, model.image_size), workdir=workdir)
    finally:
        torch.set_num_threads(threads)
    return model, workdir


def _test_images(category: Path, size: int):
    """(images, masks, defect types) of the test set, decoded once."""
    items = open_category(category).test
    dataset = TestDataset(items, size, size)
    images, masks, _, _ = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    masks = [torch.zeros(size, size, dtype=torch.bool) if m is None else torch.from_numpy(m)
             for m in masks]  # no mask: a good image
    return torch.stack(images), torch.stack(masks), [t.defect_type for t in items]


def test_gradient_penalty_equals_closed_form_for_a_linear_critic():
    # D(x) = w·x + b has gradient w everywhere, so GP = lambda·(||w|| - 1)² for any mix.
    torch.manual_seed(0)
    w = torch.randn(3 * 8 * 8, requires_grad=True)

    def critic(x):
        return x.flatten(1) @ w + 0.3

    real, fake = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    mix = torch.rand(5, 1, 1, 1)
    gp = gradient_penalty(critic, real, fake, mix, 10.0)
    norm = w.detach().norm()
    assert gp.item() == pytest.approx(10.0 * (norm.item() - 1) ** 2, rel=1e-5)
    # The graph is kept, so the penalty trains the critic: d/dw = 2·lambda·(||w||-1)·w/||w||.
    gp.backward()
    expected = 2 * 10.0 * (norm - 1) * w.detach() / norm
    assert torch.allclose(w.grad, expected, rtol=1e-4, atol=1e-5)


def test_stage2_leaves_generator_and_critic_untouched_and_resumes_stage1(synth_object,
                                                                        tmp_path):
    train = ImageDataset(open_category(synth_object).train[:16], 16)
    workdir = tmp_path / "training"
    model = FAnoGANModel(FAnoGANConfig(**{**TINY, "stage2_epochs": 0}))
    model.fit(train, workdir=workdir)
    after_stage1 = {k: v.clone() for k, v in model.state_tensors().items()}
    # Same settings except more encoder epochs: stage 1 is resumed as finished, stage 2 runs.
    model = FAnoGANModel(FAnoGANConfig(**{**TINY, "stage2_epochs": 3}))
    model.fit(train, workdir=workdir)
    after_stage2 = model.state_tensors()
    for key, value in after_stage1.items():
        if key.startswith(("G.", "D.")):  # weights and batch-norm statistics alike
            assert torch.equal(value, after_stage2[key]), key
    assert any(not torch.equal(after_stage1[k], after_stage2[k])
               for k in after_stage1 if k.startswith("E."))
    assert all(p.requires_grad for p in model.generator.parameters())  # restored after fit
    assert len(model.history["stage2"]) == 3


def test_encoder_lr_changes_only_stage_two(synth_object):
    train = ImageDataset(open_category(synth_object).train[:16], 16)
    fits = []
    for encoder_lr in (0.0, 1e-2):  # 0 = the adversarial lr, 2e-4
        model = FAnoGANModel(FAnoGANConfig(**TINY, encoder_lr=encoder_lr))
        model.fit(train)
        fits.append(model.state_tensors())
    same, other = fits
    for key in same:
        if key.startswith(("G.", "D.")):
            assert torch.equal(same[key], other[key]), key
    changed = [k for k in same if k.startswith("E.") and not torch.equal(same[k], other[k])]
    assert changed


def test_new_stage2_settings_reuse_stage1_and_match_a_fresh_fit(synth_object, tmp_path,
                                                                  monkeypatch):
    train = ImageDataset(open_category(synth_object).train[:16], 16)
    workdir = tmp_path / "training"
    FAnoGANModel(FAnoGANConfig(**TINY)).fit(train, workdir=workdir)
    other = {**TINY, "kappa": 0.3, "encoder_lr": 1e-3}
    fresh = FAnoGANModel(FAnoGANConfig(**other))
    fresh.fit(train)

    batches = {"n": 0}
    original = FAnoGANModel._batch

    def count(self, *args):
        batches["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(FAnoGANModel, "_batch", count)
    per_stage2 = TINY["stage2_epochs"] * TINY["batches_per_epoch"]
    reused = FAnoGANModel(FAnoGANConfig(**other))
    reused.fit(train, workdir=workdir)
    assert batches["n"] == per_stage2  # stage 1 came from its checkpoint
    a, b = fresh.state_tensors(), reused.state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.history == reused.history
    # A stage-1 setting starts stage 1 over.
    batches["n"] = 0
    FAnoGANModel(FAnoGANConfig(**{**other, "lr": 1e-3})).fit(train, workdir=workdir)
    assert batches["n"] > per_stage2


def test_a_fit_stopped_at_once_resumes_from_the_last_epoch(synth_object, tmp_path,
                                                         monkeypatch):
    """A KeyboardInterrupt that is not deferred (a second Ctrl-C, or one raised outside the
    loop's handler) writes nothing: the epoch's checkpoint is what resumes, bit for bit."""
    train = ImageDataset(open_category(synth_object).train[:16], 16)
    plain = FAnoGANModel(FAnoGANConfig(**TINY))
    plain.fit(train, workdir=tmp_path / "plain")

    calls = {"n": 0}
    original = FAnoGANModel._batch

    def interrupt_once(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # in stage 1, epoch 2, batch 1: mid-epoch
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(FAnoGANModel, "_batch", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        FAnoGANModel(FAnoGANConfig(**TINY)).fit(train, workdir=tmp_path / "resumed")
    assert (tmp_path / "resumed" / "fanogan_stage1.pt").is_file()
    resumed = FAnoGANModel(FAnoGANConfig(**TINY))
    resumed.fit(train, workdir=tmp_path / "resumed")
    a, b = plain.state_tensors(), resumed.state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.history == resumed.history


@pytest.mark.parametrize("stage, call", [(1, 5), (2, 3)])
def test_ctrl_c_inside_an_optimizer_step_resumes_to_the_same_weights(stage, call, synth_object,
                                                                      tmp_path, monkeypatch):
    """A real SIGINT delivered while Adam steps: in stage 1 inside the critic's step of
    n_step 5 (epoch 2, batch 2), whose generator step must still follow; in stage 2 inside
    the encoder's 3rd step. The fit stops after that whole step, and resumes bit for bit."""
    train = ImageDataset(open_category(synth_object).train[:16], 16)
    plain = FAnoGANModel(FAnoGANConfig(**TINY))
    plain.fit(train)

    calls = {"n": 0}
    real_step = torch.optim.Adam.step
    stage1_calls = 2 * 3 + 1  # 6 critic steps and one generator step (n_critic 5)

    def step_and_press_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call + (stage1_calls if stage == 2 else 0):
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_and_press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        FAnoGANModel(FAnoGANConfig(**TINY)).fit(train, workdir=tmp_path)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    saved = torch.load(tmp_path / f"fanogan_stage{stage}.pt", weights_only=True)
    if stage == 1:  # critic and generator of n_step 5 both done, nothing of n_step 6
        assert calls["n"] == 6 and (saved["epoch"], saved["batch"], saved["n_step"]) == (1, 2, 5)
    else:
        assert calls["n"] == stage1_calls + 3 and (saved["epoch"], saved["batch"]) == (1, 0)

    resumed = FAnoGANModel(FAnoGANConfig(**TINY))
    resumed.fit(train, workdir=tmp_path)
    a, b = plain.state_tensors(), resumed.state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.history == resumed.history


def test_encoder_loss_falls_and_pictures_are_written(trained):
    model, workdir = trained
    losses = [row["encoder_loss"] for row in model.history["stage2"]]
    assert losses[-1] < 0.8 * losses[0]
    for name in ("losses.png", "losses_stage1.csv", "losses_stage2.csv",
                 "stage1_samples_epoch00001.png", "stage1_samples_epoch00040.png",
                 "stage2_reconstructions_epoch00008.png", "stage2_reconstructions_epoch00032.png"):
        assert (workdir / name).is_file(), name
    header = (workdir / "losses_stage1.csv").read_text().splitlines()[0]
    assert header == "epoch,critic_loss,wasserstein,gradient_penalty,generator_loss"


def test_ranks_synthetic_defects_above_good_images(trained, synth_object):
    # All four defect types against good parts, with the paper's score A_R + kappa·A_D.
    model, _ = trained
    images, masks, kinds = _test_images(synth_object, 32)
    scores, maps = model.score_batch(images)
    labels = [kind != "good" for kind in kinds]
    assert sorted(set(kinds)) == ["crack", "good", "missing_piece", "scratch", "stain"]
    assert roc_auc_score(labels, scores.numpy()) > 0.75
    assert maps.shape == (len(kinds), 32, 32)
    # The map is meant to point at the defect: on the missing pieces (the largest defects)
    # the residual inside the mask is higher than outside it.
    for i, kind in enumerate(kinds):
        if kind == "missing_piece":
            mask = masks[i]
            assert maps[i][mask].mean() > maps[i][~mask].mean(), f"test image {i}"


def test_saved_model_scores_identically_and_reconstructs(trained, synth_object, tmp_path):
    model, _ = trained
    images, _, _ = _test_images(synth_object, 32)
    images = images[:6]
    save_model(model, tmp_path / "model")
    loaded, _ = load_model(tmp_path / "model")
    s1, m1 = model.score_batch(images)
    s2, m2 = loaded.score_batch(images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    rec = loaded.reconstruct(images)
    assert rec.shape == images.shape and rec.min() >= 0 and rec.max() <= 1
    # The map is the channel mean of |x - G(E(x))|, in [0, 1] intensity units.
    assert torch.allclose(m2, (images - rec).abs().mean(1), atol=1e-5)
    samples = loaded.sample(5, seed=3)
    assert samples.shape == (5, 3, 32, 32)
    assert torch.equal(samples, loaded.sample(5, seed=3))
    assert not torch.equal(samples, loaded.sample(5, seed=4))


def test_bad_settings_are_refused_clearly():
    with pytest.raises(FlawscopeError, match="4·2"):
        FAnoGANModel(FAnoGANConfig(image_size=48))
    with pytest.raises(FlawscopeError, match="no training images"):
        FAnoGANModel(FAnoGANConfig(**TINY)).fit(ImageDataset([], 16))
    model = FAnoGANModel.from_settings("fast", {"stage1_epochs": "3"})
    assert model.config.stage1_epochs == 3 and model.image_size == 32
    assert np.isclose(FAnoGANModel.from_settings("paper").config.lr, 2e-4)


@pytest.mark.slow
def test_fast_preset_detects_on_the_default_synthetic_object(tmp_path):
    """The ``fast`` preset as shipped (max of the residual map standardized per pixel by the
    good training images) on the default ``flawscope synth`` output, for one of the ten runs
    it was chosen on (one fit costs about a minute): data seed 1, training seed 0, measured
    0.931 (AMD EPYC, 2 threads; the paper's score A_R + kappa·A_D scored 0.743 on that fit).
    Over all ten runs 0.935 on average and 0.861 at worst; the bar leaves 0.13 for another
    CPU's rounding and sits above the preset's target of 0.75."""
    auroc = fast_preset_auroc(tmp_path, "fanogan", data_seed=1)
    assert auroc >= 0.80, auroc
