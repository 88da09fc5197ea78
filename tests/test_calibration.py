"""Calibration scores from models that did not see the image: leave-one-out equals a refit."""

import numpy as np
import pytest
import torch

from flawscope.calibration import calibrate, kfold_indices, resolve_method
from flawscope.data import ImageDataset, open_category
from flawscope.errors import FlawscopeError
from flawscope.modelfile import load_model, read_manifest, save_model
from flawscope.models import get_model_class
from flawscope.pipeline import fit_model
from flawscope.synth import SynthSpec, generate


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_calib")
    generate(root, SynthSpec(size=64, n_train=12, n_test_good=2, n_test_per_defect=1, seed=7),
             categories=("synthetic_texture",))
    return open_category(root / "synthetic_texture")


def _dataset(category, size, paths=None):
    return ImageDataset(list(paths if paths is not None else category.train), size)


def _score_one(model, dataset, i):
    scores, maps = model.score_tensor(dataset[i][None])
    return float(scores[0]), maps[0].numpy()


@pytest.mark.parametrize("reweight,coreset", [(False, "exact"), (True, "exact"),
                                               (False, "approx")])
def test_patchcore_leave_one_out_equals_a_bank_without_that_images_patches(texture, reweight,
                                                                           coreset):
    model = get_model_class("patchcore").from_settings(
        None, {"image_size": 64, "coreset_ratio": 0.25, "reweight": reweight,
               "coreset": coreset})
    train = _dataset(texture, 64)
    model.fit(train)
    scores, maps = model.leave_one_out_scores(train)
    assert scores.shape == (len(train),) and maps.shape == (len(train), 64, 64)
    bank, source = model.memory_bank, model.bank_source
    assert source.shape == (len(bank),) and set(source.tolist()) <= set(range(len(train)))
    for i in (0, 5, len(train) - 1):
        other = get_model_class("patchcore").from_settings(
            None, {"image_size": 64, "coreset_ratio": 0.25, "reweight": reweight})
        other._set_bank(bank[source != i])  # the same coreset less image i's rows
        score, amap = _score_one(other, train, i)
        # Brute force vs clustered search: same neighbours, float32 sums in another order.
        assert scores[i] == pytest.approx(score, rel=1e-4)
        np.testing.assert_allclose(maps[i], amap, rtol=1e-4, atol=1e-5)
    # Scored in-sample, an image finds its own patches; left out, it scores higher.
    in_sample = model.score_tensor(torch.stack([train[i] for i in range(len(train))]))[0]
    assert (scores >= in_sample.numpy() - 1e-5).all() and (scores > in_sample.numpy()).any()


@pytest.mark.parametrize("coreset", ["exact", "approx"])
def test_patchcore_kfold_from_features_computed_once_equals_refitting(texture, coreset,
                                                                      monkeypatch):
    settings = {"image_size": 64, "coreset_ratio": 0.25, "coreset": coreset}

    def make():
        return get_model_class("patchcore").from_settings(None, settings)

    cls = type(make())
    original, results = cls.kfold_scores, []

    def spy(self, images, folds):
        results.append(original(self, images, folds))
        return results[-1]

    monkeypatch.setattr(cls, "kfold_scores", spy)
    fast = calibrate(make, texture.train, method="kfold", folds=3, seed=0)
    assert len(results) == 1 and results[0] is not None  # cross-fitted, no refit
    monkeypatch.setattr(cls, "kfold_scores", lambda self, images, folds: None)
    refit = calibrate(make, texture.train, method="kfold", folds=3, seed=0)
    a, b = fast.calibration, refit.calibration
    assert a["method"] == b["method"] == "kfold" and a["n_images"] == b["n_images"] == 12
    # The same banks from the same rows: equal up to the backbone's float rounding on
    # batches grouped differently (a different pick would move scores by whole units).
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4)
    np.testing.assert_allclose(a["map_max_per_image"], b["map_max_per_image"], rtol=1e-4)
    assert a["map_p50"] == pytest.approx(b["map_p50"], rel=1e-4)
    # The saved model is the one fitted on every image either way.
    torch.testing.assert_close(fast.model.memory_bank, refit.model.memory_bank)


def test_patchcore_saved_with_bank_sources_and_old_files_still_load(texture, tmp_path):
    model = get_model_class("patchcore").from_settings(None, {"image_size": 64,
                                                              "coreset_ratio": 0.25})
    model.fit(_dataset(texture, 64))
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert torch.equal(loaded.bank_source, model.bank_source)
    old = get_model_class("patchcore").from_settings(None, {"image_size": 64})
    old.load_state_tensors({"memory_bank": model.memory_bank})  # a file from before
    assert old.bank_source is None and old.leave_one_out_scores(_dataset(texture, 64)) is None


@pytest.mark.parametrize("name,settings", [
    ("padim", {"image_size": 64, "n_features": 20}),
    ("gaussian", {"image_size": 64}),
])
def test_closed_form_leave_one_out_equals_a_refit_without_the_image(texture, name, settings):
    cls = get_model_class(name)
    model = cls.from_settings(None, settings)
    train = _dataset(texture, 64)
    model.fit(train)
    scores, maps = model.leave_one_out_scores(train)
    assert scores.shape == (len(train),) and maps.shape == (len(train), 64, 64)
    for i in (0, 7):
        refit = cls.from_settings(None, settings)
        refit.fit(_dataset(texture, 64, [p for j, p in enumerate(texture.train) if j != i]))
        score, amap = _score_one(refit, train, i)
        # PaDiM: Sherman-Morrison on a float32 inverse vs a fresh float32 inverse; measured
        # relative differences below 1e-4, checked at 1e-3.
        assert scores[i] == pytest.approx(score, rel=1e-3)
        np.testing.assert_allclose(maps[i], amap, rtol=1e-3, atol=1e-3 * amap.max())


def test_leave_one_out_refuses_another_dataset(texture):
    model = get_model_class("padim").from_settings(None, {"image_size": 64, "n_features": 20})
    model.fit(_dataset(texture, 64))
    with pytest.raises(FlawscopeError, match="fitted on"):
        model.leave_one_out_scores(_dataset(texture, 64, texture.train[:5]))


def test_kfold_indices_cover_every_image_once():
    folds = kfold_indices(23, 5, seed=1)
    assert len(folds) == 5
    assert sorted(np.concatenate(folds).tolist()) == list(range(23))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


@pytest.mark.parametrize("method,fitted_on,held", [
    ("loo", 12, 0), ("auto", 12, 0), ("holdout", 11, 1), ("kfold", 12, 0)])
def test_calibrate_methods(texture, method, fitted_on, held):
    def make():
        return get_model_class("gaussian").from_settings(None, {"image_size": 64})

    result = calibrate(make, texture.train, method=method, holdout=0.1, folds=3, seed=0)
    record = result.calibration
    expected = "loo" if method == "auto" else method
    assert record["method"] == expected
    assert result.n_fit == fitted_on and result.n_holdout == held
    assert record["n_images"] == (held if method == "holdout" else 12)
    assert len(record["scores"]) == record["n_images"] == len(record["map_max_per_image"])
    assert record["map_p50"] <= record["map_p99"] <= record["map_max"]


@pytest.mark.parametrize("name,settings,n,tiled,expected", [
    ("padim", {}, 40, False, "loo"),            # leave-one-out equals a refit
    ("gaussian", {}, 40, False, "loo"),
    ("padim", {}, 40, True, "holdout"),         # no leave-one-out over tiles
    ("patchcore", {}, 40, False, "kfold"),      # a coreset chosen with the image
    ("patchcore", {}, 40, True, "kfold"),       # k-fold refits, so tiles are fine
    ("patchcore", {"full_bank_patches": 131072}, 8, False, "loo"),  # no coreset: exact
    ("patchcore", {}, 2, False, "holdout"),     # too few images to split
    ("ae_l2", {}, 40, False, "holdout"),        # expensive fit
])
def test_auto_calibration_is_what_each_model_does_best(name, settings, n, tiled, expected):
    model = get_model_class(name).from_settings(None, settings)
    assert resolve_method(model, "auto", n, tiled) == expected


def test_loo_on_a_model_without_it_is_a_clear_error(texture):
    def make():
        return get_model_class("ae_l2").from_settings(None, {"image_size": 64})

    with pytest.raises(FlawscopeError, match="leave-one-out"):
        calibrate(make, texture.train, method="loo")


def test_fit_model_with_leave_one_out_holds_nothing_out(synth_root, tmp_path):
    result = fit_model(synth_root / "synthetic_object", "gaussian", tmp_path / "m",
                       calibration="loo", max_false_alarm=0.05)
    manifest = read_manifest(tmp_path / "m")
    assert result.n_holdout == 0 and result.n_train == 40
    assert manifest["calibration"]["method"] == "loo"
    assert manifest["calibration"]["n_images"] == 40 == manifest["threshold"]["n_good"]
    assert manifest["threshold"]["calibration"] == "loo"
    assert manifest["threshold"]["method"] == "good_quantile"  # 40 >= 19 images for 5%
    assert manifest["threshold"]["pixel_value"] >= manifest["calibration"]["map_p99"]
