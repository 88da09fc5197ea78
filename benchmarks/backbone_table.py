"""PatchCore with each backbone (or ensemble): image AUROC, AU-PRO, fit s, images/s, memory.

Runs, for every backbone setting and category, one

    flock /tmp/flawscope-bench.lock python -m flawscope benchmark --data DATA \
        --categories CATEGORY --models patchcore --set backbone=BACKBONE \
        --set coreset=auto --out OUT/NAME

(one category per locked job, so that other timings interleave), then prints one markdown
table from the ``metrics.json`` files with each backbone's mean over the categories.
Resumable: a rerun skips finished pairs. ``--table-only`` prints the table of what exists.

``--speed CATEGORY`` then times the fitted models of one category against each other in one
locked process: the same test images scored in batches of 16, the backbones taking turns
for ``--rounds`` rounds (so a slower period of the machine hits all of them), median
images/s. The benchmark's own images/s come from separate processes minutes apart and from
as few as 42 test images, so they move with whatever else the machine does.

    python benchmarks/backbone_table.py --data ../shared/datasets --out runs/backbones \
        --backbones lite0,lite2,lite0+lite2,lite1

Short names: ``lite0`` is ``efficientnet_lite0``, ``lite0+lite2`` the ensemble of both
(features concatenated per patch, :class:`flawscope.backbones.EnsembleExtractor`).
``coreset=auto`` because magnetic_tile's 762 training images give 700,000 patches, where
the exact coreset takes far longer than the approximate one; every backbone gets the same
settings. Threads: PyTorch's default (one per core).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CATEGORIES = "screw,toothbrush,magnetic_tile,welding"
COLUMNS = ["image_auroc", "pixel_aupro", "fit_s", "infer_img_per_s", "peak_rss_mb"]


def full_name(short: str) -> str:
    """``lite0+lite2`` -> ``efficientnet_lite0+efficientnet_lite2``."""
    return "+".join(p if p.startswith("efficientnet_") else f"efficientnet_{p}"
                    for p in short.split("+"))


def run(args: argparse.Namespace) -> None:
    for name in args.backbones.split(","):
        for category in args.categories.split(","):
            out = Path(args.out) / name
            if (out / "patchcore" / category / "metrics.json").is_file():
                continue
            cmd = ["flock", "/tmp/flawscope-bench.lock", sys.executable, "-m", "flawscope",
                   "benchmark", "--data", args.data, "--categories", category,
                   "--models", "patchcore", "--set", f"backbone={full_name(name)}",
                   "--set", "coreset=auto", "--out", str(out)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=False)


def speed(args: argparse.Namespace) -> str:
    """Median images/s of each backbone's fitted model on ``args.speed``'s test images."""
    import statistics
    import time

    import torch

    from flawscope.data import ImageDataset, find_categories, open_category
    from flawscope.modelfile import load_model

    names = args.backbones.split(",")
    models = {n: load_model(Path(args.out) / n / "patchcore" / args.speed / "model")[0]
              for n in names}
    category = open_category(find_categories(args.data, [args.speed])[0])
    paths = [t.path for t in category.test][:args.images]
    size = models[names[0]].image_size
    images = torch.stack([ImageDataset(paths, size)[i] for i in range(len(paths))])
    for model in models.values():  # warm-up: lazy backbone build, first allocations
        model.score_batch(images[:16])
    rates: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for i in range(0, len(images), 16):
                model.score_batch(images[i:i + 16])
            rates[name].append(len(images) / (time.perf_counter() - start))
    lines = [f"images/s on {len(images)} {args.speed} test images at {size} px, "
             f"{torch.get_num_threads()} threads, median of {args.rounds} rounds:"]
    lines += [f"  {n}: {statistics.median(r):.2f}" for n, r in rates.items()]
    return "\n".join(lines) + "\n"


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if key in ("image_auroc", "pixel_aupro") else (
        f"{value:.2f}" if key == "infer_img_per_s" else f"{value:.0f}")


def table(args: argparse.Namespace) -> str:
    categories = args.categories.split(",")
    lines = ["| backbone | " + " | ".join(categories) + " | mean AUROC | mean AU-PRO "
             "| fit s (sum) | img/s (mean) | peak MB (max) |",
             "|---" * (6 + len(categories)) + "|"]
    for name in args.backbones.split(","):
        found = {}
        for category in categories:
            path = Path(args.out) / name / "patchcore" / category / "metrics.json"
            if path.is_file():
                found[category] = json.loads(path.read_text())
        cells = [f"{_cell('image_auroc', found[c]['image_auroc'])} / "
                 f"{_cell('pixel_aupro', found[c].get('pixel_aupro'))}"
                 if c in found else "-" for c in categories]
        # Summaries over the categories every listed backbone finished, so rows compare.
        common = [c for c in categories if all(
            (Path(args.out) / n / "patchcore" / c / "metrics.json").is_file()
            for n in args.backbones.split(","))]
        rows = [found[c] for c in common]
        mean = {k: sum(m[k] for m in rows) / len(rows) if rows else None
                for k in ("image_auroc", "pixel_aupro", "infer_img_per_s")}
        total_fit = sum(m["fit_s"] for m in rows) if rows else None
        peak = max(m["peak_rss_mb"] for m in rows) if rows else None
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     + " | ".join([_cell("image_auroc", mean["image_auroc"]),
                                   _cell("pixel_aupro", mean["pixel_aupro"]),
                                   _cell("fit_s", total_fit),
                                   _cell("infer_img_per_s", mean["infer_img_per_s"]),
                                   _cell("peak_rss_mb", peak)]) + " |")
    if common != categories:
        lines.append(f"\nSummary columns over {', '.join(common)} (the categories every "
                     "backbone finished).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--categories", default=CATEGORIES)
    parser.add_argument("--backbones", default="lite0,lite2,lite0+lite2,lite1")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--speed", metavar="CATEGORY",
                        help="Time the fitted models of this category against each other "
                             "(run it under flock /tmp/flawscope-bench.lock).")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.speed:
        print(speed(args), flush=True)
        return
    if not args.table_only:
        run(args)
    text = table(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "backbone_table.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
