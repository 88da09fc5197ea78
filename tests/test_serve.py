"""The inspection service over a real socket on 127.0.0.1."""

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from flawscope import Detector
from flawscope.data import DEFAULT_MAX_PIXELS, MIN_SIDE
from flawscope.modelfile import read_manifest
from flawscope.pipeline import fit_model
from flawscope.serve import Predictor, UploadError, create_app, decode_upload
from flawscope.threshold import decision_for


@pytest.fixture(scope="module")
def server(synth_root, tmp_path_factory):
    """gaussian on the synthetic object, served by uvicorn in a thread on a free port."""
    model_dir = tmp_path_factory.mktemp("serve") / "model"
    fit_model(synth_root / "synthetic_object", "gaussian", model_dir, calibration="holdout")
    # A wide batching window, so that concurrent requests surely share batches.
    app = create_app(model_dir, max_upload_mb=0.2, max_pixels=300 * 300, workers=2,
                     batch_window_ms=50)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, model_dir
    srv.should_exit = True
    thread.join(10)
    sock.close()


def png_bytes(path_or_image) -> bytes:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(
        path_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, data: bytes, name="x.png", **params):
    return client.post("/predict", files={"file": (name, data, "image/png")}, params=params)


def test_health(server):
    client, model_dir = server
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "gaussian"
    assert body["threshold"] == read_manifest(model_dir)["threshold"]["value"]
    assert body["warmup_ms"] > 0  # the model scored before the server answered at all


def test_service_and_cli_decide_alike(server, synth_root):
    client, model_dir = server
    path = synth_root / "synthetic_object" / "test" / "crack" / "002.png"
    body = post(client, path.read_bytes()).json()
    local = Detector.load(model_dir).predict(path)
    assert body["score"] == local.score and body["is_anomalous"] == local.is_anomalous
    assert body["normalized_score"] == local.normalized_score


def test_predict_matches_the_stored_decision_and_returns_a_heatmap(server, synth_root):
    client, model_dir = server
    decide = decision_for(read_manifest(model_dir))
    stain = synth_root / "synthetic_object" / "test" / "stain" / "000.png"
    answer = post(client, stain.read_bytes(), "stain.png", heatmap="true")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "gaussian" and body["filename"] == "stain.png"
    assert body["is_anomalous"] is True and body["normalized_score"] > 0.5
    assert body["is_anomalous"] == decide.is_anomalous(body["score"])
    assert body["latency_ms"] > 0
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert overlay.size == (body["width"], body["height"])
    plain = post(client, stain.read_bytes()).json()
    assert "heatmap_png" not in plain and plain["score"] == pytest.approx(body["score"])


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, synth_root):
    client, _ = server
    good = (synth_root / "synthetic_object" / "test" / "good" / "000.png").read_bytes()
    big = png_bytes(Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (400, 400, 3), dtype=np.uint8)))  # ~480 KB, over the 0.2 MB limit
    cases = {
        "not an image": (post(client, b"hello, this is text", "notes.txt"), 415),
        "truncated": (post(client, good[: len(good) // 2]), 400),
        "empty": (post(client, b""), 400),
        "too many pixels": (post(client, png_bytes(Image.new("RGB", (400, 300)))), 413),
        "too small to inspect": (post(client, png_bytes(Image.new("RGB", (1, 1)))), 422),
        "upload too big": (post(client, big), 413),
        "no file field": (client.post("/predict", data={"x": "1"}), 422),
        "eps is refused": (post(client, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n"),
                           415),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert response.json()["detail"], name
        assert post(client, good).status_code == 200, f"server broken after: {name}"


def test_concurrent_requests_all_succeed(server, synth_root):
    client, _ = server
    images = [p.read_bytes() for p in
              sorted((synth_root / "synthetic_object" / "test" / "good").glob("*.png"))[:4]]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: post(client, images[i % 4]), range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    scores = [a.json()["score"] for a in answers]
    # The same image scores the same in whatever batch it shared (up to the float rounding
    # of a batched convolution: different batch sizes may sum in another order).
    for i in range(4, 16):
        assert scores[i] == pytest.approx(scores[i % 4], rel=1e-5)
    health = client.get("/health").json()
    assert health["batches"] < health["requests_scored"]  # concurrent requests were batched


def test_decode_upload_handles_grayscale_and_16_bit():
    gray16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    image = decode_upload(png_bytes(gray16))
    assert image.mode == "RGB" and image.size == (64, 64)


def test_upload_messages_name_flawscope_limits():
    with pytest.raises(UploadError, match="no content") as empty:
        decode_upload(b"")
    assert "field" not in str(empty.value)  # the field was sent; it was empty
    with pytest.raises(UploadError, match=f"at least {MIN_SIDE} pixels") as tiny:
        decode_upload(png_bytes(Image.new("L", (1, 1))))
    assert tiny.value.status == 422
    # A 100000 x 100000 PNG header: refused before decoding with flawscope's own limit, not
    # Pillow's decompression-bomb message.
    bomb = png_bytes(Image.new("1", (1, 1)))
    bomb = bomb[:16] + (100_000).to_bytes(4, "big") * 2 + bomb[24:]
    import zlib
    crc = zlib.crc32(bomb[12:29]).to_bytes(4, "big")
    bomb = bomb[:29] + crc + bomb[33:]
    with pytest.raises(UploadError) as large:
        decode_upload(bomb)
    assert large.value.status == 413 and f"{DEFAULT_MAX_PIXELS:,}" in str(large.value)
    assert "could be decompression bomb" not in str(large.value)


def test_the_service_uses_the_command_lines_pixel_limit():
    import inspect

    from flawscope.cli import serve_cmd

    assert inspect.signature(create_app).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert inspect.signature(Predictor).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    limit = [p for p in serve_cmd.params if p.name == "max_pixels"][0]
    assert limit.default is None  # falls through to the shared default
