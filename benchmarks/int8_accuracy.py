"""Image AUROC of the float32 graph vs the int8 graph on a category's real test set.

For each model directory: export (``model.onnx``) and quantize (``model.int8.onnx``, with
its guard) where missing, then score every test image of the category the model was fitted
on (or ``--data``) with the ``onnxruntime`` and ``int8`` engines, through the same
``AnomalyModel.score_tensor`` path as ``flawscope test``, and print image AUROC, its change,
the guard's figures and the images/s measured at quantization (batch 16, random input).

A model whose int8 graph the guard refuses is reported as refused; with ``--force`` it is
quantized again with the bounds lifted, only to measure what the refused graph would give on
the test set (its manifest then records the lifted bounds: use a copy of the model).

    flock /tmp/flawscope-bench.lock python benchmarks/int8_accuracy.py \\
        --model-dir runs/padim_screw --model-dir runs/patchcore_screw --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", action="append", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None,
                        help="test category (default: the one each model was fitted on)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true",
                        help="measure a refused int8 graph too (bounds lifted)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from flawscope.data import open_category
    from flawscope.engines import open_engine
    from flawscope.export import export_model_dir
    from flawscope.gallery import cpu_model
    from flawscope.modelfile import load_model, read_manifest
    from flawscope.pipeline import score_paths
    from flawscope.quantize import INT8_FILE, QuantizationRefused, quantize_model_dir

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; {args.threads} threads; img/s: batch 16, warm, "
          "measured at quantization")
    print(f"{'category':<14} {'model':<10} {'n test':>6} {'AUROC fp32':>10} {'int8':>7} "
          f"{'delta':>8} {'img/s fp32':>10} {'int8':>6} {'guard AUROC':>13} {'guard r':>8} "
          f"{'good +':>7} guard")
    for model_dir in args.model_dir:
        manifest = read_manifest(model_dir)
        if not (model_dir / "model.onnx").is_file():
            export_model_dir(model_dir, measure_s=0)
        verdict = "passed"
        if not (model_dir / INT8_FILE).is_file():
            try:
                quantize_model_dir(model_dir, threads=args.threads, measure_s=3.0)
            except QuantizationRefused as exc:
                print(f"  {model_dir}: {exc}")
                if not args.force:
                    continue
                verdict = "REFUSED"
                quantize_model_dir(model_dir, threads=args.threads, measure_s=3.0,
                                   max_auroc_drop=float("inf"), min_correlation=-1.0,
                                   max_margin_shift=float("inf"))
        model, manifest = load_model(model_dir)
        entry = manifest["exports"]["int8"]
        if entry["bounds"]["min_correlation"] < 0:
            verdict = "REFUSED"
        category = open_category(args.data or manifest["fit_info"]["data"], train=False)
        items = category.require_test()
        labels = np.array([t.is_anomalous for t in items])
        paths = [t.path for t in items]
        auroc = {}
        for name in ("onnxruntime", "int8"):
            engine = open_engine(model, model_dir, name, threads=args.threads)
            scores, _ = score_paths(model, paths, engine=engine)
            auroc[name] = roc_auc_score(labels, scores)
        speeds = entry.get("img_per_s") or {}
        print(f"{category.name:<14} {manifest['model']:<10} {len(items):>6} "
              f"{auroc['onnxruntime']:>10.4f} {auroc['int8']:>7.4f} "
              f"{auroc['int8'] - auroc['onnxruntime']:>+8.4f} "
              f"{speeds.get('onnxruntime', float('nan')):>10.1f} "
              f"{speeds.get('int8', float('nan')):>6.1f} "
              f"{entry['auroc_fp32']:>6.4f}/{entry['auroc_int8']:.4f} "
              f"{entry['correlation']:>8.4f} {entry['good_score_shift']:>+7.1%} {verdict}",
              flush=True)


if __name__ == "__main__":
    main()
