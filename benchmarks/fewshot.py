"""Few-shot PatchCore against full-data PatchCore: image AUROC from k good images.

For each category, k in ``--shots`` and ``--draws`` seeded random draws of k training images
(draw d drawn with seed ``1000 d + k``, so ``--first-draw 3`` adds draws 3, 4, ... to an earlier
run's 0-2), PatchCore is fitted on those images with each reference augmentation of
``--augment`` (settings of the ``fewshot`` preset otherwise) and scores the whole test set.
The image scores of every aggregation in ``--scores`` (PatchCore's ``image_score``: ``max``,
``map_max``, or ``top:F``, the mean of the top fraction F of patch scores) come from the
same patch distances, so they are compared on the same banks. The baseline is PatchCore's
default preset fitted on every training image (``--full-set`` overrides it, e.g.
``coreset=approx``). Test features are computed once per category and scored against every
bank, except where a model's features differ from the few-shot ones (another backbone, block
groups or size) or depend on its training images (the reference brightness of
``intensity=matched``): such a model embeds the test set itself.

    flock /tmp/flawscope-bench.lock python benchmarks/fewshot.py --threads 2 \\
        --json fewshot.json

Prints one line per fit and a table: mean and spread (min-max) of image AUROC per k.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from flawscope.data import ImageDataset, open_category
from flawscope.gallery import cpu_model
from flawscope.metrics import image_auroc
from flawscope.models import get_model_class
from flawscope.models.patchcore import scores_and_maps

DEV = ("mvtec_ad/screw", "mvtec_ad/toothbrush", "magnetic_tile/magnetic_tile",
       "battery_weld/welding")


def patch_distances(model, features: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """``(N, h*w)`` nearest-neighbour distances of test features ``(N, C, h, w)``."""
    out = []
    for start in range(0, len(features), batch):
        emb = features[start:start + batch]
        out.append(model._search.search(model._rows(emb)).view(len(emb), -1))
    return torch.cat(out)


def image_scores(model, patch: torch.Tensor, grid: tuple[int, int], how: str) -> np.ndarray:
    """Image scores from patch distances ``(N, h*w)`` by PatchCore's own
    :func:`~flawscope.models.patchcore.scores_and_maps` with ``image_score`` set by ``how``:
    ``max``, ``map_max`` or ``top:F`` (the mean of the top fraction F)."""
    name, _, fraction = how.partition(":")
    settings = {"reweight": False, "image_score": name}
    if fraction:
        settings["top_fraction"] = float(fraction)
    config = dataclasses.replace(model.config, **settings)
    out = []
    for start in range(0, len(patch), 64):  # the maps of 64 images at a time
        out.append(scores_and_maps(patch[start:start + 64], None, grid, None, None,
                                   config)[0])
    return torch.cat(out).numpy()


def embed_all(model, dataset, batch: int = 16) -> torch.Tensor:
    return torch.cat([model.embed(torch.stack([dataset[i] for i in
                                               range(s, min(s + batch, len(dataset)))]))
                      for s in range(0, len(dataset), batch)])


FEATURE_SETTINGS = ("backbone", "stages", "image_size", "intensity")


def test_features(model, paths: list, probe, shared: torch.Tensor | None) -> torch.Tensor:
    """The test images' features for a fitted ``model``: the ``shared`` ones, embedded by
    ``probe``, where they are what the model itself would compute (``shared`` is None where
    the probe's features depend on its training images, as with ``intensity=matched``)."""
    same = all(getattr(model.config, key) == getattr(probe.config, key)
               for key in FEATURE_SETTINGS)
    if shared is not None and same:
        return shared
    with torch.inference_mode():
        return embed_all(model, ImageDataset(paths, model.image_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--categories", default=",".join(DEV))
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--first-draw", type=int, default=0,
                    help="number of the first draw: adds draws to an earlier run's")
    ap.add_argument("--augment", default="flips,none,rot90+flips")
    ap.add_argument("--scores", default="max,top:0.01,top:0.05")
    ap.add_argument("--set", nargs="*", default=[], help="KEY=VALUE for the few-shot models")
    ap.add_argument("--full-set", nargs="*", default=["coreset=approx"],
                    help="KEY=VALUE for the full-data baseline (default preset)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-data baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cls = get_model_class("patchcore")
    extra = dict(v.split("=", 1) for v in args.set)
    full_set = dict(v.split("=", 1) for v in args.full_set)
    scores = args.scores.split(",")
    rows: list[dict] = []
    print(f"CPU: {cpu_model()}, {args.threads} threads")
    for name in args.categories.split(","):
        category = open_category(args.root / name)
        probe = cls.from_settings("fewshot", extra)
        size = probe.image_size
        tests = [t.path for t in category.test]
        labels = [int(t.defect_type != "good") for t in category.test]
        start = time.perf_counter()
        features = None  # a matched model's reference comes from its own training images
        if probe.config.intensity != "matched":
            with torch.inference_mode():
                features = embed_all(probe, ImageDataset(tests, size))
        print(f"{name}: {len(category.train)} train, {len(tests)} test images, "
              f"test features {time.perf_counter() - start:.0f} s", flush=True)
        if not args.no_full:
            full = cls.from_settings(None, full_set)
            start = time.perf_counter()
            full.fit(ImageDataset(category.train, full.image_size))
            fit_s = time.perf_counter() - start
            full_features = test_features(full, tests, probe, features)
            patch = patch_distances(full, full_features)
            auroc = image_auroc(labels, image_scores(full, patch, full_features.shape[-2:],
                                                     "max"))
            rows.append({"category": name, "k": "full", "augment": "none", "score": "max",
                         "draw": 0, "auroc": auroc, "fit_s": fit_s,
                         "bank": len(full.memory_bank), "settings": full_set})
            print(f"  full data ({len(category.train)} images, {full_set}): AUROC "
                  f"{auroc:.4f}, fit {fit_s:.0f} s", flush=True)
        for k in (int(v) for v in args.shots.split(",")):
            for draw in range(args.first_draw, args.first_draw + args.draws):
                rng = np.random.default_rng(1000 * draw + k)
                chosen = sorted(rng.choice(len(category.train), k, replace=False).tolist())
                paths = [category.train[i] for i in chosen]
                for augment in args.augment.split(","):
                    model = cls.from_settings("fewshot", {**extra, "augment": augment})
                    start = time.perf_counter()
                    model.fit(ImageDataset(paths, size))
                    fit_s = time.perf_counter() - start
                    # embedded before the clock starts: score_s is the search alone for
                    # every model, whether or not it embeds the test set itself
                    own_features = test_features(model, tests, probe, features)
                    start = time.perf_counter()
                    patch = patch_distances(model, own_features)
                    score_s = time.perf_counter() - start
                    grid = own_features.shape[-2:]
                    result = {how: image_auroc(labels, image_scores(model, patch, grid, how))
                              for how in scores}
                    for how, auroc in result.items():
                        rows.append({"category": name, "k": k, "augment": augment,
                                     "score": how, "draw": draw, "auroc": auroc,
                                     "fit_s": fit_s, "score_s": score_s,
                                     "bank": len(model.memory_bank)})
                    print(f"  k={k:2d} draw {draw} {augment:12s} bank {len(model.memory_bank):6d}"
                          f" fit {fit_s:4.1f} s score {score_s:5.1f} s  "
                          + "  ".join(f"{h} {a:.4f}" for h, a in result.items()), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Mean [min-max] image AUROC per (augment, score) and k, per category and averaged."""
    cats = list(dict.fromkeys(r["category"] for r in rows))
    ks = list(dict.fromkeys(r["k"] for r in rows if r["k"] != "full"))
    combos = list(dict.fromkeys((r["augment"], r["score"]) for r in rows if r["k"] != "full"))
    full = {r["category"]: r["auroc"] for r in rows if r["k"] == "full"}
    print("\n| augment | score | k | " + " | ".join(c.split("/")[-1] for c in cats)
          + " | mean | mean - full |")
    print("|" + "---|" * (len(cats) + 5))
    if full:
        mean_full = np.mean([full[c] for c in cats if c in full])
        print("| (full data) | max | all | " + " | ".join(
            f"{full[c]:.3f}" if c in full else "-" for c in cats) + f" | {mean_full:.3f} | |")
    for augment, score in combos:
        for k in ks:
            cells, means = [], []
            for c in cats:
                a = [r["auroc"] for r in rows if (r["category"], r["k"], r["augment"],
                                                  r["score"]) == (c, k, augment, score)]
                means.append(np.mean(a))
                cells.append(f"{np.mean(a):.3f} [{min(a):.3f}-{max(a):.3f}]")
            gap = (f"{np.mean(means) - mean_full:+.3f}" if full and len(full) == len(cats)
                   else "")
            print(f"| {augment} | {score} | {k} | " + " | ".join(cells)
                  + f" | {np.mean(means):.3f} | {gap} |")


if __name__ == "__main__":
    main()
