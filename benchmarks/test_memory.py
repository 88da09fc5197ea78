"""Peak memory and time of the whole ``flawscope test`` at native resolution.

Makes (or reuses, with ``--data``) a synthetic category of ``--size``-px images with
:mod:`flawscope.synth` (``synthetic_object``, defects at most ``--defect-px`` px): a small
train set, so the fit is cheap, and ``--images`` test images (a quarter good, the rest split
over the four defect types). Fits ``--model`` (default ``gaussian`` at 256 px: its fit and
scoring cost almost nothing, so the figures are those of the test path itself: decoding,
maps resized to every mask's native size, the streamed pixel metrics, metrics.json, the
report's pictures), then runs the real CLI ``flawscope test`` (default ``--pixel-size
native``) in a fresh process and reports its peak resident memory (``ru_maxrss`` from
``os.wait4``), wall time, the metrics and the pixel metrics' error bounds from metrics.json,
and the CPU. ``--geometry tile`` fits and tests in the tiled geometry at native resolution
(every map stitched at 1024 x 1024 before it is compared with its mask).

    flock /tmp/flawscope-bench.lock python benchmarks/test_memory.py --work /tmp/test-memory
    python benchmarks/test_memory.py --work /tmp/test-memory --geometry tile
    python benchmarks/test_memory.py --data DIR/synthetic_object --work /tmp/test-memory

The data are written under ``--work`` and reused by later runs with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flawscope.gallery import cpu_model
from flawscope.synth import OBJECT_DEFECTS, SynthSpec, generate

CATEGORY = "synthetic_object"


def make_data(work: Path, images: int, size: int, defect_px: int, train: int,
              workers: int) -> Path:
    """The synthetic category (generated once per setting, then reused)."""
    per_defect = (images * 3 // 4) // len(OBJECT_DEFECTS)
    good = images - per_defect * len(OBJECT_DEFECTS)
    root = work / f"data_{size}px_{defect_px}dpx_{images}img_{train}train"
    folder = root / CATEGORY
    if not (folder / "test").is_dir():
        spec = SynthSpec(size=size, n_train=train, n_test_good=good,
                         n_test_per_defect=per_defect, defect_px=defect_px)
        start = time.perf_counter()
        generate(root, spec, (CATEGORY,), workers)
        print(f"generated {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flawscope", *args]


def rss_anon_kib(pid: int) -> int | None:
    """The process's resident anonymous memory (heap, arrays; not the pages of its shared
    libraries), from /proc; None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_measured(command: list[str]) -> tuple[float, float, float]:
    """Run ``command`` in a fresh process: (wall seconds, peak resident MiB, peak resident
    anonymous MiB).

    The peak resident memory (``ru_maxrss``) includes the file pages of shared libraries that
    the process touched: with PyTorch's CUDA build, ``import torch`` alone is about 730 MiB
    resident, 440 of them library pages that the kernel shares between processes and can
    drop. The anonymous peak, sampled every 10 ms from /proc, is the memory the process
    itself allocated.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak_anon = 0
    while True:
        peak_anon = max(peak_anon, rss_anon_kib(proc.pid) or 0)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    return wall, usage.ru_maxrss / 1024, peak_anon / 1024  # Linux: KiB


def count_test_images(folder: Path) -> int:
    return sum(1 for p in (folder / "test").rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="folder for the data, the model and the results")
    parser.add_argument("--data", type=Path, default=None,
                        help="an existing category folder to test on instead of generating one")
    parser.add_argument("--images", type=int, default=500, help="test images to generate")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--defect-px", type=int, default=8)
    parser.add_argument("--train", type=int, default=20, help="good training images")
    parser.add_argument("--model", default="gaussian")
    parser.add_argument("--image-size", type=int, default=256, help="the model's input side")
    parser.add_argument("--geometry", choices=("resize", "keep_aspect", "tile"),
                        default="resize")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="flawscope test --batch-size (default: the CLI's)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes generating the data (0: one per core)")
    args = parser.parse_args()

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"CPU {cpu_model()}; {os.cpu_count()} cores; OMP_NUM_THREADS={threads}", flush=True)
    data = args.data or make_data(args.work, args.images, args.size, args.defect_px,
                                  args.train, args.workers)
    tag = f"{args.model}_{args.image_size}_{args.geometry}"
    model_dir = args.work / f"model_{tag}"
    results = args.work / f"results_{tag}"
    fit_s, fit_mb, fit_anon = run_measured(cli(
        "fit", "--data", str(data), "--model", args.model, "--set",
        f"image_size={args.image_size}", "--geometry", args.geometry, "--out", str(model_dir)))
    print(f"fit: {fit_s:.1f} s wall, peak {fit_mb:.0f} MiB ({fit_anon:.0f} MiB anonymous)",
          flush=True)
    batch = [] if args.batch_size is None else ["--batch-size", str(args.batch_size)]
    test_s, test_mb, test_anon = run_measured(cli(
        "test", "--model", str(model_dir), "--data", str(data), "--out", str(results), *batch))
    m = json.loads((results / "metrics.json").read_text())
    n = count_test_images(data)
    print(f"flawscope test ({args.model} {args.image_size} px, geometry {args.geometry}) on "
          f"{m['n_images']} images ({n} files) of {args.size}x{args.size}: peak RSS "
          f"{test_mb:.0f} MiB (os.wait4 ru_maxrss), anonymous {test_anon:.0f} MiB, wall "
          f"{test_s:.1f} s, scoring {m['infer_s']:.1f} s, torch threads {m['threads']}, "
          f"batch size {args.batch_size or 'default'}")
    print(f"  pixel_size {m['pixel_size']!r}; image AUROC {m['image_auroc']:.4f}, pixel AUROC "
          f"{m['pixel_auroc']:.6f} (bound {m['pixel_auroc_max_error']:.1e}), AU-PRO "
          f"{m['pixel_aupro']:.6f} (bound {m['pixel_aupro_max_error']:.1e})")
    print(json.dumps({"peak_rss_mib": round(test_mb), "peak_anon_mib": round(test_anon),
                      "wall_s": round(test_s, 1),
                      "fit_peak_rss_mib": round(fit_mb), "n_images": m["n_images"],
                      "pixel_size": m["pixel_size"], "geometry": args.geometry,
                      "model": args.model, "image_size": args.image_size,
                      "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
