"""How reliably a trained model's preset detects: image AUROC over data seeds x training seeds.

For every data seed the default ``flawscope synth`` output (128 px, 60 training images, 12 good
and 24 defective test images) is generated; the model is fitted on ``train/good`` with every
training seed and scores the test images. Score reductions of the autoencoders are read off the
same fit (``--reductions``), since they change scoring only. Prints one line per run and the
mean / minimum per configuration; ``--json`` writes every run.

    python benchmarks/fast_presets.py --model ae_ssim --data-seeds 0,1,2,3,4 --train-seeds 0,1
    python benchmarks/fast_presets.py --model ae_l2 --set epochs=48 --reductions max,topk

Runs go to ``--workers`` processes of ``--threads`` threads each; training runs where the
model's ``device`` setting puts it (``auto``: a CUDA GPU when there is one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path


def _parse_set(values: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings; the model's Config turns the values into their types."""
    pairs = [v.split("=", 1) for v in values]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--set: expected KEY=VALUE, got {values}")
    return dict(pairs)


def run_one(job: dict) -> list[dict]:
    import torch
    from sklearn.metrics import roc_auc_score

    from flawscope.data import ImageDataset, open_category
    from flawscope.models import get_model_class

    torch.set_num_threads(job["threads"])
    category = open_category(Path(job["data_root"]) / f"seed{job['data_seed']}" / job["category"])
    settings = {**job["settings"], "seed": job["train_seed"]}
    model = get_model_class(job["model"]).from_settings(job["preset"], settings)
    start = time.perf_counter()
    model.fit(ImageDataset(category.train, model.image_size))
    fit_s = time.perf_counter() - start
    data = ImageDataset([t.path for t in category.test], model.image_size)
    images = torch.stack([data[i] for i in range(len(data))])
    labels = [t.is_anomalous for t in category.test]
    rows = []
    for reduction in job["reductions"] or [None]:
        if reduction is not None:
            model.config.score_reduction = reduction
        scores = torch.cat([model.score_batch(images[i:i + 32])[0]
                            for i in range(0, len(images), 32)])
        rows.append({**{k: job[k] for k in ("model", "preset", "data_seed", "train_seed")},
                     "settings": job["settings"], "reduction": reduction,
                     "auroc": float(roc_auc_score(labels, scores.numpy())), "fit_s": fit_s,
                     "device": str(getattr(model.config, "device", "cpu"))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--category", default="synthetic_object")
    parser.add_argument("--data-seeds", default="0,1,2,3,4")
    parser.add_argument("--train-seeds", default="0,1")
    parser.add_argument("--reductions", default="", help="autoencoders: e.g. max,topk,mean")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="where the synthetic sets are (made when missing)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from flawscope.gallery import cpu_model
    from flawscope.synth import SynthSpec, generate

    data_seeds = [int(s) for s in args.data_seeds.split(",")]
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    root = args.data_root or Path(tempfile.mkdtemp(prefix="flawscope-fast-"))
    for seed in data_seeds:
        if not (root / f"seed{seed}" / args.category).is_dir():
            generate(root / f"seed{seed}", SynthSpec(seed=seed), categories=(args.category,))
    settings = _parse_set(args.settings)
    reductions = [r for r in args.reductions.split(",") if r]
    jobs = [{"model": args.model, "preset": args.preset, "settings": settings,
             "category": args.category, "data_root": str(root), "data_seed": d,
             "train_seed": t, "reductions": reductions, "threads": args.threads}
            for d in data_seeds for t in train_seeds]
    print(f"CPU: {cpu_model()}; {args.workers} worker(s) x {args.threads} thread(s); "
          f"{args.model} {args.preset} {settings}", flush=True)
    rows: list[dict] = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for result in pool.imap_unordered(run_one, jobs):
            for r in result:
                print(f"data {r['data_seed']} train {r['train_seed']} reduction "
                      f"{r['reduction'] or '-'}: AUROC {r['auroc']:.3f} (fit {r['fit_s']:.0f} s)",
                      flush=True)
            rows += result
    for reduction in reductions or [None]:
        aurocs = [r["auroc"] for r in rows if r["reduction"] == reduction]
        print(f"{args.model} {args.preset} {settings} reduction {reduction or '-'}: mean "
              f"{sum(aurocs) / len(aurocs):.3f}, min {min(aurocs):.3f} over {len(aurocs)} runs")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
