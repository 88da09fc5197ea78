"""The inspection service: ``flawscope serve MODEL_DIR`` (FastAPI + uvicorn).

Endpoints
    ``GET /health``
        ``{"status": "ok", "model", "image_size", "threshold", "workers"}``.
    ``POST /predict`` (multipart field ``file``; ``?heatmap=true`` to get the heat map)
        ``{"model", "filename", "width", "height", "score", "normalized_score",
        "is_anomalous", "threshold", "latency_ms"}`` with the same meaning as in
        ``flawscope predict`` (see :mod:`flawscope.threshold`); with ``heatmap=true`` also
        ``"heatmap_png"``: the overlay PNG, base64-encoded, so one request gives everything.
        ``latency_ms`` is measured in the server from the upload being received to the
        answer being ready (decoding, queueing, scoring, heat map).

Bad requests get a 4xx with ``{"detail": "..."}`` and the server keeps serving:
413 for an upload over ``max_upload_bytes`` or an image over ``max_pixels`` (decompression
bombs are refused from the header, before decoding), 415 for a file that is not a PNG, JPEG,
BMP or TIFF image (other formats are refused on purpose: some PIL decoders, such as EPS, run
external programs), 400 for a truncated or corrupt image or an empty upload, 422 when the
``file`` field is missing.

Two cores are used by a pool of ``workers`` threads: decoding, scoring and PNG encoding all
run in the pool (PyTorch and PIL release the GIL), with PyTorch limited to
``cpu_count // workers`` threads each so the workers do not fight over cores.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from PIL import Image, UnidentifiedImageError

from .data import to_rgb
from .errors import FlawscopeError

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_WORKERS = 2
#: Room for the multipart envelope (boundaries, part headers) on top of the file itself.
_ENVELOPE = 16 * 1024
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


class UploadError(FlawscopeError):
    """A request the client must fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Uploaded bytes -> RGB image, or an :class:`UploadError` saying what is wrong."""
    if not data:
        raise UploadError(400, "empty upload: send the image as multipart field 'file'")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise UploadError(413, f"image is {width}x{height} = {width * height:,} pixels, "
                                       f"over the limit of {max_pixels:,}")
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError:
        raise UploadError(415, "not an image flawscope accepts (send PNG, JPEG, BMP or "
                               "TIFF)") from None
    except Image.DecompressionBombError as exc:
        raise UploadError(413, f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(400, f"corrupt or truncated image ({exc})") from None


class Predictor:
    """A loaded model plus its decision rule, scoring uploads in a thread pool."""

    def __init__(self, model_dir: str | Path, workers: int = DEFAULT_WORKERS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, torch_threads: int | None = None):
        import torch

        from .modelfile import load_model
        from .threshold import decision_for

        self.model, self.manifest = load_model(model_dir)
        self.decide = decision_for(self.manifest)
        self.workers = max(1, int(workers))
        self.max_pixels = max_pixels
        threads = torch_threads or max(1, (os.cpu_count() or 1) // self.workers)
        torch.set_num_threads(threads)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="flawscope-worker")

    def predict(self, data: bytes, heatmap: bool = False) -> dict[str, Any]:
        """Decode, score and decide one upload (runs in a worker thread)."""
        image = decode_upload(data, self.max_pixels)
        [(score, amap)] = self.model.score([image], batch_size=1)
        result: dict[str, Any] = {"model": self.model.name, "width": image.width,
                                  "height": image.height, **self.decide(score)}
        if heatmap:
            from .visualize import display_range, heatmap_overlay

            overlay = heatmap_overlay(image, amap,
                                      display_range(amap, self.manifest.get("calibration")))
            buffer = io.BytesIO()
            overlay.save(buffer, format="PNG")
            result["heatmap_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return result

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model.name, "image_size": self.model.image_size,
                "threshold": self.decide.value, "workers": self.workers}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class BodyLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with a 413.

    The body is read (and, past the limit, drained and dropped, up to ``drain_bytes``) before
    the application sees it, so an over-sized upload gets a proper answer instead of a reset
    connection, and never reaches the multipart parser.
    """

    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else 4 * max_bytes + (1 << 20)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size <= self.max_bytes:
                chunks.append(body)
            if not message.get("more_body", False) or size > self.drain_bytes:
                break
        if size > self.max_bytes:
            limit_mb = (self.max_bytes - _ENVELOPE) / 1e6
            await _send_json(send, 413, {"detail": f"upload of {size:,} bytes or more is over "
                                                   f"the limit of {limit_mb:.1f} MB"})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(model_dir: str | Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = DEFAULT_WORKERS,
               torch_threads: int | None = None):
    """The ASGI application serving the model in ``model_dir``."""
    predictor = Predictor(model_dir, workers, max_pixels, torch_threads)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        predictor.close()

    app = FastAPI(title="flawscope inspection service", lifespan=lifespan,
                  description=f"model {predictor.model.name} from {model_dir}")
    app.state.predictor = predictor

    @app.get("/health")
    def health() -> dict[str, Any]:
        return predictor.health()

    @app.post("/predict")
    async def predict(file: UploadFile = File(...),
                      heatmap: bool = Query(False, description="add heatmap_png (base64)")):
        start = time.perf_counter()
        data = await file.read()
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(predictor.pool, predictor.predict, data,
                                                heatmap)
        except UploadError as exc:
            raise HTTPException(exc.status, f"{file.filename}: {exc}") from None
        result["filename"] = file.filename
        result["latency_ms"] = (time.perf_counter() - start) * 1000
        return result

    return BodyLimit(app, int(max_upload_mb * 1e6) + _ENVELOPE)


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          access_log: bool = False, **options: Any) -> None:
    """Run the service until interrupted (``options`` go to :func:`create_app`)."""
    import uvicorn

    app = create_app(model_dir, **options)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
