"""The inspection service: ``flawscope serve MODEL_DIR`` (FastAPI + uvicorn).

Endpoints
    ``GET /health``
        ``{"status": "ok", "model", "image_size", "threshold", "workers", "warmup_ms"}``.
        The server answers only once the model is loaded and has scored one warm-up image,
        so the first real request is as fast as the next ones.
    ``POST /predict`` (multipart field ``file``; ``?heatmap=true`` to get the heat map)
        ``{"model", "filename", "width", "height", "score", "normalized_score",
        "is_anomalous", "threshold", "latency_ms"}`` with the same meaning as in
        ``flawscope predict`` (the same :class:`flawscope.Detector` code decides); with
        ``heatmap=true`` also ``"heatmap_png"``: the overlay PNG, base64-encoded, so one
        request gives everything. ``latency_ms`` is measured in the server from the upload
        being received to the answer being ready (decoding, queueing, scoring, heat map).

Bad requests get a 4xx with ``{"detail": "..."}`` and the server keeps serving:
413 for an upload over ``max_upload_bytes`` or an image over ``max_pixels`` (the same limit
as the command line; decompression bombs are refused from the header, before decoding), 422
for an image whose shorter side is under ``min_side`` (too small to inspect), 415 for a file
that is not a PNG, JPEG, BMP or TIFF image (other formats are refused on purpose: some PIL
decoders, such as EPS, run external programs), 400 for a truncated or corrupt image or an
empty upload, 422 when the ``file`` field is missing.

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

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from PIL import Image

from .data import DEFAULT_MAX_PIXELS, MIN_SIDE, ImageTooLarge, ImageTooSmall, open_checked, to_rgb
from .errors import DataError, FlawscopeError

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_WORKERS = 2
#: Room for the multipart envelope (boundaries, part headers) on top of the file itself.
_ENVELOPE = 16 * 1024
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


class UploadError(FlawscopeError):
    """A request the client must fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                  min_side: int = MIN_SIDE) -> Image.Image:
    """Uploaded bytes -> RGB image, or an :class:`UploadError` saying what is wrong."""
    if not data:
        raise UploadError(400, "empty upload: the file sent has no content")
    try:
        with open_checked(io.BytesIO(data), "upload", max_pixels, min_side,
                          formats=ACCEPTED_FORMATS) as im:
            im.load()
            return to_rgb(im)
    except ImageTooLarge as exc:
        raise UploadError(413, str(exc).removeprefix("upload: ")) from None
    except ImageTooSmall as exc:
        raise UploadError(422, str(exc).removeprefix("upload: ")) from None
    except DataError as exc:
        if "not a readable image" in str(exc):
            raise UploadError(415, "not an image flawscope accepts (send PNG, JPEG, BMP or "
                                   "TIFF)") from None
        raise UploadError(400, str(exc).removeprefix("upload: ")) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(400, f"corrupt or truncated image ({exc})") from None


class Predictor:
    """A loaded :class:`~flawscope.Detector` scoring uploads in a thread pool."""

    def __init__(self, model_dir: str | Path, workers: int = DEFAULT_WORKERS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, torch_threads: int | None = None,
                 min_side: int = MIN_SIDE):
        import torch

        from .detector import Detector

        self.detector = Detector.load(model_dir)
        self.detector.max_pixels, self.detector.min_side = max_pixels, min_side
        self.workers = max(1, int(workers))
        self.max_pixels = max_pixels
        self.min_side = min_side
        threads = torch_threads or max(1, (os.cpu_count() or 1) // self.workers)
        torch.set_num_threads(threads)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="flawscope-worker")
        self.warmup_ms = self._warm_up()

    def _warm_up(self) -> float:
        """Score one mid-grey image in every worker thread, so that lazy initialisation
        (thread pools, allocator, kernels chosen on first use) happens before /health says
        ok rather than in the first real request."""
        size = max(self.detector.model.image_size, self.min_side)
        grey = np.full((size, size, 3), 128, dtype=np.uint8)
        start = time.perf_counter()
        list(self.pool.map(lambda _: self.detector.predict(grey), range(self.workers)))
        return (time.perf_counter() - start) * 1000

    def predict(self, data: bytes, heatmap: bool = False) -> dict[str, Any]:
        """Decode, score and decide one upload (runs in a worker thread)."""
        image = decode_upload(data, self.max_pixels, self.min_side)
        prediction = self.detector.predict(image)
        result: dict[str, Any] = {"model": self.detector.name, **prediction.record()}
        del result["path"], result["error"]
        if heatmap:
            buffer = io.BytesIO()
            prediction.overlay().save(buffer, format="PNG")
            result["heatmap_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return result

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.detector.name,
                "image_size": self.detector.model.image_size,
                "threshold": self.detector.threshold, "workers": self.workers,
                "warmup_ms": self.warmup_ms}

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
               torch_threads: int | None = None, min_side: int = MIN_SIDE):
    """The ASGI application serving the model in ``model_dir`` (loaded and warmed up before
    this returns)."""
    predictor = Predictor(model_dir, workers, max_pixels, torch_threads, min_side)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        predictor.close()

    app = FastAPI(title="flawscope inspection service", lifespan=lifespan,
                  description=f"model {predictor.detector.name} from {model_dir}")
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
