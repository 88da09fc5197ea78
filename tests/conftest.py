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


def shared_category(*parts: str) -> Path:
    """A category of ../shared/datasets, or skip the test where that folder is absent."""
    path = SHARED_DATASETS.joinpath(*parts)
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"real data not available at {path}")
    return path
