"""Scoring speed per model x engine x threads: images/s at batch 1 and 16, latency, memory.

Every (model, engine, threads) runs in a fresh worker process, so the first batch is really
cold (lazy kernel set-up, first memory allocations) and peak memory is that configuration's
own. The worker loads the model directory, opens the engine and scores one batch of 16 (timed
together: the cold start), then times warm batches of 16 for at least --min-seconds, then
single images (latency p50/p99). Images are the category's real test images, decoded before
any timing; the maps are not resized (every engine hands them to the same caller).

    flock /tmp/flawscope-bench.lock python benchmarks/engines.py \\
        --model-dir runs/patchcore --model-dir runs/padim --engines torch,onnxruntime,openvino

Engines: torch, onnxruntime and int8 through :func:`flawscope.engines.open_engine`,
``openvino`` on the same exported file through OpenVINO's runtime (f32 precision; measured
only, not a flawscope engine). Each model directory needs an export (``flawscope export
DIR``; with ``--int8`` for the int8 engine); the script makes the missing ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _open(engine: str, model, model_dir: Path, threads: int):
    if engine != "openvino":
        from flawscope.engines import open_engine

        return open_engine(model, model_dir, engine, threads=threads)
    import openvino as ov
    import torch

    compiled = ov.Core().compile_model(str(model_dir / "model.onnx"), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(images):
        out = request.infer({"images": images.numpy()})
        return tuple(torch.from_numpy(v.copy()) for v in out.values())
    return run


def worker(args) -> None:
    import numpy as np
    import torch

    from flawscope.data import ImageDataset, open_category
    from flawscope.modelfile import load_model

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    model, manifest = load_model(model_dir)
    category = open_category(args.data or manifest["fit_info"]["data"])
    paths = [t.path for t in category.test][:args.images]
    data = ImageDataset(paths, model.image_size)
    images = torch.stack([data[i] for i in range(len(data))])
    batches = [images[i:i + 16] for i in range(0, len(images) - 15, 16)]
    loaded_mb = _vm_hwm_mb()
    start = time.perf_counter()  # cold start: opening the engine (with its warm-up) + 1 batch
    engine = _open(args.engine, model, model_dir, args.threads)
    engine(batches[0])
    cold_s = time.perf_counter() - start
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < args.min_seconds:
        for batch in batches:
            engine(batch)
            n += len(batch)
    b16 = n / (time.perf_counter() - start)
    engine(images[:1])
    lat, start = [], time.perf_counter()
    i = 0
    while len(lat) < 10 or time.perf_counter() - start < args.min_seconds:
        tick = time.perf_counter()
        engine(images[i % len(images)][None])
        lat.append(time.perf_counter() - tick)
        i += 1
    lat_ms = np.array(lat) * 1e3
    print(json.dumps({"cold_s": cold_s, "b16_img_per_s": b16, "b1_img_per_s": 1e3 / lat_ms.mean(),
                      "p50_ms": float(np.percentile(lat_ms, 50)),
                      "p99_ms": float(np.percentile(lat_ms, 99)), "n_latency": len(lat),
                      "loaded_mb": loaded_mb, "peak_mb": _vm_hwm_mb(),
                      "engine": getattr(engine, "name", args.engine)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", action="append", type=Path, required=True)
    parser.add_argument("--engines", default="torch,onnxruntime,auto")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--data", default=None, help="category of the test images "
                        "(default: the one each model was fitted on)")
    parser.add_argument("--images", type=int, default=64, help="test images used (>= 16)")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.model_dir, args.threads = args.model_dir[0], int(args.threads)
        worker(args)
        return

    from flawscope.export import export_model_dir
    from flawscope.gallery import cpu_model
    from flawscope.modelfile import read_manifest
    from flawscope.quantize import INT8_FILE, QuantizationRefused, quantize_model_dir

    print(f"CPU: {cpu_model()}; {args.images} real test images per model; "
          f">= {args.min_seconds:g} s per figure")
    header = (f"{'model':<10} {'size':>4} {'engine':<12} {'thr':>3} {'b16 img/s':>9} "
              f"{'b1 img/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'cold s':>6} {'peak MB':>7}")
    print(header)
    for model_dir in args.model_dir:
        manifest = read_manifest(model_dir)
        if not (model_dir / "model.onnx").is_file():
            export_model_dir(model_dir)
            manifest = read_manifest(model_dir)
        engines = args.engines.split(",")
        if "int8" in engines and not (model_dir / INT8_FILE).is_file():
            try:
                quantize_model_dir(model_dir)
            except QuantizationRefused as exc:
                print(f"{manifest['model']:<10} int8: {exc}")
                engines.remove("int8")
            manifest = read_manifest(model_dir)
        for threads in [int(t) for t in args.threads.split(",")]:
            for engine in engines:
                cmd = [sys.executable, __file__, "--worker", "--model-dir", str(model_dir),
                       "--engine", engine, "--threads", str(threads), "--images",
                       str(args.images), "--min-seconds", str(args.min_seconds)]
                if args.data:
                    cmd += ["--data", args.data]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{manifest['model']:<10} {engine}: failed: "
                          f"{proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                label = engine if engine != "auto" else f"auto={r['engine']}"
                print(f"{manifest['model']:<10} {manifest['image_size']:>4} {label:<12} "
                      f"{threads:>3} {r['b16_img_per_s']:>9.1f} {r['b1_img_per_s']:>8.1f} "
                      f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['cold_s']:>6.2f} "
                      f"{r['peak_mb']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
