"""Inference engines: who runs a fitted model's scoring graph (PyTorch, onnxruntime, OpenVINO,
onnxruntime on the int8 graph).

Every engine takes what :meth:`AnomalyModel.score_batch` takes and returns what it returns:
``(B, 3, S, S)`` float32 images in [0, 1] -> ``(scores (B,), maps (B, h, w))``. Resizing the
images before and the maps after is the caller's job, done once for every engine, and the
model's normalization and map post-processing are inside the exported graph (the very torch
code ``score_batch`` runs), so an engine can change speed, never a decision: the export is
refused unless onnxruntime reproduces PyTorch within :data:`flawscope.export.TOLERANCE`
(and OpenVINO, when installed, is checked the same way before ``auto`` may pick it).

>>> model, manifest = load_model("runs/screw")             # doctest: +SKIP
>>> engine = open_engine(model, Path("runs/screw"))         # doctest: +SKIP
>>> engine.name, engine(images)[0].shape                    # doctest: +SKIP
('onnxruntime', torch.Size([16]))

``auto`` picks the fastest engine recorded by ``flawscope export`` (see
:func:`flawscope.export.export_model_dir`) whose parity check passed and whose file was made
from the weights now in the directory; anything else means eager PyTorch. An export left
behind by an earlier fit is never used: ``auto`` says so in the log and uses PyTorch, an
explicit ``onnxruntime`` is refused with the command that re-exports.

``int8`` runs ``model.int8.onnx`` (``flawscope export --int8``, :mod:`flawscope.quantize`)
with the same onnxruntime engine class. It is opt-in: its scores are close to PyTorch's
(the export's guard measured their correlation and the AUROC kept), not equal, so ``auto``
never picks it. A stale or unguarded int8 file is refused like a stale ONNX export.
"""

from __future__ import annotations

import logging
import queue
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import FlawscopeError
from .export import ONNX_FILE, onnx_session
from .modelfile import read_manifest
from .models import AnomalyModel

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "openvino", "int8")
#: Engines that run the exported float32 file.
FILE_ENGINES = ("onnxruntime", "openvino")


class EngineError(FlawscopeError):
    """The requested engine cannot run this model (no export, a stale one, a bad input)."""


class Engine(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, S, S)`` float32 in [0, 1] -> ``(scores (B,), maps (B, h, w))``."""
        ...


class TorchEngine:
    """Eager PyTorch: the model's own ``score_batch`` without autograd."""

    name = "torch"

    def __init__(self, model: AnomalyModel):
        self.model = model

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images, self.model.image_size, self.name)
        with torch.no_grad():
            scores, maps = self.model.score_batch(images.float())
        return scores.float().reshape(-1), maps.float()


class OnnxRuntimeEngine:
    """onnxruntime on the CPU, running the file ``flawscope export`` wrote.

    ``threads`` (default: PyTorch's current setting, so both engines use what the process
    was given) sets onnxruntime's intra-op pool; inter-op is 1 (the graphs are sequential).
    ``streams`` callers at a time share them (a session may be run from several threads), so
    each run gets ``threads // streams``. ``name`` is ``int8`` when the file is the quantized
    graph.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, image_size: int, threads: int | None = None,
                 name: str | None = None, streams: int = 1):
        self.name = name or type(self).name
        self.path = Path(path)
        self.image_size = image_size
        self.threads = threads or torch.get_num_threads()
        self.session = onnx_session(self.path, max(1, self.threads // max(1, streams)))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images, self.image_size, self.name)
        scores, maps = self.session.run(None, {"images": images.float().contiguous().numpy()})
        return torch.from_numpy(scores), torch.from_numpy(maps)


class OpenVinoEngine:
    """OpenVINO's CPU runtime on the same exported file (optional: ``pip install
    openvino``), at float32 precision (OpenVINO would otherwise pick bf16 on CPUs
    that have it, which the parity check did not cover).

    ``streams`` inference requests run at once, each on its own share of the ``threads``
    (one stream: every thread on one call at a time, the lowest latency). Several streams
    serve several callers, such as the service's scoring threads: on a 2-core AMD EPYC,
    PatchCore at 256 px scored 84-90 images/s with one stream and 101-103 with two streams
    and two callers, at batch 1, 4 and 8 alike. A caller waits for a free request.
    """

    name = "openvino"

    def __init__(self, path: str | Path, image_size: int, threads: int | None = None,
                 streams: int = 1):
        try:
            import openvino as ov
        except ImportError:
            raise EngineError("the openvino engine needs OpenVINO: pip install "
                              "openvino") from None
        self.path = Path(path)
        self.image_size = image_size
        self.threads = threads or torch.get_num_threads()
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", openvino_config(
            self.threads, streams))
        self.streams = max(1, int(streams))
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.streams):
            self._free.put(self.compiled.create_infer_request())

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images, self.image_size, self.name)
        request = self._free.get()
        try:
            out = request.infer({"images": images.float().contiguous().numpy()})
            scores, maps = (out[self.compiled.output(k)] for k in ("scores", "maps"))
            return torch.from_numpy(scores.copy()), torch.from_numpy(maps.copy())
        finally:
            self._free.put(request)


def openvino_config(threads: int, streams: int = 1) -> dict[str, Any]:
    """OpenVINO CPU settings: ``threads`` threads, float32; one stream (latency) or
    ``streams`` of them sharing the threads (throughput)."""
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads),
                              "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if streams > 1:
        config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=int(streams))
    return config


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _check_images(images: torch.Tensor, size: int, engine: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
        raise EngineError(f"{engine} engine: expected images of shape (B, 3, {size}, {size}), "
                          f"got {tuple(images.shape)}")


def onnx_export_status(model_dir: Path, manifest: dict[str, Any]) -> tuple[Path | None, str]:
    """The usable export of a model directory, or None and why not (a sentence)."""
    entry = (manifest.get("exports") or {}).get("onnx") or {}
    path = Path(entry.get("file", ONNX_FILE))
    path = path if path.is_absolute() else model_dir / path
    if not path.is_file():
        return None, f"{model_dir} has no ONNX export ({path.name} is missing)"
    weights = manifest.get("weights_sha256")
    stale = _stale_file(path, model_dir, weights)
    if stale:
        return None, stale
    if entry and entry.get("weights_sha256") not in (None, weights):
        return None, f"the manifest's ONNX entry of {model_dir} belongs to other weights"
    if entry and not entry.get("parity_ok", False):
        return None, f"{path} did not pass the parity check against PyTorch"
    return path, "ok"


def _stale_file(path: Path, model_dir: Path, weights: str | None) -> str | None:
    """Why the exported file at ``path`` cannot be used with ``weights`` (None: it can)."""
    try:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                .metadata_props}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        return f"{path} is not a readable ONNX file ({type(exc).__name__})"
    if meta.get("weights_sha256") != weights:
        return (f"{path} was exported from other weights than {model_dir}'s (the model "
                "was fitted again since)")
    return None


def int8_export_status(model_dir: Path, manifest: dict[str, Any]) -> tuple[Path | None, str]:
    """The usable int8 graph of a model directory, or None and why not (a sentence): it must
    exist, have passed the export's accuracy guard and come from the current weights."""
    from .quantize import INT8_FILE

    entry = (manifest.get("exports") or {}).get("int8") or {}
    path = model_dir / entry.get("file", INT8_FILE)
    if not path.is_file():
        return None, f"{model_dir} has no int8 export ({path.name} is missing)"
    # The file's own metadata first: it tells a file left by an earlier fit even when the
    # manifest no longer has (or has a wrong) entry.
    stale = _stale_file(path, model_dir, manifest.get("weights_sha256"))
    if stale:
        return None, stale
    if not entry.get("guard_ok"):
        return None, f"{path} has no passed accuracy check in the manifest"
    if entry.get("weights_sha256") != manifest.get("weights_sha256"):
        return None, f"the manifest's int8 entry of {model_dir} belongs to other weights"
    return path, "ok"


def recorded_speeds(manifest: dict[str, Any]) -> dict[str, float]:
    """Images/s per engine measured at export time (empty when not measured)."""
    entry = (manifest.get("exports") or {}).get("onnx") or {}
    return {k: float(v) for k, v in (entry.get("img_per_s") or {}).items()}


def open_engine(model: AnomalyModel, model_dir: Path | None, name: str = "auto",
                threads: int | None = None, warm_up: bool = True, streams: int = 1) -> Engine:
    """The engine ``name`` (``auto``, ``torch``, ``onnxruntime``, ``openvino``, ``int8``) for
    ``model``, which was loaded from ``model_dir`` (None: a model only in memory, which
    only ``torch`` and ``auto`` can run).

    ``threads`` (default: PyTorch's setting) is what the engine may use in all; ``streams``
    is how many callers will score at once (the service's scoring threads): the exported
    engines split their threads between them (eager PyTorch's threads are the process's
    setting, which the caller divides).

    ``warm_up`` scores one blank image before returning, so that one-time work is paid here
    and not by the first real batch: PatchCore and PaDiM build their backbone on first use
    (importing timm and torchvision, loading and folding the weights: 2 s or more, measured
    42 s on a loaded machine with a cold disk cache), and both engines allocate their
    buffers on the first call.
    """
    engine = _open_engine(model, model_dir, name, threads, max(1, int(streams)))
    if warm_up:
        size = model.image_size
        blank = torch.zeros(1, 3, size, size)
        # One call per OpenVINO stream, each with its own buffers (the calls take its
        # requests in turn); the other engines share theirs between callers.
        for _ in range(getattr(engine, "streams", 1)):
            if model.tile_grid is None:
                engine(blank)
            else:  # statistics per tile position: a tile needs its place in the grid
                model.score_tiles(blank, model.tile_grid, torch.zeros(1, dtype=torch.long),
                                  engine)
    return engine


def _open_engine(model: AnomalyModel, model_dir: Path | None, name: str,
                 threads: int | None, streams: int) -> Engine:
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "torch" or (name == "auto" and model_dir is None):
        return TorchEngine(model)
    if model_dir is None:
        raise EngineError(f"the {name} engine runs an exported file: load the model from its "
                          "directory")
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if name == "int8":
        path, why = int8_export_status(model_dir, manifest)
        if path is None:
            raise EngineError(f"cannot use the int8 engine: {why}; run `flawscope export "
                              f"{model_dir} --int8` (or use another --engine)")
        return OnnxRuntimeEngine(path, model.image_size, threads, name="int8", streams=streams)
    path, why = onnx_export_status(model_dir, manifest)
    if name in FILE_ENGINES:
        if path is None:
            raise EngineError(f"cannot use the {name} engine: {why}; run "
                              f"`flawscope export {model_dir}` (or use --engine torch)")
        if name == "openvino" and "exports" in manifest and not _openvino_parity_ok(manifest):
            raise EngineError(f"cannot use the openvino engine: the export of {model_dir} "
                              "was not checked with OpenVINO (install it, then run "
                              f"`flawscope export {model_dir}` again)")
        return _FILE_ENGINE[name](path, model.image_size, threads, streams=streams)
    # auto
    if path is None:
        if "no ONNX export" not in why:
            log.warning("engine auto: %s; using torch (run `flawscope export %s` to "
                        "re-export)", why, model_dir)
        return TorchEngine(model)
    speeds = recorded_speeds(manifest)
    usable = {"torch": speeds.get("torch", float("inf")),
              "onnxruntime": speeds.get("onnxruntime", 0.0)}
    if openvino_available() and _openvino_parity_ok(manifest):
        usable["openvino"] = speeds.get("openvino", 0.0)
    best = max(usable, key=usable.get)
    if best == "torch":
        return TorchEngine(model)
    return _FILE_ENGINE[best](path, model.image_size, threads, streams=streams)


def _openvino_parity_ok(manifest: dict[str, Any]) -> bool:
    entry = (manifest.get("exports") or {}).get("onnx") or {}
    return bool((entry.get("openvino") or {}).get("parity_ok"))


_FILE_ENGINE = {"onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine}
