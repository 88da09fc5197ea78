"""Shared fixtures: small synthetic datasets made on the fly, and the real data if present."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flawscope.synth import SynthSpec, generate

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Both synthetic categories at 128 px with a few images each (about 1 s to make)."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthSpec(size=128, n_train=40, n_test_good=10, n_test_per_defect=5, seed=1))
    return root


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` PyTorch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SubnormalProbe:
    """A million floats below float32's normal range (1.2e-38). A product over them is split
    by PyTorch across its OpenMP threads, each of which has its own flush switch, so
    :meth:`survivors` counts the threads' switches together: 0 when every thread flushes,
    all of them when none does."""

    values = torch.full((1 << 20,), 1e-40)

    def survivors(self) -> int:
        return int((self.values * 1.0).count_nonzero())


@pytest.fixture
def subnormal_probe() -> Iterator[SubnormalProbe]:
    """A :class:`SubnormalProbe` with 2 PyTorch threads; skipped where the CPU cannot flush."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    with torch_threads(2):
        yield SubnormalProbe()


def fast_preset_auroc(root: Path, model: str, data_seed: int, train_seed: int = 0) -> float:
    """Image AUROC of ``model``'s ``fast`` preset as shipped, fitted with 2 threads (the
    presets' measured setting) on the default ``flawscope synth`` synthetic_object of
    ``data_seed`` (written under ``root``): one run of ``benchmarks/fast_presets.py``."""

    from flawscope.data import open_category
    from flawscope.models import get_model_class

    generate(root / str(data_seed), SynthSpec(seed=data_seed), categories=("synthetic_object",))
    category = open_category(root / str(data_seed) / "synthetic_object")
    return fitted_image_auroc(get_model_class(model).from_settings("fast", {"seed": train_seed}),
                              category)


def fitted_image_auroc(model, category) -> float:
    """Image AUROC on ``category``'s test set of ``model`` fitted with 2 threads on its
    training images."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from flawscope.data import ImageDataset

    with torch_threads(2):
        model.fit(ImageDataset(category.train, model.image_size))
    images = torch.stack([ImageDataset([t.path], model.image_size)[0] for t in category.test])
    labels = np.array([t.is_anomalous for t in category.test])
    return float(roc_auc_score(labels, model.score_tensor(images)[0].numpy()))


def shared_category(*parts: str) -> Path:
    """A category of ../shared/datasets, or skip the test where that folder is absent."""
    path = SHARED_DATASETS.joinpath(*parts)
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"real data not available at {path}")
    return path
