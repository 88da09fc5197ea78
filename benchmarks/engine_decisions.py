"""Do the exported engines decide like PyTorch on real test images?

For every fitted model directory given (``flawscope fit`` or ``flawscope benchmark`` output,
e.g. ``runs/bench/patchcore/screw/model``), export it if it has no checked ONNX file yet
(``flawscope export``: parity check on its own images, no timing), then score every test image
of its category with ``Detector.load(dir, engine="torch")`` and with each other engine, through
the same ``Detector.predict_many`` that ``flawscope predict`` and the service use. Prints one row
per model and engine: images, decisions equal to torch's, the largest relative score
difference (``|s_engine - s_torch| / max(|s_torch|, 1e-12)``), and images whose score lies within
that difference of the threshold (where rounding alone could flip a decision).

    python benchmarks/engine_decisions.py --data ../shared/datasets \\
        runs/bench/padim/screw/model runs/bench/patchcore/screw/model --engines onnxruntime,openvino

The category is read from the model's manifest (``fit_info``); ``--data`` is only needed when
the manifest's path no longer exists (another machine): the category's folder name is then
looked up below ``--data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def category_of(model_dir: Path, data: Path | None) -> Path:
    from flawscope.modelfile import read_manifest

    fit_info = read_manifest(model_dir).get("fit_info", {})
    recorded = Path(str(fit_info.get("data", "")))
    # The recorded path is the category, or a folder below it (train/good).
    for folder in (recorded, *recorded.parents):
        if (folder / "test").is_dir():
            return folder
    if data is not None:
        for name in (recorded.name, *(p.name for p in recorded.parents)):
            matches = sorted(p for p in data.rglob(name) if (p / "test").is_dir())
            if name and matches:
                return matches[0]
    raise SystemExit(f"{model_dir}: its category {recorded} is not here; give --data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model directories")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--engines", default="onnxruntime",
                        help="engines compared with torch (onnxruntime, openvino, int8)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from flawscope import Detector
    from flawscope.data import open_category
    from flawscope.export import export_model_dir
    from flawscope.modelfile import read_manifest

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; {args.threads} threads")
    print("| category | model | engine | images | same decisions | max rel. score diff "
          "| scores within that of the threshold |")
    print("|---|---|---|---|---|---|---|")
    for model_dir in args.models:
        category = open_category(category_of(model_dir, args.data))
        paths = [t.path for t in category.test]
        if "onnx" not in read_manifest(model_dir).get("exports", {}):
            export_model_dir(model_dir, measure_s=0)
        reference = list(Detector.load(model_dir, engine="torch").predict_many(paths))
        ref_scores = np.array([p.score for p in reference])
        threshold = reference[0].threshold
        for engine in args.engines.split(","):
            other = list(Detector.load(model_dir, engine=engine).predict_many(paths))
            scores = np.array([p.score for p in other])
            same = sum(a.is_anomalous == b.is_anomalous for a, b in zip(reference, other,
                                                                        strict=True))
            rel = np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12)
            near = (int(np.sum(np.abs(ref_scores - threshold) <= np.abs(scores - ref_scores)))
                    if threshold is not None else "-")
            name = read_manifest(model_dir).get("model", model_dir.parent.parent.name)
            print(f"| {category.root.name} | {name} | {engine} | {len(paths)} | {same} "
                  f"| {rel.max():.2e} | {near} |", flush=True)


if __name__ == "__main__":
    main()
