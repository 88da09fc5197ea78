"""PatchCore detection with the exact against the approximate coreset, over seeds.

For one category, the training and test features are computed once (PatchCore's default
settings otherwise); then, for each ``--methods`` entry and each seed, the memory bank is
selected from the same training features (``PatchCoreModel._exact_bank`` /
``_approx_bank``, exactly what ``fit`` runs) and the test set is scored against it. Image
AUROC and AU-PRO (maps and masks at the model's input size, 256 px) per bank, the selection
time, and per method the mean and range over seeds. The seed changes the exact selection's
starting point and the approximate one's chunks and k-means cells.

    flock /tmp/flawscope-bench.lock python benchmarks/coreset_accuracy.py \\
        --data /work/shared/datasets/magnetic_tile/magnetic_tile --methods exact,approx \\
        --seeds 0 --approx-seeds 0,1,2 --threads 2 --out /tmp/coreset_mt.jsonl

One JSON line per bank (to stdout and appended to ``--out``; banks already in ``--out`` for
this category are not selected again), then a summary per method.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from fewshot import embed_all  # the sibling benchmark's feature pass over a dataset

from flawscope.data import ImageDataset, open_category, read_mask
from flawscope.gallery import cpu_model
from flawscope.metrics import aupro, image_auroc
from flawscope.models import get_model_class


def feature_batches(features: torch.Tensor, batch: int = 16):
    """``(features, source image index)`` batches, as ``PatchCoreModel._view_features``."""
    for start in range(0, len(features), batch):
        emb = features[start:start + batch]
        yield emb, torch.arange(start, start + len(emb))


def method_key(row: dict) -> tuple[str, float]:
    """``(method, coreset ratio)`` of a result line (lines written before ``--ratios``
    existed were at the default of that time, 0.1)."""
    return row["method"], row.get("ratio", 0.1)


def evaluate(model, test_features: torch.Tensor, labels: list[int], masks: np.ndarray,
             batch: int = 32) -> tuple[float, float]:
    scores, maps = [], []
    for start in range(0, len(test_features), batch):
        s, m = model.score_features(test_features[start:start + batch])
        scores.append(s)
        maps.append(m.float().numpy())
    return (image_auroc(labels, torch.cat(scores).numpy()),
            aupro(masks, np.concatenate(maps)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="one category folder")
    ap.add_argument("--methods", default="exact,approx")
    ap.add_argument("--seeds", default="0", help="seeds of the exact selection")
    ap.add_argument("--approx-seeds", default="0,1,2", help="seeds of the approximate one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratios", default="0.1",
                    help="coreset ratios to select at (comma-separated); each is its own "
                         "method in the summary, e.g. approx@0.02")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cls = get_model_class("patchcore")
    category = open_category(args.data)
    probe = cls.from_settings(None, {})
    size = probe.image_size
    done = set()
    if args.out and args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            if r["category"] == str(args.data):
                done.add((*method_key(r), r["seed"]))
    print(f"CPU: {cpu_model()}, {args.threads} threads; {args.data}: "
          f"{len(category.train)} train, {len(category.test)} test images", flush=True)
    start = time.perf_counter()
    train = embed_all(probe, ImageDataset(category.train, size))
    test = embed_all(probe, ImageDataset([t.path for t in category.test], size))
    n_patches = train.shape[0] * train.shape[2] * train.shape[3]
    print(f"features {time.perf_counter() - start:.0f} s; {n_patches} training patches",
          flush=True)
    labels = [int(t.is_anomalous) for t in category.test]
    masks = np.stack([read_mask(t.mask_path, size) if t.mask_path is not None
                      else np.zeros((size, size), bool) for t in category.test])
    seeds = {"exact": args.seeds, "approx": args.approx_seeds}
    for method, ratio in itertools.product(args.methods.split(","),
                                           (float(r) for r in args.ratios.split(","))):
        for seed in (int(s) for s in seeds[method].split(",")):
            if (method, ratio, seed) in done:
                continue
            model = cls.from_settings(None, {"coreset": method, "seed": seed,
                                             "coreset_ratio": ratio})
            start = time.perf_counter()
            if method == "exact":
                bank = model._exact_bank(feature_batches(train), n_patches)
            else:
                bank = model._approx_bank(feature_batches(train))
            select_s = time.perf_counter() - start
            model._set_bank(bank.to(torch.float16).contiguous())
            auroc, pro = evaluate(model, test, labels, masks)
            row = {"category": str(args.data), "method": method, "ratio": ratio, "seed": seed,
                   "bank": len(bank), "select_s": round(select_s, 1),
                   "image_auroc": round(auroc, 5), "aupro": round(pro, 5),
                   "cpu": cpu_model(), "threads": args.threads}
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    if args.out:
        rows = [json.loads(line) for line in args.out.read_text().splitlines()]
        rows = [r for r in rows if r["category"] == str(args.data)]
        for method, ratio in dict.fromkeys(method_key(r) for r in rows):
            same = [r for r in rows if method_key(r) == (method, ratio)]
            a = [r["image_auroc"] for r in same]
            p = [r["aupro"] for r in same]
            print(f"{method}@{ratio}: {len(a)} seeds, image AUROC {np.mean(a):.4f} "
                  f"[{min(a):.4f}-{max(a):.4f}], AU-PRO {np.mean(p):.4f} "
                  f"[{min(p):.4f}-{max(p):.4f}]")


if __name__ == "__main__":
    main()
