"""Warm images/s of inference engines, each timed alone in a fresh process.

``auto`` picks the engine that ``flawscope export`` measured fastest, so the measurement must
not depend on what ran before it. Timed one after another in one process, the engines
disturb each other: each keeps its own thread pool (PyTorch's OpenMP, onnxruntime's,
OpenVINO's TBB), whose threads go on spinning for a while after a call and take cores from
the next engine. Measured in one process on a 2-core AMD EPYC (PaDiM, 256 px, batch 16,
2 threads), the same onnxruntime session gave 22, 50 and 20 images/s on three successive
timings and eager PyTorch 8, 27 and 34, where ``benchmarks/engines.py`` (one engine per
process) measures 45 and 26. Here every engine is timed in its own new Python process
(``python -m flawscope.enginespeed``, so the caller's script is never re-imported), one at a
time, on the same seeded batch: a few seconds more per export for figures that can be
trusted.

>>> speeds = engine_speeds([("torch", "runs/screw"), ("onnxruntime", "runs/screw/model.onnx")],
...                        image_size=256, threads=2)        # doctest: +SKIP
>>> speeds                                                   # doctest: +SKIP
{'torch': 25.9, 'onnxruntime': 46.1}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import FlawscopeError

#: What each engine name times: ``torch`` loads a model directory, the others open a file.
ENGINE_SOURCES = {"torch": "model directory", "onnxruntime": "ONNX file",
                  "openvino": "ONNX file", "int8": "int8 ONNX file"}


def engine_speeds(engines: Sequence[tuple[str, str | Path]], image_size: int, threads: int,
                  batch_size: int = 16, min_s: float = 1.0) -> dict[str, float]:
    """``{name: warm images/s}`` of each ``(name, source)`` in ``engines``, each timed in a
    new process (one at a time) with ``threads`` threads on a seeded random batch of
    ``batch_size`` images, for at least ``min_s`` seconds after one untimed call."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    speeds: dict[str, float] = {}
    for name, source in engines:
        if name not in ENGINE_SOURCES:
            raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINE_SOURCES)}")
        args = [name, str(source), str(image_size), str(threads), str(batch_size), str(min_s)]
        proc = subprocess.run([sys.executable, "-m", "flawscope.enginespeed", *args],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise FlawscopeError(f"timing the {name} engine on {source} failed: {last}")
        speeds[name] = round(json.loads(proc.stdout.strip().splitlines()[-1]), 2)
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


if __name__ == "__main__":
    name, source, size, threads, batch, min_s = sys.argv[1:7]
    print(json.dumps(_time_engine(name, source, int(size), int(threads), int(batch),
                                  float(min_s))))
