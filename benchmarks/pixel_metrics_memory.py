"""Peak memory and time of the streamed pixel metrics against the exact ones.

Synthetic anomaly maps and masks are made on the fly, one image at a time (a few elliptic
defects on 3 of 4 images, the map a blurred mask plus smooth and pixel noise), so nothing
but the metric itself holds the category. Each measurement runs in a fresh process and
reports its peak resident memory (``ru_maxrss``, which includes Python, NumPy and SciPy).

    flock /tmp/flawscope-bench.lock python benchmarks/pixel_metrics_memory.py
    python benchmarks/pixel_metrics_memory.py --images 500 --size 1024 --compare 40

prints for ``--images`` x ``--size``^2 the streamed metrics (peak memory, seconds spent in
``PixelMetrics.add``/``result`` without the map generation), then both methods on the
first ``--compare`` images, where the exact one fits, with their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from scipy import ndimage


def make_pair(index: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Image ``index``'s map (float32) and mask (None for a good image), deterministic."""
    rng = np.random.default_rng(index)
    mask = None
    if index % 4:
        mask = np.zeros((size, size), dtype=bool)
        yy, xx = np.ogrid[:size, :size]
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size, 2)
            ry, rx = rng.uniform(2, size / 10, 2)
            mask |= ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1
    coarse = rng.normal(0, 0.5, (size // 16, size // 16))
    amap = ndimage.zoom(coarse, 16, order=1).astype(np.float32)
    amap += rng.normal(0, 0.05, (size, size)).astype(np.float32)
    if mask is not None:
        amap += ndimage.uniform_filter(mask.astype(np.float32), size // 64 + 1)
    return amap, mask


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def run_stream(images: int, size: int, bins: int) -> dict:
    from flawscope.pixelmetrics import PixelMetrics

    start_mb = peak_mb()
    acc = PixelMetrics(bins=bins)
    metric_s = 0.0
    for i in range(images):
        amap, mask = make_pair(i, size)
        start = time.perf_counter()
        acc.add(amap, mask)
        metric_s += time.perf_counter() - start
    start = time.perf_counter()
    result = acc.result()
    metric_s += time.perf_counter() - start
    return {**result, "metric_s": metric_s, "peak_mb": peak_mb(), "start_mb": start_mb}


def run_exact(images: int, size: int) -> dict:
    from flawscope import metrics

    start_mb = peak_mb()
    maps = np.zeros((images, size, size), dtype=np.float32)
    masks = np.zeros((images, size, size), dtype=bool)
    for i in range(images):
        amap, mask = make_pair(i, size)
        maps[i] = amap
        if mask is not None:
            masks[i] = mask
    start = time.perf_counter()
    result = {"pixel_auroc": metrics.pixel_auroc(masks, maps),
              "pixel_aupro": metrics.aupro(masks, maps)}
    return {**result, "metric_s": time.perf_counter() - start, "peak_mb": peak_mb(),
            "start_mb": start_mb}


def measure(mode: str, images: int, size: int, bins: int) -> dict:
    """Run one mode in a fresh process, so that each peak is its own."""
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--images", str(images),
                          "--size", str(size), "--bins", str(bins)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def line(name: str, images: int, size: int, r: dict) -> str:
    pixels = images * size * size
    return (f"{name:8s} {images:5d} x {size}^2 ({pixels / 1e6:7.1f} Mpx): peak "
            f"{r['peak_mb']:7.0f} MB (at start {r['start_mb']:4.0f}), metric "
            f"{r['metric_s']:6.1f} s ({pixels / 1e6 / r['metric_s']:5.1f} Mpx/s), "
            f"AUROC {r['pixel_auroc']:.6f} AU-PRO {r['pixel_aupro']:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--compare", type=int, default=40,
                        help="images on which the exact metrics also run (0: skip)")
    parser.add_argument("--bins", type=int, default=1 << 20)
    parser.add_argument("--worker", choices=("stream", "exact"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "stream":
        print(json.dumps(run_stream(args.images, args.size, args.bins)))
        return
    if args.worker == "exact":
        print(json.dumps(run_exact(args.images, args.size)))
        return
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    print(f"CPU {cpu}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"bins {args.bins}")
    stream = measure("stream", args.images, args.size, args.bins)
    print(line("streamed", args.images, args.size, stream))
    print(f"         error bounds: AUROC {stream['pixel_auroc_max_error']:.1e}, "
          f"AU-PRO {stream['pixel_aupro_max_error']:.1e}")
    if args.compare:
        small = measure("stream", args.compare, args.size, args.bins)
        exact = measure("exact", args.compare, args.size, args.bins)
        print(line("streamed", args.compare, args.size, small))
        print(line("exact", args.compare, args.size, exact))
        print(f"         |streamed - exact|: AUROC "
              f"{abs(small['pixel_auroc'] - exact['pixel_auroc']):.1e} (bound "
              f"{small['pixel_auroc_max_error']:.1e}), AU-PRO "
              f"{abs(small['pixel_aupro'] - exact['pixel_aupro']):.1e} (bound "
              f"{small['pixel_aupro_max_error']:.1e})")


if __name__ == "__main__":
    main()
