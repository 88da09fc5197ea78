import ctypes.util

import pytest

from flawscope import subnormals


def test_a_library_without_an_openmp_entry_point_leaves_the_calling_thread_flushing(
        subnormal_probe, monkeypatch):
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no C library to stand in for an OpenMP runtime")
    monkeypatch.setattr(subnormals, "threadpool_info",
                        lambda: [{"user_api": "openmp", "filepath": libc}])
    one = subnormal_probe.values[:1]
    with subnormals.flushed_subnormals():
        assert float(one * 1.0) == 0.0  # one element: computed on this thread
    assert float(one * 1.0) > 0
    assert subnormal_probe.survivors() == subnormal_probe.values.numel()


def test_an_exception_inside_leaves_every_thread_at_the_default(subnormal_probe):
    with pytest.raises(RuntimeError), subnormals.flushed_subnormals():
        assert subnormal_probe.survivors() == 0
        raise RuntimeError("training failed")
    assert subnormal_probe.survivors() == subnormal_probe.values.numel()
