"""Warm images/s of inference engines, each timed alone in a fresh process.

``auto`` picks the engine that ``flawscope export`` measured fastest, so the measurement must
not depend on what ran before it. Timed one after another in one process, the engines
disturb each other: each keeps its own thread pool (PyTorch's OpenMP, onnxruntime's,
OpenVINO's TBB), whose threads go on spinning for a while after a call and take cores from
the next engine. Measured in one process on a 2-core AMD EPYC (PaDiM, 256 px, batch 16,
2 threads), the same onnxruntime session gave 22, 50 and 20 images/s on three successive
timings and eager PyTorch 8, 27 and 34, where ``benchmarks/engines.py`` (one engine per
process) measures 45 and 26. Here every engine is timed in its own freshly spawned process,
one at a time, on the same seeded batch: a few seconds more per export for figures that
can be trusted.

>>> speeds = engine_speeds([("torch", "runs/screw"), ("onnxruntime", "runs/screw/model.onnx")],
...                        image_size=256, threads=2)        # doctest: +SKIP
>>> speeds                                                   # doctest: +SKIP
{'torch': 25.9, 'onnxruntime': 46.1}
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: What each engine name times: ``torch`` loads a model directory, the others open a file.
ENGINE_SOURCES = {"torch": "model directory", "onnxruntime": "ONNX file",
                  "openvino": "ONNX file", "int8": "int8 ONNX file"}


def engine_speeds(engines: Sequence[tuple[str, str | Path]], image_size: int, threads: int,
                  batch_size: int = 16, min_s: float = 1.0) -> dict[str, float]:
    """``{name: warm images/s}`` of each ``(name, source)`` in ``engines``, each timed in a
    fresh process (one at a time) with ``threads`` threads on a seeded random batch of
    ``batch_size`` images, for at least ``min_s`` seconds after one untimed call."""
    context = multiprocessing.get_context("spawn")
    speeds: dict[str, float] = {}
    for name, source in engines:
        if name not in ENGINE_SOURCES:
            raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINE_SOURCES)}")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            speeds[name] = round(pool.submit(_time_engine, name, str(source), image_size,
                                             threads, batch_size, min_s).result(), 2)
    return speeds


def _time_engine(name: str, source: str, image_size: int, threads: int, batch_size: int,
                 min_s: float) -> float:
    """In the child process: open one engine and time it."""
    import torch

    from .engines import OnnxRuntimeEngine, OpenVinoEngine, TorchEngine
    from .export import images_per_s
    from .modelfile import load_model

    torch.set_num_threads(threads)
    if name == "torch":
        engine = TorchEngine(load_model(source)[0])
    elif name == "openvino":
        engine = OpenVinoEngine(source, image_size, threads)
    else:
        engine = OnnxRuntimeEngine(source, image_size, threads, name=name)
    batch = torch.rand(batch_size, 3, image_size, image_size,
                       generator=torch.Generator().manual_seed(1))
    return images_per_s(engine, batch, min_s)
