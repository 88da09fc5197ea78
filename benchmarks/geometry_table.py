"""Image AUROC, pixel AUROC, AU-PRO, fit s, megapixels/s and peak memory of each geometry.

Runs ``flawscope benchmark`` once per (geometry, model, category), each under
``flock /tmp/flawscope-bench.lock`` so that no two timings share the cores, then prints one
markdown table from the ``metrics.json`` files. Resumable: a rerun skips finished pairs.

    python benchmarks/geometry_table.py --data ../shared/datasets --out runs/geometry \
        --categories welding,toothbrush,magnetic_tile,screw --models patchcore,padim

PatchCore runs with ``coreset_ratio=0.01`` in every geometry (tiled modes multiply the
patches, and the greedy coreset costs patches x kept patches), so the geometries compare at
the same setting.

``--no-lock`` runs without the lock, for the accuracy columns only (image AUROC, pixel AUROC,
AU-PRO and peak memory do not depend on what else runs; fit s and megapixels/s do).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

GEOMETRIES = {"resize": [], "keep_aspect": ["--geometry", "keep_aspect"],
              "tile": ["--geometry", "tile", "--max-side", "0"]}
SETTINGS = {"patchcore": ["--set", "coreset_ratio=0.01"], "padim": []}
COLUMNS = ["image_auroc", "pixel_auroc", "pixel_aupro", "fit_s", "infer_mpix_per_s",
           "peak_rss_mb"]


def run(args: argparse.Namespace) -> None:
    for category in args.categories.split(","):
        for model in args.models.split(","):
            for geometry in args.geometries.split(","):
                out = Path(args.out) / geometry
                if (out / model / category / "metrics.json").is_file():
                    continue
                lock = [] if args.no_lock else ["flock", "/tmp/flawscope-bench.lock"]
                cmd = [*lock, sys.executable, "-m", "flawscope",
                       "benchmark", "--data", args.data, "--models", model, "--categories",
                       category, "--out", str(out), "--pixel-size", str(args.pixel_size),
                       *SETTINGS.get(model, []), *GEOMETRIES[geometry]]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=False)
                table(args)


def table(args: argparse.Namespace) -> None:
    lines = ["| category | model | geometry | " + " | ".join(COLUMNS) + " |",
             "|---" * (3 + len(COLUMNS)) + "|"]
    for category in args.categories.split(","):
        for model in args.models.split(","):
            for geometry in args.geometries.split(","):
                path = Path(args.out) / geometry / model / category / "metrics.json"
                if not path.is_file():
                    continue
                m = json.loads(path.read_text())
                cells = [f"{m[c]:.3f}" if isinstance(m.get(c), float) and abs(m[c]) < 10
                         else f"{m[c]:.1f}" if isinstance(m.get(c), float) else str(m.get(c))
                         for c in COLUMNS]
                lines.append(f"| {category} | {model} | {geometry} | " + " | ".join(cells)
                             + " |")
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "geometry_table.md").write_text(text)
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--categories", default="welding,toothbrush,magnetic_tile,screw")
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--geometries", default="resize,keep_aspect,tile")
    parser.add_argument("--pixel-size", default="native",
                        help="native (each mask's own size, the default) or a number of pixels")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--no-lock", action="store_true",
                        help="Do not wait for the timing lock (accuracy only: the fit s and "
                             "megapixels/s then share the cores with whatever else runs).")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.table_only:
        run(args)
    table(args)


if __name__ == "__main__":
    main()
