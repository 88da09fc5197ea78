"""Static int8 quantization of an exported model, refused unless it keeps the fp32 accuracy.

``flawscope export MODEL_DIR --int8`` (:func:`quantize_model_dir`) turns the checked
``model.onnx`` into ``model.int8.onnx`` with ONNX Runtime's own tooling
(``quant_pre_process``, then ``quantize_static``): QDQ format, weights per output channel,
activations calibrated (min/max) on good training images. Only the backbone's pointwise
convolutions are quantized (:func:`backbone_convs`); the memory-bank distances of PatchCore, the
Mahalanobis products of PaDiM and the smoothing of the anomaly map stay in float32, because
their inputs are the small differences that make a score, where 8 bits lose the ranking.

The int8 graph is then **guarded** (:func:`guard`): good training images that were not used
for calibration (the fit's held-out images first) and synthetic-defect versions of them
(scratch, hole, stain and crack painted by :mod:`flawscope.synth`, seeded) are scored with
the float32 and the int8 graph. The export is refused, the int8 file removed, when

- image AUROC(int8) < AUROC(fp32) - :data:`MAX_AUROC_DROP`,
- the Pearson correlation of the two graphs' scores < :data:`MIN_CORRELATION`, or
- (models with a threshold) the good images' scores move by more than
  :data:`MAX_MARGIN_SHIFT` of the decision margin on average.

Otherwise the figures go to the manifest (``exports.int8``) and the ``int8`` engine
(:mod:`flawscope.engines`) may run the file; ``auto`` never picks it, since its scores are
not those of PyTorch (they are close, not within the 1e-4 of the float32 engines). The
decision threshold stays the float32 one; int8 noise in the features adds distance, so good
images score a little higher (the manifest records the median shift and how many guard
images each graph flags at the threshold).

>>> report = quantize_model_dir("runs/screw")              # doctest: +SKIP
>>> report.auroc_fp32, report.auroc_int8, report.correlation  # doctest: +SKIP
(1.0, 1.0, 0.9993)
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FlawscopeError
from .threshold import decision_margin

#: File name of the int8 graph inside a model directory, beside ``model.onnx``.
INT8_FILE = "model.int8.onnx"
#: Largest accepted loss of image AUROC (held-out good vs synthetic defects): the accuracy
#: int8 must keep on the real test sets to be worth offering. On the guard's set (n good x 4n
#: defects, 4n^2 pairs) it is 20 reordered pairs at n = 32 and 2 at n = 10: it refuses a
#: graph that moves defects below good parts, not one that swaps the odd pair of near-equal
#: scores.
MAX_AUROC_DROP = 0.005
#: Smallest accepted Pearson correlation of int8 with fp32 scores over the guard's images.
#: The decision threshold is the float32 one, so int8 scores must stay on its scale, not
#: only in its order: at r = 0.99 the part of the scores int8 does not reproduce has a
#: standard deviation of sqrt(1 - r^2) = 14% of the scores' spread. Measured on PatchCore
#: (MVTec screw, 256 px): 0.997 with the pointwise convolutions quantized, 0.87 with all of
#: them and 0.14 with full-range weights on an AVX2 CPU (saturation), which it refuses.
MIN_CORRELATION = 0.99
#: Largest accepted mean change of the good images' scores, as a fraction of the decision
#: margin (threshold minus the median good calibration score: how far a typical good part
#: sits below the threshold). AUROC and correlation over good and defective images together
#: do not see a change that is small against the whole range of scores and large against
#: the narrow band where subtle defects and good parts meet: PatchCore on MVTec screw
#: passed both (guard AUROC 0.999 -> 0.997, r 0.997), moved its test/good scores by 0.36 of
#: that margin on average and lost 0.045 image AUROC on the real test set; PaDiM on screw
#: moved them by 0.06 and lost 0.007.
MAX_MARGIN_SHIFT = 0.1
#: Good training images used to calibrate activation ranges (at most).
N_CALIBRATION = 32
#: Good images scored by the guard (at most); each also gets one defect of every kind.
N_GUARD = 32
#: Fewest held-out good images the guard uses alone (fewer are topped up with fitted ones).
MIN_HELD_OUT = 8
DEFECT_KINDS = ("scratch", "hole", "stain", "crack")
#: Side of the box each synthetic defect fits in, as a fraction of the image side (16 px at
#: 256 px). Small on purpose: defects as large as a third of the image (synth's default)
#: score far above every good image with both graphs, so AUROC sits at 1.0 and cannot see
#: int8 losing subtle defects. Measured on PaDiM (MVTec screw, 90 training images): the
#: large defects gave AUROC 0.999 fp32 and int8 (guard passed) while the real test set lost
#: 0.016; 1/16-side defects gave 0.923 -> 0.900 on the held-out images (guard refused).
DEFECT_FRACTION = 1 / 16
#: Fewest good images the guard needs (some to calibrate, some to check).
MIN_IMAGES = 4
#: Batch of the calibration and guard runs.
BATCH = 8


@dataclass
class Int8Report:
    path: Path
    size_bytes: int
    auroc_fp32: float
    auroc_int8: float
    correlation: float
    n_good: int
    n_defect: int
    n_calibration: int
    #: Warm images/s of the fp32 and int8 graphs (onnxruntime), when measured.
    img_per_s: dict[str, float] | None = None
    entry: dict[str, Any] = field(default_factory=dict)


class QuantizationRefused(FlawscopeError):
    """The int8 graph lost too much accuracy; the message gives the figures and bounds."""


# ---------------------------------------------------------------------------- quantizing
def backbone_convs(graph) -> list[str]:
    """Names of the convolutions to quantize in an (ONNX Runtime pre-processed) graph: the
    backbone's pointwise ones, every ``Conv`` with a constant ``(out > 1, in, 1, 1)`` weight.

    Left in float32: the single-channel smoothing of the anomaly map (1-D kernels of shape
    (1, 1, k)), and the spatial convolutions (the stem and the depthwise 3x3 / 5x5), which
    are what int8 breaks in these networks, as known for depthwise-separable networks
    (Sheng et al. 2018, "A quantization-friendly separable convolution for MobileNets").
    Measured on PatchCore (efficientnet_lite0, MVTec screw, 256 px; 32 good + 128
    synthetic-defect images): score correlation with fp32 0.868 with every convolution
    quantized, 0.955 without the stem, 0.997 with the pointwise ones only.
    """
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    names = []
    for node in graph.node:
        shape = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if shape is not None and len(shape) == 4 and shape[0] > 1 and shape[2:] == (1, 1):
            names.append(node.name)
    return names


class _Batches:
    """ONNX Runtime's calibration reader over a tensor of images, in batches."""

    def __init__(self, images: torch.Tensor, batch: int = BATCH):
        self.batches = iter([images[i:i + batch].float().contiguous().numpy()
                             for i in range(0, len(images), batch)])

    def get_next(self):
        x = next(self.batches, None)
        return None if x is None else {"images": x}


def quantize_onnx(src: str | Path, dst: str | Path, calibration: torch.Tensor,
                  reduce_range: bool = True) -> dict[str, Any]:
    """Write a static int8 version of the exported graph ``src`` to ``dst``, calibrated on
    ``calibration`` images (``(N, 3, S, S)`` in [0, 1]); returns what was done (settings and
    the number of quantized convolutions), for the manifest.

    ``reduce_range`` (7-bit weights) is what ONNX Runtime recommends for x86 CPUs without
    VNNI, whose u8 x s8 kernels (VPMADDUBSW) can saturate with full-range weights (measured
    on an AVX2-only AMD EPYC: score correlation with fp32 0.14 with full-range weights on
    every convolution, 0.87 with 7-bit ones). With it neither CPU type saturates, so both
    compute the same integer products and the guard, run on one, holds for the other.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="flawscope-int8-", dir=dst.parent) as scratch:
        pre = Path(scratch) / "pre.onnx"
        # ONNX Runtime's graph optimizations and ONNX shape inference, as its quantization
        # guide asks; its symbolic shape pass (for dynamic shapes of transformer graphs) is
        # skipped: the convolutions' shapes, all the quantizer needs, are static here.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        nodes = backbone_convs(onnx.load(str(pre), load_external_data=False).graph)
        if not nodes:
            raise FlawscopeError(f"{src} has no convolution to quantize (int8 covers the "
                                 "backbones of the feature-based models)")

        class Reader(_Batches, CalibrationDataReader):
            pass

        quantize_static(str(pre), str(dst), Reader(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], nodes_to_quantize=nodes,
                        per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # The calibration graph reduces each activation to its min and
                        # max inside ONNX Runtime: memory does not grow with the images.
                        calibrate_method=CalibrationMethod.MinMax)
    return {"format": "QDQ", "op_types": ["Conv"], "n_quantized": len(nodes),
            "per_channel": True, "reduce_range": reduce_range, "activations": "uint8",
            "weights": "int8", "calibrate_method": "MinMax"}


def _copy_metadata(src: Path, dst: Path) -> None:
    """The fp32 file's metadata (weights' SHA-256, threshold, geometry) onto the int8 file,
    which makes it recognisable as stale on its own, like the fp32 one."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False)
            .metadata_props}
    graph = onnx.load(str(dst))
    del graph.metadata_props[:]
    for key, value in {**meta, "precision": "int8 (static, QDQ; backbone convolutions)"}.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(dst))


# ---------------------------------------------------------------------------- the guard
def with_defects(images: torch.Tensor, seed: int = 0,
                 kinds: tuple[str, ...] = DEFECT_KINDS,
                 fraction: float = DEFECT_FRACTION) -> torch.Tensor:
    """One copy of every image per defect kind, with that defect painted on it
    (:func:`flawscope.synth.add_texture_defect`, the same mask on the three channels, in a
    box of ``fraction`` of the image side, at least 3 px), deterministic for ``seed``:
    ``(N * len(kinds), 3, S, S)``, image-major."""
    from .synth import add_texture_defect

    box = max(3, round(images.shape[-1] * fraction))
    out = []
    for i, image in enumerate(images.double().numpy()):
        for k, kind in enumerate(kinds):
            channels = [add_texture_defect(np.random.default_rng([seed, i, k]), channel,
                                           kind, defect_px=box)[0] for channel in image]
            out.append(np.stack(channels))
    return torch.from_numpy(np.clip(np.stack(out), 0, 1)).float()


def _scores(session, images: torch.Tensor) -> np.ndarray:
    return np.concatenate([session.run(None, {"images": images[i:i + BATCH].numpy()})[0]
                           for i in range(0, len(images), BATCH)]).astype(np.float64)


def guard(fp32_session, int8_session, good: torch.Tensor, defects: torch.Tensor,
          max_auroc_drop: float = MAX_AUROC_DROP, min_correlation: float = MIN_CORRELATION,
          threshold: float | None = None, margin: float | None = None,
          max_margin_shift: float = MAX_MARGIN_SHIFT) -> dict[str, Any]:
    """Score ``good`` and ``defects`` with both graphs; the figures and whether they pass.

    With the decision ``margin`` (threshold minus the median good calibration score), the
    mean absolute change of the good images' scores must stay within ``max_margin_shift``
    of it. Also reported, not bounded: how much int8 moves the good images' scores (median
    relative change; int8 noise in the features adds distance, so it is mostly upward) and,
    with the stored decision ``threshold`` (set on float32 scores), the fraction of images
    decided alike and of good images flagged by each graph.
    """
    from sklearn.metrics import roc_auc_score

    images = torch.cat([good, defects])
    labels = np.r_[np.zeros(len(good)), np.ones(len(defects))]
    s32, s8 = _scores(fp32_session, images), _scores(int8_session, images)
    auroc32, auroc8 = float(roc_auc_score(labels, s32)), float(roc_auc_score(labels, s8))
    correlation = float(np.corrcoef(s32, s8)[0, 1]) if np.ptp(s8) > 0 else 0.0
    n = len(good)
    tiny = np.finfo(np.float64).tiny
    decisions = {}
    if threshold is not None:
        decisions = {"decisions_agree": float(np.mean((s32 > threshold) == (s8 > threshold))),
                     "good_flagged_fp32": int(np.sum(s32[:n] > threshold)),
                     "good_flagged_int8": int(np.sum(s8[:n] > threshold))}
    shift = {}
    if margin is not None and margin > 0:
        shift = {"margin": float(margin),
                 "margin_shift": float(np.mean(np.abs(s8[:n] - s32[:n])) / margin)}
    return {"auroc_fp32": auroc32, "auroc_int8": auroc8, "correlation": correlation,
            "max_abs_score_diff": float(np.max(np.abs(s8 - s32))),
            "good_score_shift": float(np.median((s8[:n] - s32[:n]) /
                                                np.maximum(np.abs(s32[:n]), tiny))),
            **decisions, **shift,
            "n_good": len(good), "n_defect": len(defects),
            "bounds": {"max_auroc_drop": max_auroc_drop, "min_correlation": min_correlation,
                       **({"max_margin_shift": max_margin_shift} if shift else {})},
            "passed": bool(auroc8 >= auroc32 - max_auroc_drop and correlation >= min_correlation
                           and shift.get("margin_shift", 0.0) <= max_margin_shift)}


# ---------------------------------------------------------------------------- images
def _split_images(paths: list, manifest: dict[str, Any], fit_data: bool,
                  seed: int) -> tuple[list, list, int]:
    """(calibration, guard's good images, how many of those the fit never saw).

    On the fit's own data the held-out images of a ``holdout`` calibration (reproduced with
    the fit's seed) come first for the guard: a memory bank scores its own training images
    near zero and PaDiM's covariance fits its own images closely (measured on screw: int8
    moves fitted images' scores by +580%, held-out ones by +4%), so unseen images are the
    realistic good ones, used alone when there are :data:`MIN_HELD_OUT` or more. Calibration
    takes fitted images, up to :data:`N_CALIBRATION` and never more than half of all; the
    guard the rest, up to :data:`N_GUARD`.
    """
    from .pipeline import split_holdout

    info = manifest.get("fit_info") or {}
    n_hold = int(info.get("n_holdout") or 0)
    seen, unseen = list(paths), []
    if (fit_data and n_hold and info.get("calibration", "holdout") == "holdout"
            and len(paths) == n_hold + int(info.get("n_train") or 0)):
        seen, unseen = split_holdout(paths, n_hold / len(paths), seed)
    order = np.random.default_rng(seed).permutation(len(seen))
    seen = [seen[i] for i in order]
    n_cal = min(N_CALIBRATION, len(paths) // 2, len(seen))
    calibration, rest = seen[:n_cal], seen[n_cal:]
    if len(unseen) >= MIN_HELD_OUT:
        return calibration, unseen[:N_GUARD], min(len(unseen), N_GUARD)
    return calibration, (unseen + rest)[:N_GUARD], len(unseen)


def _good_paths(model_dir: Path, manifest: dict[str, Any],
                calibration_data: str | Path | None) -> tuple[list, Path]:
    from .data import list_images, open_category

    if calibration_data is None:
        data = (manifest.get("fit_info") or {}).get("data")
        if not data or not Path(data).is_dir():
            raise FlawscopeError(
                f"the good training images of {model_dir} ({data or 'not recorded'}) are not "
                "available to calibrate int8; pass --calibration-data DIR (a folder of good "
                "images, or a category with train/good)")
        root = Path(data)
    else:
        root = Path(calibration_data)
        if not root.is_dir():
            raise FlawscopeError(f"calibration data folder {root} does not exist")
    if (root / "train" / "good").is_dir():
        return list(open_category(root, train=True, test=False).train), root / "train" / "good"
    if (root / "train").is_dir() or (root / "test").is_dir():
        raise FlawscopeError(f"{root / 'train' / 'good'} is missing: int8 calibration needs "
                             "good images (or pass --calibration-data DIR)")
    return list_images(root), root


# ---------------------------------------------------------------------------- the command
def quantize_model_dir(model_dir: str | Path, calibration_data: str | Path | None = None,
                       max_auroc_drop: float = MAX_AUROC_DROP,
                       min_correlation: float = MIN_CORRELATION,
                       max_margin_shift: float = MAX_MARGIN_SHIFT, measure_s: float = 1.0,
                       threads: int | None = None, seed: int = 0) -> Int8Report:
    """Quantize ``model_dir/model.onnx`` (made by :func:`flawscope.export.export_model_dir`
    from the weights now in the directory) to ``model.int8.onnx``, guard it and record the
    result in the manifest's ``exports.int8``; raise :class:`QuantizationRefused` (the file
    removed) when the guard fails.

    ``calibration_data``: good images (a category with ``train/good`` or a plain folder);
    default the category the model was fitted on. ``measure_s`` > 0 times both graphs.
    """
    import onnxruntime

    from .data import ImageDataset
    from .engines import onnx_export_status
    from .enginespeed import engine_speeds
    from .export import SPEED_BATCH, onnx_session
    from .gallery import cpu_model
    from .modelfile import read_manifest, update_manifest

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    src, why = onnx_export_status(model_dir, manifest)
    if src is None:
        raise FlawscopeError(f"cannot quantize: {why}; run `flawscope export {model_dir}` "
                             "first")
    size = int(manifest["image_size"])
    paths, folder = _good_paths(model_dir, manifest, calibration_data)
    if len(paths) < MIN_IMAGES:
        raise FlawscopeError(f"{folder} holds {len(paths)} good image(s); int8 calibration "
                             f"and its check need at least {MIN_IMAGES}")
    fit_seed = int((manifest.get("config") or {}).get("seed", 0))
    calibration, good, n_unseen = _split_images(paths, manifest, calibration_data is None,
                                                fit_seed)

    def load(items):
        data = ImageDataset(items, size)
        return torch.stack([data[i] for i in range(len(data))])

    dst = model_dir / INT8_FILE
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    threads = threads or torch.get_num_threads()
    try:
        settings = quantize_onnx(src, tmp, load(calibration))
        _copy_metadata(src, tmp)
        fp32, int8 = onnx_session(src, threads), onnx_session(tmp, threads)
        good_images = load(good)
        threshold = manifest.get("threshold") or {}
        result = guard(fp32, int8, good_images, with_defects(good_images, seed),
                       max_auroc_drop, min_correlation, threshold.get("value"),
                       decision_margin(threshold), max_margin_shift)
        if not result["passed"]:
            shift = ""
            if "margin_shift" in result:
                shift = (f"; good images' scores moved by {result['margin_shift']:.3f} of the "
                         f"decision margin on average (bound: at most {max_margin_shift})")
            raise QuantizationRefused(
                f"int8 quantization of {model_dir} refused, {INT8_FILE} not written: on "
                f"{result['n_good']} good and {result['n_defect']} synthetic-defect images "
                f"image AUROC is {result['auroc_int8']:.4f} int8 vs {result['auroc_fp32']:.4f} "
                f"fp32 (bound: a drop of at most {max_auroc_drop}), the score correlation "
                f"is {result['correlation']:.4f} (bound: at least {min_correlation}){shift}")
        del fp32, int8
        speeds = None
        if measure_s > 0:
            speeds = engine_speeds([("onnxruntime", src), ("int8", tmp)], size, threads,
                                   SPEED_BATCH, measure_s)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    entry: dict[str, Any] = {
        "file": dst.name,
        "source": src.name,
        "weights_sha256": manifest.get("weights_sha256"),
        **{k: v for k, v in result.items() if k != "passed"},
        "guard_ok": True,
        "n_good_held_out": n_unseen,
        "defect_kinds": list(DEFECT_KINDS),
        "defect_box_px": max(3, round(size * DEFECT_FRACTION)),
        "n_calibration": len(calibration),
        "calibration_data": str(folder),
        "quantization": settings,
        "onnxruntime_version": onnxruntime.__version__,
        "quantized_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if speeds:
        entry["img_per_s"] = speeds
        entry["speed"] = {"batch": SPEED_BATCH, "threads": threads, "cpu": cpu_model()}
    exports = dict(read_manifest(model_dir).get("exports") or {})
    exports["int8"] = entry
    update_manifest(model_dir, exports=exports)
    return Int8Report(dst, dst.stat().st_size, result["auroc_fp32"], result["auroc_int8"],
                      result["correlation"], result["n_good"], result["n_defect"],
                      len(calibration), speeds, entry)
