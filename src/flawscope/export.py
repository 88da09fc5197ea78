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
"""

from __future__ import annotations

import json
import os
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


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    score_rel_err: float
    map_rel_err: float
    checked_batch: int


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
