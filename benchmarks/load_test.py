"""Load test of `flawscope serve` over loopback: throughput, latency, and bad requests mixed in.

Starts `flawscope serve MODEL_DIR` in a subprocess on a free 127.0.0.1 port, sends a bounded
number of requests with a few concurrent clients (httpx), and prints requests/s, p50/p99
latency (client side, and the server's own latency_ms), the error count for valid images
(must be 0) and whether every bad request (not an image, truncated, empty, over-sized upload)
got a 4xx. Exits non-zero if either check fails.

    python benchmarks/load_test.py MODEL_DIR IMAGE_FOLDER [--requests 400] [--concurrency 4]
    python benchmarks/load_test.py --fit-synthetic [--model gaussian]   # makes its own model

Wrap measurements in `flock /tmp/flawscope-bench.lock ...` on shared machines.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_payloads(valid: bytes, max_upload_mb: float) -> list[tuple[str, bytes]]:
    noise = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    oversized = buffer.getvalue()
    assert len(oversized) > max_upload_mb * 1e6, "raise the noise size for this limit"
    return [("not-an-image", b"this is not an image " * 50),
            ("truncated", valid[: len(valid) // 2]),
            ("empty", b""),
            ("oversized", oversized)]


def fit_synthetic(workdir: Path, model: str) -> tuple[Path, Path]:
    from flawscope.pipeline import fit_model
    from flawscope.synth import SynthSpec, generate

    generate(workdir / "data", SynthSpec(size=256, n_train=60, seed=0), ("synthetic_object",))
    category = workdir / "data" / "synthetic_object"
    fit_model(category, model, workdir / "model")
    return workdir / "model", category / "test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("images", nargs="?", type=Path, help="folder of valid images (recursive)")
    parser.add_argument("--fit-synthetic", action="store_true",
                        help="fit --model on synthetic data first (256 px images)")
    parser.add_argument("--model", default="gaussian")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bad-every", type=int, default=10, help="every Nth request is bad")
    parser.add_argument("--workers", type=int, default=None,
                        help="the service's --workers (default: its own)")
    parser.add_argument("--max-upload-mb", type=float, default=2.0)
    parser.add_argument("--heatmap", action="store_true", help="ask for heat maps too")
    parser.add_argument("--engine", default=None, help="the service's --engine (default: its own)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.fit_synthetic:
        args.model_dir, args.images = fit_synthetic(Path(tmp.name), args.model)
    if args.model_dir is None or args.images is None:
        parser.error("give MODEL_DIR and IMAGES, or --fit-synthetic")
    valid = [p.read_bytes() for p in sorted(args.images.rglob("*.png"))[:64]]
    bad = bad_payloads(valid[0], args.max_upload_mb)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flawscope", "serve", str(args.model_dir), "--host", "127.0.0.1",
         "--port", str(port), *(["--workers", str(args.workers)] if args.workers else []),
         "--max-upload-mb", str(args.max_upload_mb),
         *(["--engine", args.engine] if args.engine else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.time() + 120
            while True:
                try:
                    health = client.get("/health").json()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.time() > deadline:
                        print(server.stderr.read().decode(), file=sys.stderr)
                        return 2
                    time.sleep(0.2)
            print(f"serving {health['model']} on {url} with {health['workers']} workers "
                  f"(threshold {health['threshold']})")
            for i in range(8):  # warm-up
                client.post("/predict", files={"file": ("w.png", valid[i % len(valid)])})

            def one(i: int):
                is_bad = args.bad_every > 0 and i % args.bad_every == args.bad_every - 1
                if is_bad:
                    name, data = bad[(i // args.bad_every) % len(bad)]
                else:
                    name, data = "valid", valid[i % len(valid)]
                start = time.perf_counter()
                try:
                    r = client.post("/predict", files={"file": (f"{name}.png", data)},
                                    params={"heatmap": "true"} if args.heatmap else None)
                    status = r.status_code
                    server_ms = r.json().get("latency_ms") if status == 200 else None
                except httpx.HTTPError as exc:
                    status, server_ms = f"{type(exc).__name__}", None
                return name, status, (time.perf_counter() - start) * 1000, server_ms

            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)

    ok = [r for r in results if r[0] == "valid"]
    bad_results = [r for r in results if r[0] != "valid"]
    valid_errors = sum(1 for r in ok if r[1] != 200)
    bad_not_4xx = [r for r in bad_results if not (isinstance(r[1], int) and 400 <= r[1] < 500)]
    lat = np.array([r[2] for r in ok if r[1] == 200])
    server_lat = np.array([r[3] for r in ok if r[3] is not None])
    print(f"{len(results)} requests ({len(ok)} valid, {len(bad_results)} bad) in {wall:.2f} s "
          f"with {args.concurrency} clients: {len(results) / wall:.1f} requests/s")
    print(f"valid: latency p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} "
          f"ms (server-side p50 {np.percentile(server_lat, 50):.1f} ms, "
          f"p99 {np.percentile(server_lat, 99):.1f} ms); errors {valid_errors}")
    statuses = sorted({(r[0], r[1]) for r in bad_results}, key=str)
    print(f"bad: {len(bad_results)} requests, statuses {statuses}; not 4xx: {len(bad_not_4xx)}")
    return 0 if valid_errors == 0 and not bad_not_4xx else 1


if __name__ == "__main__":
    sys.exit(main())
