"""Batch scoring on Ray vs one local process, and the driver's memory while streaming paths.

Prints, for a model (``--model``, gaussian by default) on small synthetic images, all with one
thread per worker:

- the wall time of local scoring (``Detector.predict_many`` + the records ``flawscope predict``
  writes) and of :func:`flawscope.cluster.predict` on a fresh local Ray instance with 1 and 2
  workers, for two input counts (``--counts``; the ``--images`` distinct files repeated in a
  list file);
- from those two points, each run's time per image (the slope) and its fixed cost (the
  intercept: Ray's and the actors' start-up, listing, the model load). The slope excludes the
  start-up without guessing where a steady state begins, so it is the per-image cost a long
  run pays; Ray's overhead per image at 1 worker vs local is the ratio of slopes (target
  <= 15%);
- the driver's peak memory (RSS above its level before the run, sampled every 50 ms, and
  Python's own peak from tracemalloc) while listing and scoring 10,000 and 100,000 paths
  given in a list file (the same images, repeated): it must not grow with the path count.

Run under the benchmark lock, e.g.::

    flock /tmp/flawscope-bench.lock python benchmarks/ray_predict.py --counts 2000,20000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per worker

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flawscope import Detector, cluster  # noqa: E402
from flawscope.predict_files import PredictionWriter  # noqa: E402
from flawscope.synth import SynthSpec, generate  # noqa: E402


def make_data(root: Path, n_images: int, size: int, model: str) -> tuple[Path, list[str]]:
    generate(root / "synth", SynthSpec(size=size, n_train=20, n_test_good=2,
                                       n_test_per_defect=1))
    Detector.fit(root / "synth" / "synthetic_object", model=model,
                 image_size=size).save(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    paths = []
    for i in range(n_images):
        path = root / "images" / f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return root / "model", paths


def local_seconds(model: Path, listing: Path, out: Path) -> float:
    """Wall seconds to score every path of ``listing`` in this process, model load included
    (as Ray's workers include theirs)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    detector = Detector.load(model)
    paths = listing.read_text().split()
    with PredictionWriter(out, heatmaps=False) as writer:
        for i, (path, prediction) in enumerate(zip(
                paths, detector.predict_many(paths, keep_images=False), strict=True)):
            writer.write(prediction, f"{i:07d}_{Path(path).stem}")
    return time.perf_counter() - start


class RssPeak:
    """Peak resident memory of this process, sampled every 50 ms while in use."""

    def __enter__(self):
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def ray_run(model: Path, inputs: list[Path], out: Path, workers: int, shard_size: int):
    """(wall seconds, summary) of one cluster.predict on a fresh local Ray instance with
    ``workers`` CPUs; Ray's start and shutdown are included."""
    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        summary = cluster.predict(model, inputs, out, workers=workers, cpus_per_task=1,
                                  shard_size=shard_size, heatmaps=False, progress=lambda _: None)
    finally:
        ray.shutdown()
    return time.perf_counter() - start, summary


def repeated_listing(path: Path, paths: list[str], count: int) -> Path:
    """A list file of ``count`` entries cycling through ``paths``."""
    with open(path, "w") as f:
        for i in range(count):
            f.write(paths[i % len(paths)] + "\n")
    return path


def line_fit(counts: list[int], seconds: list[float]) -> tuple[float, float]:
    """(seconds per image, fixed seconds) of the least-squares line through the points."""
    slope, intercept = np.polyfit(np.asarray(counts, float), np.asarray(seconds, float), 1)
    return float(slope), float(intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="distinct images to score")
    parser.add_argument("--counts", default="2000,20000",
                        help="input counts (comma-separated, at least two) of the timed runs")
    parser.add_argument("--size", type=int, default=64, help="image side and model size")
    parser.add_argument("--model", default="gaussian",
                        help="model to fit and score with (gaussian: the least work per image, "
                             "so Ray's own cost shows most)")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--paths", default="10000,100000",
                        help="path counts for the driver-memory runs (empty: none)")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} logical cores; 1 thread per worker; "
          f"{args.model} model, {args.size} px images, shards of {args.shard_size}")
    with tempfile.TemporaryDirectory(prefix="ray_predict_") as tmp:
        root = Path(tmp)
        model, paths = make_data(root, args.images, args.size, args.model)
        fits = {}
        for run in ("local", "Ray 1 worker", "Ray 2 workers"):
            seconds = []
            for count in counts:
                listing = repeated_listing(root / f"list_{count}.txt", paths, count)
                out = root / f"{run.replace(' ', '_')}_{count}"
                if run == "local":
                    seconds.append(local_seconds(model, listing, out))
                else:
                    seconds.append(ray_run(model, [listing], out, int(run.split()[1]),
                                           args.shard_size)[0])
                print(f"{run:>13}: {count:>7} images in {seconds[-1]:7.2f} s "
                      f"({count / seconds[-1]:7.1f} images/s over the whole run)")
            fits[run] = line_fit(counts, seconds)
            per_image, fixed = fits[run]
            print(f"{run:>13}: {1e3 * per_image:.3f} ms per image ({1 / per_image:.1f} "
                  f"images/s once started), {fixed:.2f} s fixed cost")
        overhead = fits["Ray 1 worker"][0] / fits["local"][0] - 1
        print(f"Ray overhead per image at 1 worker vs local: {overhead:+.1%} (target <= 15%)")
        for count in (int(c) for c in args.paths.split(",") if c):
            big = repeated_listing(root / f"paths_{count}.txt", paths, count)
            out = root / f"mem{count}"
            tracemalloc.start()
            with RssPeak() as rss:
                cluster.plan_shards([big], out, shard_size=args.shard_size, model_dir=model)
                listed_mb = tracemalloc.get_traced_memory()[1] / 2**20
                listed_rss = rss.growth_mb
            tracemalloc.stop()
            with RssPeak() as rss:
                _, summary = ray_run(model, [big], out, 2, args.shard_size)
                records = sum(1 for _ in cluster.read_predictions(out))
            assert records == summary.n_inputs == count, (records, summary.n_inputs)
            print(f"{count:>7} paths: listing peak {listed_mb:6.2f} MB Python "
                  f"({listed_rss:6.1f} MB RSS growth); scoring on Ray (2 workers) driver "
                  f"RSS growth {rss.growth_mb:6.1f} MB")


if __name__ == "__main__":
    main()
