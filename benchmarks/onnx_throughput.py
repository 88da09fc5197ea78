"""CPU throughput of onnxruntime vs PyTorch for every exportable model, in images/s.

For each model: fit it on a small synthetic category (or load MODEL_DIRs given with
--model-dir), export it to ONNX (checked against PyTorch), then time the scoring of the
same batches with PyTorch (torch.set_num_threads) and onnxruntime (intra_op_num_threads),
for each thread count. Decoding is excluded: both score the same prepared tensors.

    python benchmarks/onnx_throughput.py --models gaussian,ae_l2 --threads 1,2
    python benchmarks/onnx_throughput.py --model-dir runs/m1 --model-dir runs/m2

Wrap measurements in `flock /tmp/flawscope-bench.lock ...` on shared machines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def time_it(fn, batches, min_s: float) -> float:
    """Images per second of ``fn`` over ``batches``, repeated for at least ``min_s``."""
    fn(batches[0])  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        for batch in batches:
            fn(batch)
            n += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return n / elapsed


def main() -> None:
    from flawscope.errors import FlawscopeError
    from flawscope.export import export_onnx, onnx_session, scoring_module
    from flawscope.modelfile import load_model
    from flawscope.pipeline import fit_model
    from flawscope.synth import SynthSpec, generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gaussian", help="comma-separated names to fit")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--model-dir", action="append", type=Path, default=[])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flawscope-onnx-"))
    dirs = list(args.model_dir)
    if not dirs and args.models:
        generate(work / "data", SynthSpec(size=256, n_train=40, seed=0), ("synthetic_object",))
        for name in args.models.split(","):
            out = work / name
            try:
                fit_model(work / "data" / "synthetic_object", name, out, preset=args.preset)
            except FlawscopeError:  # a model without that preset
                fit_model(work / "data" / "synthetic_object", name, out)
            dirs.append(out)

    print(f"{'model':<12} {'threads':>7} {'pytorch img/s':>14} {'onnxruntime img/s':>18} "
          f"{'ratio':>6}")
    for model_dir in dirs:
        model, manifest = load_model(model_dir)
        size = model.image_size
        g = torch.Generator().manual_seed(0)
        batches = [torch.rand(args.batch_size, 3, size, size, generator=g) for _ in range(4)]
        try:
            report = export_onnx(model, work / f"{model.name}.onnx", manifest,
                                 check_images=batches[0])
        except FlawscopeError as exc:
            print(f"{model.name:<12} not exported: {exc}")
            continue
        module = scoring_module(model)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            with torch.no_grad():
                pt = time_it(module, batches, args.min_seconds)
            session = onnx_session(report.path, threads)
            arrays = [b.numpy() for b in batches]
            ort = time_it(lambda x, s=session: s.run(None, {"images": x}), arrays,
                          args.min_seconds)
            print(f"{model.name:<12} {threads:>7} {pt:>14.1f} {ort:>18.1f} {ort / pt:>6.2f}")
        print(f"{'':<12} (image size {size}, batch {args.batch_size}, max rel. error "
              f"{max(report.score_rel_err, report.map_rel_err):.1e}, "
              f"{report.size_bytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
