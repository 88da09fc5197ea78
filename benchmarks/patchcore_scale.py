"""PatchCore fit time and peak memory against the number of good images, exact vs approx coreset.

The training images are real good images repeated with augmentation: image ``i`` is
``base[i % n_base]`` (decoded once), flipped left-right when ``(i // n_base)`` is odd,
top-bottom when ``(i // (2 * n_base))`` is odd, and cropped to a box of 80-100% of each side
at a position drawn from a generator seeded with ``i``, then resized to the model's input.
So no two of the first ``4 * n_base`` images are the same picture, and the patch features
vary as a real archive of one part would, rather than repeating exactly.

Every fit runs in a fresh process (its peak resident memory is that process's ru_maxrss) with
``--threads`` PyTorch threads. ``features`` is the time spent in the backbone, ``coreset`` the
rest of the fit (selection, plus copies and the neighbour-search index of the bank). An exact
fit whose predicted time (quadratic in the patch count, from the largest exact fit measured)
exceeds ``--exact-limit`` seconds is skipped and its prediction printed instead, unless
``--exact-budget`` is given: then the exact fit runs for that many seconds of greedy
selection and stops, and the line reports how many of its points it had chosen by then
(``selected`` of ``n_select``), the seconds at which each tenth of them was reached, and the
peak memory so far. The feature matrix, its projection and the selection's arrays are all
allocated before the first point is chosen, so that peak is the fit's up to the final bank
copy (10% of the rows). The selection gets cheaper per point as it goes (more blocks of
points are skipped by the triangle inequality), so the projection ``if_latest_pace_s`` (the
remaining points at the pace of the last tenth of the budget) is an upper estimate.

Usage (one line per fit, as JSON, to stdout and to --out)::

    flock /tmp/flawscope-bench.lock python benchmarks/patchcore_scale.py \\
        --data /work/shared/datasets/mvtec_ad/screw --sizes 500,2000,8000 --threads 2 \\
        --out /tmp/patchcore_scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flawscope.data import image_to_tensor, open_category, read_image, to_rgb
from flawscope.gallery import cpu_model


class AugmentedImages(torch.utils.data.Dataset):
    """``n`` images made from ``base`` by flips and crops (see the module docstring)."""

    def __init__(self, base: list[Image.Image], n: int, size: int):
        self.base, self.n, self.size = base, n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        nb = len(self.base)
        im = self.base[i % nb]
        if (i // nb) % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if (i // (2 * nb)) % 2:
            im = im.transpose(Image.FLIP_TOP_BOTTOM)
        rng = np.random.default_rng(i)
        w, h = im.size
        cw, ch = (int(s * rng.uniform(0.8, 1.0)) for s in (w, h))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image_to_tensor(im.crop((x, y, x + cw, y + ch)), self.size)


class _OutOfBudget(Exception):
    """Raised inside the greedy selection when ``--exact-budget`` seconds are spent."""


def budget_bar(budget_s: float, record: dict) -> type:
    """A stand-in for the selection's tqdm bar that records progress and stops the fit after
    ``budget_s`` seconds of selection."""

    class BudgetBar:
        def __init__(self, total: int, **_):
            self.n, self.total, self.start = 0, total, time.perf_counter()
            self.pace: list[tuple[float, int]] = []
            record.update(n_select=total, tenths_s=[])

        def update(self, k: int = 1) -> None:
            self.n += k
            if self.n % 256:
                return
            elapsed = time.perf_counter() - self.start
            self.pace.append((elapsed, self.n))
            while len(record["tenths_s"]) < 10 and \
                    self.n >= (len(record["tenths_s"]) + 1) * self.total / 10:
                record["tenths_s"].append(round(elapsed, 1))
            if elapsed > budget_s:
                t0, n0 = next(p for p in self.pace if p[0] >= 0.9 * elapsed)
                rate = (self.n - n0) / (elapsed - t0) if self.n > n0 else self.n / elapsed
                record.update(selected=self.n, selection_s=round(elapsed, 1),
                              if_latest_pace_s=round(elapsed + (self.total - self.n) / rate))
                raise _OutOfBudget

        def close(self) -> None:
            pass

    return BudgetBar


def fit_once(data: Path, n: int, coreset: str, threads: int,
             exact_budget: float | None = None) -> dict:
    """One fit in this process; returns its timings."""
    import flawscope.coreset
    from flawscope.models import get_model_class

    torch.set_num_threads(threads)
    model = get_model_class("patchcore").from_settings(None, {"coreset": coreset})
    base = [to_rgb(read_image(p)) for p in open_category(data).train]
    images = AugmentedImages(base, n, model.image_size)
    embed, spent = model.embed, [0.0]

    def timed_embed(batch):
        start = time.perf_counter()
        out = embed(batch)
        spent[0] += time.perf_counter() - start
        return out

    model.embed = timed_embed
    budget: dict = {}
    if exact_budget is not None:
        flawscope.coreset.tqdm = budget_bar(exact_budget, budget)
    cpu, start = time.process_time(), time.perf_counter()
    try:
        model.fit(images)
    except _OutOfBudget:
        return {"images": n, "coreset": coreset, "threads": threads, "stopped": True,
                "budget_s": exact_budget, "features_s": round(spent[0], 1),
                "until_stop_s": round(time.perf_counter() - start, 1), **budget}
    wall = time.perf_counter() - start
    return {"images": n, "coreset": coreset, "threads": threads, "fit_s": round(wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1), "features_s": round(spent[0], 1),
            "coreset_s": round(wall - spent[0], 1), "bank": len(model.memory_bank)}


def run_child(data: Path, n: int, coreset: str, threads: int,
              exact_budget: float | None = None) -> dict:
    """``fit_once`` in a fresh process; adds its peak resident memory."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    budget = ["--exact-budget", str(exact_budget)] if exact_budget is not None else []
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--data", str(data),
                             "--sizes", str(n), "--coreset", coreset,
                             "--threads", str(threads), *budget],
                            stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"fit of {n} images ({coreset}) failed with status {status}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024)  # Linux: KiB
    return result


def predict_exact(measured: dict | None, n: int) -> float | None:
    """Exact fit time at ``n`` images from a measured one: features linear, selection
    quadratic in the patch count (the greedy's N x k distance evaluations with k = ratio N)."""
    if measured is None:
        return None
    ratio = n / measured["images"]
    return measured["features_s"] * ratio + measured["coreset_s"] * ratio ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a category with train/good")
    parser.add_argument("--sizes", default="500,2000,8000", help="numbers of training images")
    parser.add_argument("--coreset", default="exact,approx", help="methods to time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exact-limit", type=float, default=1200,
                        help="skip an exact fit predicted to take longer (s)")
    parser.add_argument("--exact-budget", type=float,
                        help="run exact fits for this many seconds of selection, then stop "
                             "and report their progress (see above)")
    parser.add_argument("--out", type=Path, help="append one JSON line per fit here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fit_once(args.data, int(args.sizes), args.coreset, args.threads,
                                  args.exact_budget if args.coreset == "exact" else None)))
        return
    measured_exact: dict | None = None
    for n in (int(s) for s in args.sizes.split(",")):
        for coreset in args.coreset.split(","):
            predicted = predict_exact(measured_exact, n) if coreset == "exact" else None
            if predicted is not None and predicted > args.exact_limit and \
                    args.exact_budget is None:
                result = {"images": n, "coreset": "exact", "skipped": True,
                          "predicted_fit_s": round(predicted)}
            else:
                result = run_child(args.data, n, coreset, args.threads,
                                   args.exact_budget)
                if coreset == "exact" and not result.get("stopped"):
                    measured_exact = result
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    print(f"CPU: {cpu_model()}; torch threads: {args.threads}; max RSS of this driver: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
