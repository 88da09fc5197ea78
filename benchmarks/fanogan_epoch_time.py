"""Seconds per epoch of each f-AnoGAN training stage, for planning a long (``paper``) fit.

The paper's schedule is 1500 adversarial and 200 encoder epochs; this times one of each on a
real category's training images (decoded once beforehand, so decoding is not counted) and
prints what the whole schedule would take at that speed.

    python benchmarks/fanogan_epoch_time.py --data ../shared/datasets/mvtec_ad/screw --threads 1,2

Stage 1 is timed by a fit with no encoder epochs; stage 2 by a second fit in the same work
folder, which reuses the finished stage 1 from its checkpoint and trains one encoder epoch.
Wrap measurements in `flock /tmp/flawscope-bench.lock ...` on shared machines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from flawscope.data import ImageDataset, open_category
from flawscope.models.fanogan import FAnoGANModel


def _timed_fit(preset: str, overrides: dict, images, workdir: Path) -> float:
    model = FAnoGANModel.from_settings(preset, {**overrides, "picture_every_stage1": 0,
                                                "picture_every_stage2": 0})
    start = time.perf_counter()
    model.fit(images, workdir=workdir)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a category folder")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = parser.parse_args()

    probe = FAnoGANModel.from_settings(args.preset)
    train = open_category(args.data).train
    dataset = ImageDataset(train, probe.image_size)
    images = [dataset[i] for i in range(len(dataset))]  # (3, S, S) tensors, decoded once
    c = probe.config
    print(f"{args.data.name}: {len(train)} images at {c.image_size} px, preset {args.preset}, "
          f"batch {c.batch_size}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            stage1 = _timed_fit(args.preset, {"stage1_epochs": 1, "stage2_epochs": 0},
                                images, Path(tmp))
            stage2 = _timed_fit(args.preset, {"stage1_epochs": 1, "stage2_epochs": 1},
                                images, Path(tmp))
        total_h = (c.stage1_epochs * stage1 + c.stage2_epochs * stage2) / 3600
        print(f"threads {threads}: stage 1 {stage1:.1f} s/epoch, stage 2 {stage2:.1f} s/epoch; "
              f"{c.stage1_epochs} + {c.stage2_epochs} epochs = {total_h:.1f} h")


if __name__ == "__main__":
    main()
