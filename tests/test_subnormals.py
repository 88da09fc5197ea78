import ctypes.util

import pytest
import torch

from flawscope import subnormals

SUBNORMALS = torch.full((1 << 20,), 1e-40)  # below float32's normal range (1.2e-38)


def survivors() -> int:
    """Subnormals left by a product that PyTorch splits over its threads."""
    return int((SUBNORMALS * 1.0).count_nonzero())


@pytest.fixture
def two_threads():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_library_without_an_openmp_entry_point_leaves_the_calling_thread_flushing(
        two_threads, monkeypatch):
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no C library to stand in for an OpenMP runtime")
    monkeypatch.setattr(subnormals, "threadpool_info",
                        lambda: [{"user_api": "openmp", "filepath": libc}])
    with subnormals.flushed_subnormals():
        assert float(SUBNORMALS[:1] * 1.0) == 0.0  # one element: computed on this thread
    assert float(SUBNORMALS[:1] * 1.0) > 0
    assert survivors() == SUBNORMALS.numel()


def test_an_exception_inside_leaves_every_thread_at_the_default(two_threads):
    with pytest.raises(RuntimeError), subnormals.flushed_subnormals():
        assert survivors() == 0
        raise RuntimeError("training failed")
    assert survivors() == SUBNORMALS.numel()
