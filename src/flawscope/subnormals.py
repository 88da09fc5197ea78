"""Flush subnormal floats to zero on every CPU thread PyTorch computes with.

As a network trains, some of the numbers of its backward pass sink below float32's normal
range (1.2e-38), where x86 CPUs compute many times slower (in the checkpoint below: no weight
and no layer output, but 4,454 weight gradients). The SSIM autoencoder's paper preset,
36 epochs into magnetic tile, took 2.3-2.6 s for a forward and backward of 8 images on 2
threads, 0.31-0.37 s with subnormals flushed on both threads (Intel Xeon; an epoch, 762
images, went from 2-3 minutes to about 30 s). Values that small change no weight that
matters.

``torch.set_flush_denormal`` sets the switch (the FTZ and DAZ bits of the MXCSR register) of
the calling thread only, while PyTorch's convolutions and matrix products run on the worker
threads of its OpenMP runtime, which keep their own: the main thread's switch alone took the
same step only from 2.3-2.5 to 2.1-2.2 s. So :func:`flushed_subnormals` also runs the switch once on
every thread of each loaded OpenMP runtime, through that runtime's ``GOMP_parallel`` entry
point (exported by GNU libgomp, which the Linux PyTorch wheels ship, and by LLVM's libomp);
threadpoolctl finds the runtimes. Where no runtime exports it, only the calling thread flushes.

Usage::

    with flushed_subnormals():
        train()   # every OpenMP thread treats subnormals as zero here, and only here
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

import torch
from threadpoolctl import threadpool_info

_PARALLEL_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_lock = threading.Lock()


def _openmp_runtimes() -> list[ctypes.CDLL]:
    runtimes = []
    for info in threadpool_info():
        if info.get("user_api") != "openmp":
            continue
        try:
            runtime = ctypes.CDLL(info["filepath"])
            parallel = runtime.GOMP_parallel
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [_PARALLEL_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        runtimes.append(runtime)
    return runtimes


def set_flush_on_all_threads(flush: bool) -> bool:
    """Set the flush switch on the calling thread and on every OpenMP worker thread.

    Returns False where the CPU cannot flush subnormals (then nothing changed).
    """
    if not torch.set_flush_denormal(flush):
        return False
    body = _PARALLEL_BODY(lambda _: torch.set_flush_denormal(flush))
    with _lock:
        for runtime in _openmp_runtimes():
            # num_threads 0: the runtime's current team size, which torch.set_num_threads sets.
            runtime.GOMP_parallel(body, None, 0, 0)
    return True


@contextlib.contextmanager
def flushed_subnormals() -> Iterator[None]:
    """Treat subnormal floats as zero on every thread while the block runs, then restore the
    default (off; PyTorch has no getter for the switch)."""
    set_flush_on_all_threads(True)
    try:
        yield
    finally:
        set_flush_on_all_threads(False)
