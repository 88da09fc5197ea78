"""Batch scoring on Ray vs one local process, and the driver's memory while streaming paths.

Prints, for a gaussian model on small synthetic images, all with one thread per worker:

- images/s of local scoring (``Detector.predict_many`` + the records ``flawscope predict``
  writes) and of :func:`flawscope.cluster.predict` on a local Ray instance with 1 and 2
  workers, both over the whole run (Ray and actor start-up included) and in steady state
  (from the first finished shard to the last);
- Ray's overhead per image at 1 worker vs local, in steady state (target <= 15%);
- the driver's peak memory (RSS above its level before the run, sampled every 50 ms, and
  Python's own peak from tracemalloc) while listing and scoring 10,000 and 100,000 paths
  given in a list file (the same images, repeated): it must not grow with the path count.

Run under the benchmark lock, e.g.::

    flock /tmp/flawscope-bench.lock python benchmarks/ray_predict.py --images 2000
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


def make_data(root: Path, n_images: int, size: int) -> tuple[Path, list[str]]:
    generate(root / "synth", SynthSpec(size=size, n_train=20, n_test_good=2,
                                       n_test_per_defect=1))
    Detector.fit(root / "synth" / "synthetic_object", model="gaussian",
                 image_size=size).save(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    paths = []
    for i in range(n_images):
        path = root / "images" / f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return root / "model", paths


def local_rate(model: Path, paths: list[str], out: Path) -> float:
    torch.set_num_threads(1)
    detector = Detector.load(model)
    start = time.perf_counter()
    with PredictionWriter(out, heatmaps=False) as writer:
        for path, prediction in zip(paths, detector.predict_many(paths, keep_images=False),
                                    strict=True):
            writer.write(prediction, Path(path).stem)
    return len(paths) / (time.perf_counter() - start)


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
    """(wall images/s, steady images/s, summary) of one cluster.predict on a fresh local Ray
    instance with ``workers`` CPUs; Ray's start is included in the wall figure."""
    marks: list[tuple[float, int]] = []
    images = 0

    def progress(line: str) -> None:
        nonlocal images
        if line.startswith("[") and "shards]" in line:
            images = int(line.split("] ")[1].split(" images")[0])
            marks.append((time.perf_counter(), images))

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        summary = cluster.predict(model, inputs, out, workers=workers, cpus_per_task=1,
                                  shard_size=shard_size, heatmaps=False, progress=progress)
    finally:
        ray.shutdown()
    wall = summary.n_inputs / (time.perf_counter() - start)
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    steady = (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")
    return wall, steady, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="distinct images to score")
    parser.add_argument("--size", type=int, default=64, help="image side and model size")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--paths", default="10000,100000",
                        help="path counts for the driver-memory runs")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} logical cores; 1 thread per worker; "
          f"gaussian model, {args.size} px images, shards of {args.shard_size}")
    with tempfile.TemporaryDirectory(prefix="ray_predict_") as tmp:
        root = Path(tmp)
        model, paths = make_data(root, args.images, args.size)
        listing = root / "images.txt"
        listing.write_text("\n".join(paths) + "\n")
        local = local_rate(model, paths, root / "local")
        print(f"local, 1 process:  {local:8.1f} images/s")
        for workers in (1, 2):
            wall, steady, _ = ray_run(model, [listing], root / f"ray{workers}", workers,
                                      args.shard_size)
            print(f"Ray, {workers} worker(s): {steady:8.1f} images/s steady, {wall:8.1f} "
                  f"images/s over the whole run (Ray and actor start-up included)")
            if workers == 1:
                overhead = local / steady - 1
                print(f"Ray overhead per image at 1 worker vs local: {overhead:+.1%} "
                      f"({1e3 / steady:.3f} vs {1e3 / local:.3f} ms/image; target <= 15%)")
        for count in map(int, args.paths.split(",")):
            big = root / f"paths_{count}.txt"
            with open(big, "w") as f:
                for i in range(count):
                    f.write(paths[i % len(paths)] + "\n")
            out = root / f"mem{count}"
            tracemalloc.start()
            with RssPeak() as rss:
                cluster.plan_shards([big], out, shard_size=args.shard_size, model_dir=model)
                listed_mb = tracemalloc.get_traced_memory()[1] / 2**20
                listed_rss = rss.growth_mb
            tracemalloc.stop()
            with RssPeak() as rss:
                wall, steady, summary = ray_run(model, [big], out, 2, args.shard_size)
                records = sum(1 for _ in cluster.read_predictions(out))
            assert records == summary.n_inputs == count, (records, summary.n_inputs)
            print(f"{count:>7} paths: listing peak {listed_mb:6.2f} MB Python "
                  f"({listed_rss:6.1f} MB RSS growth); scoring on Ray (2 workers) driver "
                  f"RSS growth {rss.growth_mb:6.1f} MB, {steady:.1f} images/s steady")


if __name__ == "__main__":
    main()
