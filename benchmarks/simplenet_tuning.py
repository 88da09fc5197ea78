"""Compare ``simplenet`` settings on real categories, computing backbone features only once.

The backbone is frozen, so the features of a category's training and test images are the same
for every setting of the head (noise, learning rates, steps, width): they are computed once per
category (and image size) and kept on disk under ``--cache``; every setting then only trains
the head and scores the cached test features. Prints, per category and setting, the image
AUROC (and that of the unsmoothed patch maximum) and AU-PRO (maps and masks at the model's
image size, not the images' own: for comparing settings, not for the results table) and the
head's training time, per seed.

    python benchmarks/simplenet_tuning.py --data ../shared/datasets \\
        --categories screw,welding --seeds 0,1 \\
        --try "" --try "noise_std=0.25" --try "noise_std=0.5,lr_discriminator=5e-4"

An empty ``--try`` is the ``fast`` preset as shipped; each other one overrides it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from flawscope.data import ImageDataset, find_categories, open_category, read_mask
from flawscope.metrics import aupro, image_auroc
from flawscope.models import get_model_class
from flawscope.models._maps import upsample_and_smooth
from flawscope.models.base import coerce_overrides


def parse_try(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if part)


def features(model, paths, size: int, cache: Path) -> torch.Tensor:
    """Patch features ``(N, C, h, w)`` of the images, from the cache when there."""
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    data = ImageDataset(paths, size)
    out = torch.cat([model.embed(batch) for batch in
                     torch.utils.data.DataLoader(data, batch_size=16)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--categories", default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--try", dest="tries", action="append", default=[])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/simplenet-features"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cls = get_model_class("simplenet")
    seeds = [int(s) for s in args.seeds.split(",")]
    tries = args.tries or [""]
    names = args.categories.split(",") if args.categories else None
    for folder in find_categories(args.data, names):
        cat = open_category(folder)
        probe = cls.from_settings("fast")
        size = probe.image_size
        stages = "_".join(map(str, probe.config.stages))
        key = f"{folder.name}-{size}-{probe.config.backbone}-{stages}"
        train = features(probe, cat.train, size, args.cache / f"{key}-train.pt")
        test = features(probe, [t.path for t in cat.test], size, args.cache / f"{key}-test.pt")
        labels = np.array([t.is_anomalous for t in cat.test])
        masks = None
        if cat.has_masks:
            masks = np.stack([read_mask(t.mask_path, size) if t.mask_path is not None
                              else np.zeros((size, size), bool) for t in cat.test])
        rows = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
        for text in tries:
            overrides = coerce_overrides(cls.Config, parse_try(text))
            results = []
            for seed in seeds:
                model = cls.from_settings("fast", {**overrides, "seed": seed})
                model._training_rows = lambda images, r=rows, n=folder.name: (r.clone(), n)
                start = time.perf_counter()
                model.fit(None)
                fit_s = time.perf_counter() - start
                with torch.no_grad():
                    maps = torch.cat([upsample_and_smooth(model.head(part), size,
                                                          model.config.sigma)
                                      for part in test.split(32)])
                scores = maps.flatten(1).amax(1).numpy()
                with torch.no_grad():
                    raw = torch.cat([model.head(part).flatten(1).amax(1)
                                     for part in test.split(32)]).numpy()
                pro = aupro(masks, maps.numpy()) if masks is not None else float("nan")
                results.append((image_auroc(labels, scores), pro, fit_s,
                                image_auroc(labels, raw)))
            a = np.array(results)
            per_seed = " ".join(f"{r[0]:.3f}/{r[1]:.3f}" for r in results)
            print(f"{folder.name:14s} {text or '(fast)':50s} image AUROC {a[:, 0].mean():.3f} "
                  f"AU-PRO {a[:, 1].mean():.3f} (unsmoothed max {a[:, 3].mean():.3f}) "
                  f"head fit {a[:, 2].mean():.0f} s "
                  f"[{per_seed}] last loss {model.history[-1]['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
