"""Megapixels per second of PatchCore in ``tile`` mode at native resolution, and peak memory.

Fits PatchCore on the tiles of a few synthetic good images, then scores ``--images`` images of
``--size`` x ``--size`` pixels (after one warm-up image) with ``--threads`` threads and prints
megapixels/s (of the images' own pixels: tiling, overlap, stitching included), images/s, peak
resident memory and the CPU. Run it alone on the cores:

    flock /tmp/flawscope-bench.lock python benchmarks/tile_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch
from PIL import Image

from flawscope.gallery import cpu_model
from flawscope.geometry import Geometry, score_images, training_dataset
from flawscope.models.patchcore import PatchCoreModel
from flawscope.synth import texture_image


def texture(seed: int, size: int) -> Image.Image:
    arr = texture_image(np.random.default_rng(seed), size)
    return Image.fromarray((arr * 255).astype(np.uint8)).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--train", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overlap", type=int, default=None, help="default: a quarter tile")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="PatchCore setting, e.g. image_size=224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.set)
    model = PatchCoreModel.from_settings("default", overrides)
    geometry = Geometry("tile", 0, args.overlap).resolved(model.image_size)
    start = time.perf_counter()
    model.fit(training_dataset([texture(s, args.size) for s in range(args.train)], geometry,
                               model.image_size))
    fit_s = time.perf_counter() - start
    images = [texture(1000 + i, args.size) for i in range(args.images + 1)]
    score_images(model, images[:1], geometry)  # warm-up
    start = time.perf_counter()
    score_images(model, images[1:], geometry)
    seconds = time.perf_counter() - start
    mpix = args.images * args.size ** 2 / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"patchcore tile {geometry} image_size={model.image_size} on {args.size}x{args.size}")
    print(f"fit {fit_s:.1f} s on {args.train} images; scored {args.images} images in "
          f"{seconds:.2f} s: {mpix / seconds:.2f} megapixels/s, {args.images / seconds:.2f} "
          f"images/s; peak RSS {peak:.0f} MiB")
    print(f"CPU {cpu_model()} ({platform.machine()}), {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
