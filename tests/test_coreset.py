"""Approximate coreset (flawscope.cellcoreset): seeded, bounded, covering; PatchCore with it."""

import functools
import json

import numpy as np
import pytest
import torch

from flawscope.cellcoreset import StreamingCoreset, cell_coreset
from flawscope.coreset import greedy_coreset
from flawscope.data import ImageDataset, TestDataset, open_category
from flawscope.errors import FlawscopeError
from flawscope.kmeans import partition
from flawscope.metrics import image_auroc
from flawscope.modelfile import load_model, save_model
from flawscope.models import get_model_class
from flawscope.models import patchcore as patchcore_module
from flawscope.synth import SynthSpec, generate


def clustered(seed: int, n: int = 12000, dim: int = 16) -> torch.Tensor:
    """Clusters of different spreads, like patch features (some parts vary more)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, dim, generator=g) * 4
    spread = torch.rand(30, generator=g) * 1.5 + 0.3
    label = torch.randint(30, (n,), generator=g)
    return centres[label] + torch.randn(n, dim, generator=g) * spread[label, None]


def covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    """Largest distance from a point to its nearest chosen point (float64, brute force)."""
    return float(torch.cdist(points.double(), chosen.double()).min(1).values.max())


def test_partition_covers_every_row_once_in_bounded_cells():
    points = clustered(0, n=5000)
    cells = partition(points, 200, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(cells).tolist()) == list(range(5000))
    assert max(len(c) for c in cells) <= 400 + 200 // 8 * len(cells)  # merged small cells
    assert min(len(c) for c in cells) >= 200 // 8


def test_cell_coreset_is_seeded_and_bounded():
    points = clustered(1)
    first = cell_coreset(points, 500, seed=3, cell_size=256)
    assert first.tolist() == cell_coreset(points, 500, seed=3, cell_size=256).tolist()
    assert first.tolist() != cell_coreset(points, 500, seed=4, cell_size=256).tolist()
    assert len(first) == 500 and len(set(first.tolist())) == 500
    assert 0 <= int(first.min()) and int(first.max()) < len(points)
    # Only 50 distinct points (each 4 times): no more than 50 can be chosen, and all are.
    distinct = clustered(2, n=50)
    chosen = cell_coreset(distinct.repeat(4, 1), 120, cell_size=16)
    assert len(chosen) == 50
    assert sorted((chosen % 50).tolist()) == list(range(50))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_covering_radius_is_close_to_the_exact_greedy(seed):
    # Measured over seeds 0-4: the cell coreset's radius is 0.97-0.98 times the exact greedy
    # k-center's, the streamed one (4 chunks) 1.09-1.11 times. Exact greedy is itself only
    # a 2-approximation of the optimum, so the bound is a factor over it, with margin: 1.25.
    points = clustered(seed)
    k = 600
    exact = covering_radius(points, points[greedy_coreset(points, k, None, progress=False)])
    cells = cell_coreset(points, k, seed=seed, cell_size=256)
    assert covering_radius(points, points[cells]) <= 1.25 * exact
    stream = StreamingCoreset(k / len(points), seed=seed, chunk_rows=3000, cell_size=256)
    for part in points.split(1000):
        stream.add(part)
    rows = stream.result()
    assert rows.shape == (k, points.shape[1])
    assert covering_radius(points, rows) <= 1.25 * exact


def test_a_wide_cluster_gets_more_points_than_a_tight_one():
    # Equal counts, spreads 1 and 4: greedy k-center gives the wide cluster most points (a
    # fixed share per cell would give both the same); the cells must follow the exact one.
    g = torch.Generator().manual_seed(0)
    tight = torch.randn(4000, 8, generator=g)
    wide = torch.randn(4000, 8, generator=g) * 4 + 100
    points = torch.cat([tight, wide])
    exact_wide = int((greedy_coreset(points, 400, None, progress=False) >= 4000).sum())
    cells_wide = int((cell_coreset(points, 400, cell_size=256) >= 4000).sum())
    assert exact_wide > 300
    assert abs(cells_wide - exact_wide) <= 20


def test_streaming_coreset_errors_and_small_inputs():
    with pytest.raises(ValueError, match="ratio"):
        StreamingCoreset(0)
    with pytest.raises(ValueError, match="no rows"):
        StreamingCoreset(0.1).result()
    stream = StreamingCoreset(0.5)
    stream.add(torch.ones(1, 4))
    assert torch.equal(stream.result(), torch.ones(1, 4))


def test_streamed_rows_keep_their_sources_through_every_reduction():
    # Each row carries its source in its first column, so a kept row shows where it came from.
    generator = torch.Generator().manual_seed(0)
    stream = StreamingCoreset(ratio=0.1, chunk_rows=1500, seed=2)
    for _ in range(8):
        rows = torch.randn(700, 6, generator=generator)
        sources = torch.randint(0, 50, (700,), generator=generator)
        rows[:, 0] = sources
        stream.add(rows, sources)
    rows, sources = stream.result_with_sources()
    assert len(rows) == 560 and torch.equal(rows[:, 0].long(), sources)
    with pytest.raises(ValueError, match="every add or with none"):
        stream = StreamingCoreset(ratio=0.1)
        stream.add(torch.randn(10, 4), torch.zeros(10))
        stream.add(torch.randn(10, 4))


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_coreset")
    generate(root, SynthSpec(size=96, n_train=30, n_test_good=10, n_test_per_defect=5, seed=4),
             categories=("synthetic_texture",))
    return open_category(root / "synthetic_texture")


def fit_patchcore(category, **settings):
    model = get_model_class("patchcore").from_settings(None, {"image_size": 128, **settings})
    model.fit(ImageDataset(category.train, 128))
    return model


def test_patchcore_with_the_approx_coreset_ranks_defects_above_good_images(texture,
                                                                        monkeypatch):
    # Small chunks, so that the fit streams: 30 images x 256 patches in chunks of 2048 rows.
    monkeypatch.setattr(patchcore_module, "StreamingCoreset",
                        functools.partial(StreamingCoreset, chunk_rows=2048))
    model = fit_patchcore(texture, coreset="approx")
    assert len(model.memory_bank) == int(np.ceil(model.config.coreset_ratio * 30 * 256))
    test = TestDataset(texture.test, 128, 128)
    images = torch.stack([test[i][0] for i in range(len(test))])
    scores, _ = model.score_tensor(images)
    labels = [int(item.is_anomalous) for item in texture.test]
    assert image_auroc(labels, scores.tolist()) > 0.95


def test_auto_coreset_is_exact_on_small_sets_and_old_files_score_the_same(texture, tmp_path):
    auto = fit_patchcore(texture)                     # the default, auto: 7,680 patches: exact
    exact = fit_patchcore(texture, coreset="exact")
    assert torch.equal(auto.memory_bank, exact.memory_bank)
    # A model saved before the coreset setting existed has no "coreset" in its manifest.
    save_model(exact, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    del manifest["config"]["coreset"]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    loaded, _ = load_model(tmp_path / "m")
    images = torch.stack([ImageDataset(texture.train, 128)[i] for i in range(3)])
    before, after = exact.score_tensor(images), loaded.score_tensor(images)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_unknown_coreset_is_a_clear_error():
    with pytest.raises(FlawscopeError, match="coreset='fastest'.*exact"):
        get_model_class("patchcore").from_settings(None, {"coreset": "fastest"})
