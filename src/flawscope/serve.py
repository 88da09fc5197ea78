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

Uploads are decoded and answers (heat-map PNGs) encoded in a pool of threads (PIL releases
the GIL); scoring goes through a :class:`MicroBatcher`, which scores the images of concurrent
requests together in ``workers`` scoring threads (default 2), each with ``cpu_count //
workers`` PyTorch threads so they do not fight over cores; an exported engine gets every
core and one stream per scoring thread (:func:`flawscope.engines.open_engine`), so two
batches are scored at once, each on its share of the cores: while one thread waits for the
next batch to fill, the other keeps the cores busy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from PIL import Image

from .data import DEFAULT_MAX_PIXELS, MIN_SIDE, ImageTooLarge, ImageTooSmall, open_checked, to_rgb
from .errors import DataError, FlawscopeError, TileGridError
from .geometry import check_grid

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20.0
#: Two scoring threads: with 8 concurrent clients on a 2-core AMD EPYC (PatchCore, 256 px)
#: the service answered 31 requests/s with two eager PyTorch scorers of one thread each
#: against 24.5 with one of two threads; OpenVINO scored 101-103 images/s with two streams
#: and two callers against 84-90 with one.
DEFAULT_WORKERS = 2
DEFAULT_MAX_BATCH = 16
DEFAULT_BATCH_WINDOW_MS = 5.0
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


class MicroBatcher:
    """Scores images from concurrent requests together.

    A request's image waits at most ``window_ms`` for others (or until ``max_batch`` are
    waiting), then the whole batch goes through one ``Detector.predict_many`` call: a
    backbone scores a batch of 8 in far less than 8 times one image's time on a CPU, so under
    load the service answers more requests per second, and a lone request pays at most the
    window. ``scorers`` threads take batches from the same queue.
    """

    def __init__(self, detector, max_batch: int = 16, window_ms: float = 5.0,
                 scorers: int = 1):
        self.detector = detector
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, window_ms) / 1000
        self.queue: queue.Queue = queue.Queue()
        self.requests = self.batches = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True,
                                          name=f"flawscope-scorer-{i}")
                         for i in range(max(1, scorers))]
        for thread in self._threads:
            thread.start()

    def submit(self, image: Image.Image) -> Future:
        future: Future = Future()
        self.queue.put((image, future))
        return future

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # let the other scorers stop too
                    break
                batch.append(item)
            with self._lock:
                self.requests += len(batch)
                self.batches += 1
            try:
                predictions = list(self.detector.predict_many(
                    [image for image, _ in batch], batch_size=len(batch), on_error="raise"))
            except Exception as exc:  # every waiting request gets the error, none hangs
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), prediction in zip(batch, predictions, strict=True):
                future.set_result(prediction)

    def close(self) -> None:
        self.queue.put(None)


class Predictor:
    """A loaded :class:`~flawscope.Detector` behind a :class:`MicroBatcher`; uploads are
    decoded and answers encoded in a pool of threads."""

    def __init__(self, model_dir: str | Path, workers: int = DEFAULT_WORKERS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, torch_threads: int | None = None,
                 min_side: int = MIN_SIDE, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, engine: str = "auto"):
        import torch

        from .detector import Detector

        self.workers = max(1, int(workers))
        threads = torch_threads or max(1, (os.cpu_count() or 1) // self.workers)
        torch.set_num_threads(threads)
        self.detector = Detector.load(model_dir, engine, threads=threads * self.workers,
                                      streams=self.workers)
        self.detector.max_pixels, self.detector.min_side = max_pixels, min_side
        self.max_pixels = max_pixels
        self.min_side = min_side
        # Enough decoding threads that concurrent uploads reach the batcher together.
        self.pool = ThreadPoolExecutor(max(4 * (os.cpu_count() or 1), max_batch),
                                       thread_name_prefix="flawscope-io")
        self.batcher = MicroBatcher(self.detector, max_batch, batch_window_ms, self.workers)
        self.warmup_ms = self._warm_up()

    def _warm_up(self) -> float:
        """Score a full batch of mid-grey images, so that lazy initialisation (thread pools,
        allocator, kernels chosen on first use) happens before /health says ok rather than
        in the first real requests."""
        size = max(self.detector.model.image_size, self.min_side)
        grid = self.detector.model.tile_grid  # a model tied to one tile grid: its image size
        shape = (size, size) if grid is None else (grid.width, grid.height)
        grey = Image.new("RGB", shape, (128, 128, 128))
        start = time.perf_counter()
        list(self.detector.predict_many([grey] * self.batcher.max_batch,
                                        batch_size=self.batcher.max_batch))
        self.detector.predict(grey)
        return (time.perf_counter() - start) * 1000

    def predict(self, data: bytes, heatmap: bool = False) -> dict[str, Any]:
        """Decode, score (batched with concurrent requests) and decide one upload; runs in a
        pool thread."""
        image = decode_upload(data, self.max_pixels, self.min_side)
        try:  # refused alone, before it could share a batch with other uploads
            check_grid(self.detector.model, self.detector.geometry, image.width, image.height,
                       "upload")
        except TileGridError as exc:
            raise UploadError(422, str(exc).removeprefix("upload: ")) from None
        prediction = self.batcher.submit(image).result()
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
                "engine": self.detector.engine_name,
                "warmup_ms": self.warmup_ms, "requests_scored": self.batcher.requests,
                "batches": self.batcher.batches}

    def close(self) -> None:
        self.batcher.close()
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
               torch_threads: int | None = None, min_side: int = MIN_SIDE,
               max_batch: int = DEFAULT_MAX_BATCH,
               batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, engine: str = "auto"):
    """The ASGI application serving the model in ``model_dir`` (loaded and warmed up before
    this returns)."""
    predictor = Predictor(model_dir, workers, max_pixels, torch_threads, min_side, max_batch,
                          batch_window_ms, engine)

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
