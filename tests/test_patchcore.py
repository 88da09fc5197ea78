"""PatchCore: exact coreset and neighbour search, detection on synthetic data, safe files."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flawscope import nnsearch
from flawscope.backbones import MATCHED_MIN_SPREAD, intensity_reference
from flawscope.cli import cli
from flawscope.coreset import greedy_coreset, random_projection
from flawscope.data import ImageDataset, open_category
from flawscope.modelfile import load_model
from flawscope.models import get_model_class
from flawscope.models.patchcore import PatchCoreConfig
from flawscope.nnsearch import ClusteredBank, nearest_distances, nearest_indices
from flawscope.synth import SynthSpec, generate


def assert_greedy_k_center(points: torch.Tensor, chosen: list[int], k: int, start: int) -> None:
    """``chosen`` is a greedy k-center selection of ``points`` up to float32 near-ties.

    Replays the selection in float64: every added point must be the farthest from the points
    chosen before it, or within ``tol`` of the farthest. The coreset works in float32 with
    ``|a|² - 2a·b + |b|²``, whose rounding is at most a few ``eps32 · (|a|² + |b|²)`` on d²,
    i.e. ``eps32 · (|a|² + |b|²) / d`` on d. A near-tie inside that band (measured on an
    AVX-512 Xeon: 2.4338242 vs 2.4338261, 2e-6 apart) may go either way, after which the
    two sequences legitimately differ; a real error (a skipped block) picks a point far
    from the farthest, by a fraction of the cluster spread, and still fails.
    """
    p = points.double()
    assert len(chosen) == k and len(set(chosen)) == k and chosen[0] == start
    sq = (p * p).sum(1)
    eps32 = torch.finfo(torch.float32).eps
    min_dist = torch.full((len(p),), float("inf"), dtype=torch.float64)
    for i, nxt in enumerate(chosen[1:], start=1):
        min_dist = torch.minimum(min_dist, (p - p[chosen[i - 1]]).pow(2).sum(1).sqrt())
        best = float(min_dist.max())
        # 16 eps: the expansion's three terms and the dot product's accumulation, with room.
        tol = 16 * eps32 * float(2 * sq.max()) / max(best, 1e-12)
        assert float(min_dist[nxt]) >= best - tol, (i, float(min_dist[nxt]), best, tol)


@pytest.mark.parametrize("n, dim, k, block", [(300, 2, 60, 4), (2000, 16, 200, 8),
                                              (3000, 5, 600, 16), (257, 40, 257, 64)])
def test_coreset_equals_brute_force_greedy_k_center(n, dim, k, block):
    g = torch.Generator().manual_seed(n)
    # clustered points, like patch features: the case where blocks get skipped
    centres = torch.randn(20, dim, generator=g) * 5
    points = centres[torch.randint(20, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    ours = greedy_coreset(points, k, projection_dim=None, start=7, block_size=block,
                          progress=False)
    assert_greedy_k_center(points, ours.tolist(), k, start=7)


def test_coreset_with_projection_is_k_center_of_the_projected_points():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(1500, 64, generator=g)
    ours = greedy_coreset(points, 150, projection_dim=16, seed=3, start=0, progress=False)
    projected = random_projection(points, 16, torch.Generator().manual_seed(3))
    assert_greedy_k_center(projected, ours.tolist(), 150, start=0)
    # seeded: the same call gives the same selection
    again = greedy_coreset(points, 150, projection_dim=16, seed=3, progress=False)
    assert again.tolist() == greedy_coreset(points, 150, projection_dim=16, seed=3,
                                            progress=False).tolist()


def test_nearest_neighbour_scores_equal_brute_force():
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(700, 24, generator=g)
    queries = torch.randn(1000, 24, generator=g)
    bank_sq = (bank * bank).sum(1)
    dist = nearest_distances(queries, bank, bank_sq, query_chunk=300, bank_chunk=70)
    full = torch.cdist(queries.double(), bank.double())
    best, best_index = full.min(1)
    torch.testing.assert_close(dist.double(), best, rtol=1e-5, atol=1e-5)
    one_tile = nearest_distances(queries, bank, bank_sq)  # default tile sizes
    torch.testing.assert_close(one_tile, dist)
    index = nearest_indices(queries, bank, bank_sq)
    assert (index == best_index).float().mean() > 0.999  # ties in float32 aside


def test_clustered_search_finds_the_same_neighbours_as_brute_force():
    # Clustered rows like real patch features, offset far from the origin (the float32
    # rounding of |q|^2 - 2 q.m + |m|^2 grows with the norms), and queries both near the bank
    # (normal patches) and far from it (defects, which need many clusters).
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(40, 32, generator=g) * 4 + 20
    bank = centres[torch.randint(40, (5000,), generator=g)] + torch.randn(5000, 32, generator=g)
    near = bank[torch.randint(5000, (1500,), generator=g)] + 0.3 * torch.randn(1500, 32,
                                                                             generator=g)
    far = torch.randn(100, 32, generator=g) * 10 + 20
    queries = torch.cat([near, far])
    search = ClusteredBank(bank, cluster_size=64, min_rows=1000)
    assert search.n_clusters == 78
    dist = search.search(queries)
    assert not brute_force_calls(search, queries)  # the clusters were used, not bypassed
    best = torch.cdist(queries.double(), bank.double()).amin(1)
    # float32 expansion at norms of ~110: distances agree to a few 1e-3, like brute force's.
    torch.testing.assert_close(dist.double(), best, rtol=0, atol=5e-3)
    plain = nearest_distances(queries, bank, (bank * bank).sum(1))
    torch.testing.assert_close(dist, plain, rtol=0, atol=5e-3)
    assert (dist[1500:] > 5).all()  # the far queries really were far
    # A small bank is searched plainly.
    assert ClusteredBank(bank[:100], min_rows=1000).n_clusters == 1


def brute_force_calls(search: ClusteredBank, queries: torch.Tensor) -> int:
    """How many times ``search.search(queries)`` fell back to the brute-force search."""
    calls = []
    original = nnsearch.nearest_distances

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nnsearch, "nearest_distances", counting)
        search.search(queries)
    return len(calls)


def test_clustered_search_falls_back_to_brute_force_where_clusters_cannot_prune():
    # Unstructured rows (like the patches of a fine texture): every query is about as far
    # from every cluster, nearly all pairs survive the skip test, and brute force is cheaper.
    g = torch.Generator().manual_seed(6)
    bank = torch.randn(4000, 64, generator=g)
    queries = torch.randn(500, 64, generator=g)
    search = ClusteredBank(bank, cluster_size=64, min_rows=1000)
    assert search.n_clusters == 62
    assert brute_force_calls(search, queries) == 1
    best = torch.cdist(queries.double(), bank.double()).amin(1)
    torch.testing.assert_close(search.search(queries).double(), best, rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_pc")
    generate(root, SynthSpec(size=96, n_train=30, n_test_good=10, n_test_per_defect=5, seed=4),
             categories=("synthetic_texture",))
    return root / "synthetic_texture"


@pytest.fixture(scope="module")
def fitted(texture, tmp_path_factory):
    """patchcore fitted and tested through the CLI, small input to keep the test quick."""
    out = tmp_path_factory.mktemp("pc")
    runner = CliRunner()
    fit = runner.invoke(cli, ["fit", "--data", str(texture), "--model", "patchcore",
                              "--set", "image_size=128", "--calibration", "holdout",
                              "--out", str(out / "model")])
    assert fit.exit_code == 0, fit.output
    test = runner.invoke(cli, ["test", "--model", str(out / "model"), "--data", str(texture),
                               "--out", str(out / "results")])
    assert test.exit_code == 0, test.output
    return out


def test_patchcore_finds_synthetic_texture_defects(fitted):
    metrics = json.loads((fitted / "results" / "metrics.json").read_text())
    assert metrics["model"] == "patchcore"
    assert metrics["image_auroc"] > 0.95
    assert metrics["pixel_auroc"] > 0.9


def test_saved_patchcore_is_small_and_scores_identically(fitted, texture):
    model, manifest = load_model(fitted / "model")
    assert model.memory_bank.dtype == torch.float16
    n_patches = round(0.9 * 30) * 16 * 16  # fit images x patches per image at 128 px
    assert len(model.memory_bank) == int(np.ceil(PatchCoreConfig.coreset_ratio * n_patches))
    images = torch.stack([ImageDataset(open_category(texture).train, 128)[i] for i in range(4)])
    before = model.score_tensor(images)
    again, _ = load_model(fitted / "model")
    after = again.score_tensor(images)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # and the bank the fitted model held is the one on disk
    assert manifest["config"]["coreset_ratio"] == PatchCoreConfig.coreset_ratio


def test_reweighting_only_lowers_the_max_score(fitted, texture):
    model, _ = load_model(fitted / "model")
    images = torch.stack([ImageDataset(open_category(texture).train, 128)[i] for i in range(3)])
    plain, maps = model.score_tensor(images)
    model.config.reweight = True
    weighted, maps2 = model.score_tensor(images)
    assert torch.equal(maps, maps2)
    assert ((weighted <= plain) & (weighted > 0)).all()


def test_bad_settings_are_clear_errors():
    cls = get_model_class("patchcore")
    with pytest.raises(Exception, match="coreset_ratio"):
        cls.from_settings(None, {"coreset_ratio": "1.5"})
    with pytest.raises(Exception, match="bank_dtype"):
        cls.from_settings(None, {"bank_dtype": "int8"})


ENSEMBLE = "efficientnet_lite0+efficientnet_lite2"


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_backbone_ensemble_finds_synthetic_defects_and_saves(name, texture, tmp_path):
    """Both feature models with two backbones: features of the real (summed) width, defects
    ranked above good images, and a saved model that scores identically."""
    from sklearn.metrics import roc_auc_score

    from flawscope.modelfile import save_model

    model = get_model_class(name).from_settings(None, {"image_size": 64, "backbone": ENSEMBLE})
    cat = open_category(texture)
    model.fit(ImageDataset(cat.train, 64))
    if name == "patchcore":
        assert model.memory_bank.shape[1] == 88 + 232  # lite0 + lite2, stages 2 and 4
    else:
        assert sum(model.extractor.channels) == 48 + 88 + 232  # stages 1, 2 and 4
    images = torch.stack([ImageDataset([t.path for t in cat.test], 64)[i]
                          for i in range(len(cat.test))])
    scores, _ = model.score_tensor(images)
    labels = [t.is_anomalous for t in cat.test]
    # 10 good and 20 defect images of 96 px seen at 64: measured 1.0 for both models
    assert roc_auc_score(labels, scores.numpy()) > 0.9
    save_model(model, tmp_path / "m")
    again, manifest = load_model(tmp_path / "m")
    assert manifest["config"]["backbone"] == ENSEMBLE
    s2, m2 = again.score_tensor(images[:4])
    s1, m1 = model.score_tensor(images[:4])
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


def test_unknown_backbone_in_a_setting_is_a_clear_error():
    from flawscope.errors import FlawscopeError

    for name in ("patchcore", "padim"):
        with pytest.raises(FlawscopeError, match="unknown backbone 'resnet50' in"):
            get_model_class(name).from_settings(None, {"backbone": "efficientnet_lite0+resnet50"})


@pytest.mark.parametrize("intensity", ["standardized", "matched", "highpass"])
def test_intensity_treatment_ignores_a_change_of_lighting_and_still_finds_defects(
        texture, intensity):
    """``intensity="standardized"``, ``"matched"`` or ``"highpass"``: a good image under
    other lighting (washed out: a third of the contrast, brighter) scores as the image
    itself, where the raw model scores it above every good image (measured: mean 22.6
    against 14.3, defects 25.5); defects still rank above good images."""
    from sklearn.metrics import roc_auc_score

    from flawscope.errors import FlawscopeError

    cat = open_category(texture)
    test = ImageDataset([t.path for t in cat.test], 64)
    images = torch.stack([test[i] for i in range(len(test))])
    good = images[[not t.is_anomalous for t in cat.test]]
    relit = good * 0.3 + 0.6  # stays inside [0, 1]: nothing is clipped
    scores = {}
    for treatment in ("raw", intensity):
        model = get_model_class("patchcore").from_settings(
            None, {"image_size": 64, "intensity": treatment})
        model.fit(ImageDataset(cat.train, 64))
        scores[treatment] = (model.score_tensor(good)[0], model.score_tensor(relit)[0])
        if treatment == intensity:
            all_scores = model.score_tensor(images)[0]
            assert roc_auc_score([t.is_anomalous for t in cat.test], all_scores.numpy()) > 0.9
    as_is, relit_treated = scores[intensity]
    torch.testing.assert_close(relit_treated, as_is, rtol=0.02, atol=0.0)
    raw_good, raw_relit = scores["raw"]
    assert raw_relit.min() > raw_good.max(), (raw_good, raw_relit)
    with pytest.raises(FlawscopeError, match="intensity='bright': choose one of raw, "
                                             "standardized, matched, highpass"):
        get_model_class("patchcore").from_settings(None, {"intensity": "bright"})


#: Every feature model that takes ``intensity``, with small settings (simplenet: two steps).
MATCHED = {"patchcore": {}, "padim": {},
           "simplenet": {"epochs": 1, "batches_per_epoch": 2, "batch_size": 256}}


@pytest.mark.parametrize("name", sorted(MATCHED))
def test_matched_intensity_reference_is_the_training_median_and_travels_with_the_file(
        name, texture, tmp_path):
    """The reference is the median over the training images of each image's mean and
    spread (the spread at least MATCHED_MIN_SPREAD); a saved model scores identically; a
    file that lost it is a clear error."""
    from flawscope.errors import FlawscopeError
    from flawscope.modelfile import save_model

    train = ImageDataset(open_category(texture).train, 64)
    settings = {"image_size": 64, "intensity": "matched", **MATCHED[name]}
    model = get_model_class(name).from_settings(None, settings)
    model.fit(train)
    pixels = np.stack([train[i].numpy().ravel() for i in range(len(train))])
    # torch's median of an even count is the lower middle value, as is this
    middle = (len(pixels) - 1) // 2
    expected = [np.sort(pixels.mean(1))[middle],
                max(np.sort(pixels.std(1, ddof=1))[middle], MATCHED_MIN_SPREAD)]
    np.testing.assert_allclose(model.extractor.intensity_reference.numpy(), expected,
                               rtol=1e-4)
    images = torch.stack([train[i] for i in range(4)]) * 0.5 + 0.2
    save_model(model, tmp_path / "m")
    again, _ = load_model(tmp_path / "m")
    for a, b in zip(model.score_tensor(images), again.score_tensor(images), strict=True):
        assert torch.equal(a, b)
    tensors = {k: v for k, v in model.state_tensors().items() if k != "intensity_reference"}
    with pytest.raises(FlawscopeError, match="intensity=matched but no intensity_reference"):
        get_model_class(name).from_settings(None, settings).load_state_tensors(tensors)


def test_matched_reference_stretches_a_low_contrast_part_to_the_least_spread():
    """Images of spread 0.05 are matched to MATCHED_MIN_SPREAD, images of a spread above it
    to their own; the mean is the median mean either way."""
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(3, 32, 32, generator=generator) for _ in range(5)]
    high = MATCHED_MIN_SPREAD + 0.1
    flat = [0.4 + 0.05 * (n - n.mean()) / n.std() for n in noise]
    contrasty = [0.5 + high * (n - n.mean()) / n.std() for n in noise]
    np.testing.assert_allclose(intensity_reference(flat).numpy(), [0.4, MATCHED_MIN_SPREAD],
                               atol=1e-5)
    np.testing.assert_allclose(intensity_reference(contrasty).numpy(), [0.5, high], atol=1e-5)


def test_fine_preset_scores_a_patch_grid_at_stride_4_by_its_smoothed_map(texture):
    """The ``fine`` preset: block groups 1, 2 and 4 on a grid of image_size / 4, the image
    score the largest value of the smoothed map, and synthetic defects found."""
    from sklearn.metrics import roc_auc_score

    model = get_model_class("patchcore").from_settings("fine", {"image_size": 64})
    cat = open_category(texture)
    model.fit(ImageDataset(cat.train, 64))
    assert model.embed(torch.rand(1, 3, 64, 64)).shape == (1, 24 + 40 + 112, 16, 16)
    test = ImageDataset([t.path for t in cat.test], 64)
    images = torch.stack([test[i] for i in range(len(test))])
    scores, maps = model.score_tensor(images)
    assert torch.equal(scores, maps.flatten(1).amax(1))
    assert roc_auc_score([t.is_anomalous for t in cat.test], scores.numpy()) > 0.9
