"""ONNX export of a fitted model's scoring graph, checked against PyTorch.

The exported graph is exactly what :meth:`AnomalyModel.onnx_module` returns: input
``images`` ``float32 (B, 3, S, S)`` in [0, 1] (RGB, resized to the model's ``image_size``,
no other normalization: the model normalizes inside), outputs ``scores (B,)`` and
``maps (B, h, w)`` at the model's own map resolution (resize them bilinearly to the image,
as flawscope does). The batch size is dynamic. The fitted state (statistics, network
weights, memory banks) is stored as constants in the file, and the manifest's threshold and
normalized-score scale are copied into its metadata so the file can be used on its own.

Export uses PyTorch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter
needs ``onnxscript``, which is not a flawscope dependency, and the graphs here are static.
Every export is checked with onnxruntime on a batch of a different size from the one
traced, so a graph that silently baked in a shape or a Python branch is caught.

:func:`export_model_dir` is what ``flawscope export`` runs on a model directory: it writes
``model.onnx`` beside the weights and records in the manifest (``exports.onnx``) the weights
it was made from, the parity check's errors and the measured images/s of PyTorch and
onnxruntime, which :func:`flawscope.engines.open_engine` uses to pick the engine. The file's
metadata also carries the weights' SHA-256, so a file left behind by an earlier fit is
recognised as stale even without the manifest entry.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FlawscopeError
from .models import AnomalyModel

#: Largest accepted difference between onnxruntime and PyTorch, relative (see ``compare``).
TOLERANCE = 1e-4
OPSET = 17
#: File name of the export inside a model directory.
ONNX_FILE = "model.onnx"
#: Batch size of the speed measurement recorded at export (what ``test`` and ``serve`` use).
SPEED_BATCH = 16


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    score_rel_err: float
    map_rel_err: float
    checked_batch: int
    #: Warm images/s per engine, when :func:`export_model_dir` measured them.
    img_per_s: dict[str, float] | None = None


def scoring_module(model: AnomalyModel) -> torch.nn.Module:
    """The model's exportable scoring module, or a clear error if it has none."""
    module = model.onnx_module()
    if module is None:
        raise FlawscopeError(f"model {model.name!r} cannot be exported to ONNX: its scoring is "
                             "not a fixed torch graph (it has no onnx_module)")
    return module.eval()


def compare(onnx_out: tuple[np.ndarray, np.ndarray],
            torch_out: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Relative errors (scores: per element; maps: relative to the map's largest magnitude,
    since normal pixels sit near zero where a per-pixel ratio means nothing)."""
    (s1, m1), (s2, m2) = onnx_out, torch_out
    if s1.shape != s2.shape or m1.shape != m2.shape:
        raise FlawscopeError(f"ONNX output shapes {s1.shape}, {m1.shape} differ from PyTorch "
                             f"{s2.shape}, {m2.shape}")
    tiny = np.finfo(np.float32).tiny
    score_err = float(np.max(np.abs(s1 - s2) / np.maximum(np.abs(s2), tiny)))
    map_err = float(np.max(np.abs(m1 - m2)) / max(float(np.max(np.abs(m2))), tiny))
    return score_err, map_err


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_outputs(module: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = module(images)
    return scores.float().numpy(), maps.float().numpy()


def export_onnx(model: AnomalyModel, path: str | Path, manifest: dict[str, Any] | None = None,
                check_images: torch.Tensor | None = None) -> ExportReport:
    """Export ``model`` to ``path`` (written atomically) and check it against PyTorch.

    ``check_images`` (``(B, 3, S, S)`` in [0, 1]) are what the check scores; by default three
    random images. Raises :class:`FlawscopeError` if the outputs differ by more than
    :data:`TOLERANCE`.
    """
    import onnx

    module = scoring_module(model)
    size = model.image_size
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # One eager run first: lazy one-time work (e.g. torchvision checking its CUDA
            # build on first use inside timm) must not be recorded into the graph.
            module(example)
            torch.onnx.export(module, (example,), str(tmp), dynamo=False,
                              opset_version=OPSET, input_names=["images"],
                              output_names=["scores", "maps"],
                              dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"},
                                            "maps": {0: "batch"}})
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        meta = _metadata(model, manifest or {})
        for key, value in meta.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(tmp))
        if check_images is None:
            check_images = torch.rand(3, 3, size, size, generator=generator)
        session = onnx_session(tmp)
        got = session.run(None, {"images": check_images.float().numpy()})
        score_err, map_err = compare((got[0], got[1]), torch_outputs(module, check_images))
        if max(score_err, map_err) > TOLERANCE:
            raise FlawscopeError(f"exported {model.name} differs from PyTorch (relative error: "
                                 f"scores {score_err:.2g}, maps {map_err:.2g}; tolerance "
                                 f"{TOLERANCE}); not written")
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, FlawscopeError):
            raise
        raise FlawscopeError(f"ONNX export of {model.name} failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return ExportReport(path, path.stat().st_size, score_err, map_err, len(check_images))


def _metadata(model: AnomalyModel, manifest: dict[str, Any]) -> dict[str, str]:
    threshold = manifest.get("threshold") or {}
    return {
        "flawscope_model": model.name,
        "weights_sha256": str(manifest.get("weights_sha256", "")),
        "image_size": str(model.image_size),
        "input": "images float32 [B,3,S,S] RGB in [0,1]",
        "outputs": "scores [B]; maps [B,h,w] (resize bilinearly to the image)",
        "threshold": json.dumps({"value": threshold.get("value"),
                                 "scale": threshold.get("scale"),
                                 "method": threshold.get("method")}),
        "normalized_score": "1 / (1 + exp(-(score - threshold.value) / threshold.scale))",
        # How images become inputs (flawscope.geometry); "resize" where none is recorded.
        "geometry": json.dumps(manifest.get("geometry") or {"mode": "resize"}),
    }


def images_per_s(fn, batch: torch.Tensor | np.ndarray, min_s: float, min_runs: int = 2) -> float:
    """Warm images/s of ``fn(batch)``: one untimed run first (lazy allocation, thread pools),
    then at least ``min_runs`` runs and ``min_s`` seconds."""
    fn(batch)
    runs, start = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < min_s:
        fn(batch)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - start)


def measure_speeds(model_dir: str | Path, path: str | Path, image_size: int,
                   threads: int | None = None, batch_size: int = SPEED_BATCH,
                   min_s: float = 1.0, openvino: bool = False) -> dict[str, float]:
    """Warm images/s of PyTorch (the model saved in ``model_dir``) and of onnxruntime (and
    OpenVINO) on the file at ``path``, on the same random batch, with ``threads`` threads
    each (default: PyTorch's setting), each engine alone in a fresh process
    (:mod:`flawscope.enginespeed`)."""
    from .enginespeed import engine_speeds

    engines = [("torch", model_dir), ("onnxruntime", path)]
    if openvino:
        engines.append(("openvino", path))
    return engine_speeds(engines, image_size, threads or torch.get_num_threads(), batch_size,
                         min_s)


def check_openvino(model: AnomalyModel, path: str | Path,
                   check_images: torch.Tensor | None = None) -> dict[str, Any]:
    """OpenVINO's outputs on the exported file against PyTorch's, like the export's own
    check: ``{"score_rel_err", "map_rel_err", "parity_ok", "version"}``."""
    import openvino

    from .engines import OpenVinoEngine

    if check_images is None:
        size = model.image_size
        check_images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    scores, maps = OpenVinoEngine(path, model.image_size)(check_images)
    score_err, map_err = compare((scores.numpy(), maps.numpy()),
                                 torch_outputs(scoring_module(model), check_images))
    return {"score_rel_err": score_err, "map_rel_err": map_err,
            "parity_ok": max(score_err, map_err) <= TOLERANCE,
            "version": openvino.__version__}


def export_model_dir(model_dir: str | Path, out: str | Path | None = None,
                     check_images: torch.Tensor | None = None, measure_s: float = 1.0,
                     threads: int | None = None) -> ExportReport:
    """Export the model saved in ``model_dir`` (to ``model_dir/model.onnx`` by default),
    check it, time the engines (warm, at least ``measure_s`` seconds each; 0 = no timing)
    and record it all in the manifest's ``exports.onnx``. Where OpenVINO is installed the
    file is checked and timed with it too (``exports.onnx.openvino``).

    >>> report = export_model_dir("runs/screw")          # doctest: +SKIP
    >>> read_manifest("runs/screw")["exports"]["onnx"]["img_per_s"]  # doctest: +SKIP
    {'torch': 30.1, 'onnxruntime': 61.7}
    """
    import onnxruntime

    from .modelfile import load_model, update_manifest

    model_dir = Path(model_dir)
    model, manifest = load_model(model_dir)
    path = Path(out) if out is not None else model_dir / ONNX_FILE
    report = export_onnx(model, path, manifest, check_images)
    threads = threads or torch.get_num_threads()
    entry: dict[str, Any] = {
        "file": (path.name if path.resolve().parent == model_dir.resolve()
                 else str(path.resolve())),
        "weights_sha256": manifest.get("weights_sha256"),
        "score_rel_err": report.score_rel_err,
        "map_rel_err": report.map_rel_err,
        "tolerance": TOLERANCE,
        "parity_ok": True,  # export_onnx raises otherwise
        "checked_batch": report.checked_batch,
        "onnxruntime_version": onnxruntime.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    from .engines import openvino_available
    from .gallery import cpu_model

    with_openvino = openvino_available()
    if with_openvino:
        entry["openvino"] = check_openvino(model, path, check_images)
        with_openvino = entry["openvino"]["parity_ok"]
    if measure_s > 0:
        entry["img_per_s"] = measure_speeds(model_dir, path, model.image_size, threads,
                                            min_s=measure_s,
                                            openvino=with_openvino)
        entry["speed"] = {"batch": SPEED_BATCH, "threads": threads, "cpu": cpu_model()}
    exports = dict(manifest.get("exports") or {})
    exports["onnx"] = entry
    update_manifest(model_dir, exports=exports)
    report.img_per_s = entry.get("img_per_s")
    return report
