"""The Python API: fit, save, load, predict and evaluate with one object.

Example::

    from flawscope import Detector

    det = Detector.fit("data/synthetic_object", model="patchcore", preset="fast")
    det.save("models/object")

    det = Detector.load("models/object")
    p = det.predict("part.png")            # a path, a PIL image or a numpy array
    print(p.score, p.is_anomalous, p.anomaly_map.shape)   # map at the image's own size
    p.overlay(annotate=True).save("part_heatmap.png")

    for p in det.predict_many(["a.png", "b.png"]):        # streams; bad files give p.error
        print(p.source, p.error or p.is_anomalous)

    result = det.evaluate("data/synthetic_object")        # a category with test/
    print(result.metrics["image_auroc"], result.metrics["false_alarm_rate"])

``flawscope predict``, ``flawscope test`` and ``flawscope serve`` are thin layers over this
class, so a decision is made by one code path wherever it is asked for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import visualize
from .data import DEFAULT_MAX_PIXELS, MIN_SIDE, as_image
from .errors import FlawscopeError, ModelFileError
from .geometry import Geometry, check_grid, score_images
from .modelfile import load_model, save_model
from .models import AnomalyModel
from .models.base import resize_maps
from .pipeline import (
    DEFAULT_HOLDOUT,
    DEFAULT_PIXEL_SIZE,
    Engine,
    Evaluation,
    evaluate,
    fit_model,
)
from .regions import find_regions
from .threshold import DEFAULT_MAX_FALSE_ALARM, Decision, decision_for

log = logging.getLogger(__name__)

#: Verdict words used in printed lines and annotated heat maps.
VERDICTS = {True: "ANOMALOUS", False: "ok", None: "undecided"}


@dataclass
class Prediction:
    """The outcome for one image.

    ``score`` is the raw anomaly score (higher is more anomalous), ``normalized_score`` its
    logistic mapping (0.5 at the threshold, 0.1 for a typical good part; see
    :mod:`flawscope.threshold`), ``is_anomalous`` the decision (None without a threshold),
    ``anomaly_map`` a float32 ``(height, width)`` map at the image's own size. When the image
    could not be read, ``error`` says why and the other fields are None.
    """

    source: str
    score: float | None = None
    normalized_score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    #: Connected defect regions where the map exceeds the pixel threshold set from good
    #: images (:func:`flawscope.regions.find_regions`), in image pixels; None when the model
    #: has no pixel threshold, an empty list for a clean part.
    regions: list[dict] | None = None
    image: Image.Image | None = field(default=None, repr=False)
    colour_range: tuple[float, float] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def verdict(self) -> str:
        return "error" if self.error else VERDICTS[self.is_anomalous]

    def overlay(self, annotate: bool = False) -> Image.Image:
        """The image with the heat map blended on top (one colour scale for the model, from
        its good calibration images); with ``annotate`` also the colour scale, the score and
        the decision written below it."""
        if not self.ok or self.image is None or self.anomaly_map is None:
            raise FlawscopeError(f"{self.source}: no heat map ({self.error or 'no image kept'})")
        picture = visualize.heatmap_overlay(self.image, self.anomaly_map, self.colour_range)
        if annotate:
            normalized = ("-" if self.normalized_score is None
                          else f"{self.normalized_score:.3f}")
            picture = visualize.annotate(picture, self.colour_range,
                                         f"score {self.score:.4g}  normalized "
                                         f"{normalized}  {self.verdict}")
        return picture

    def record(self) -> dict[str, Any]:
        """The JSON record of ``flawscope predict`` and the service (no map, no image)."""
        return {"path": self.source, "score": self.score,
                "normalized_score": self.normalized_score, "is_anomalous": self.is_anomalous,
                "threshold": self.threshold, "width": self.width, "height": self.height,
                "regions": self.regions, "error": self.error}


class Detector:
    """A fitted model with its decision threshold: the object to fit, save, load and use.

    Build one with :meth:`fit` or :meth:`load`; see the module docstring for an example.
    ``engine`` runs the model's scoring graph (default: the model's own PyTorch code); the
    resizing of images and maps around it is the same for every engine.
    """

    def __init__(self, model: AnomalyModel, manifest: dict[str, Any] | None = None,
                 directory: str | Path | None = None, engine: Engine | None = None):
        self.model = model
        self.manifest = dict(manifest or {})
        self.directory = Path(directory) if directory is not None else None
        self.engine = engine
        self.warmup_s: float | None = None
        self.decision: Decision = decision_for(self.manifest)
        #: How images become model inputs (:mod:`flawscope.geometry`); ``resize`` when the
        #: manifest records none.
        try:
            self.geometry = Geometry.from_manifest(self.manifest).resolved(model.image_size)
        except FlawscopeError as exc:
            where = self.directory if self.directory is not None else "model"
            raise ModelFileError(f"{where}: {exc}") from None
        #: Size rule for every image predicted (see :func:`flawscope.data.check_dimensions`).
        self.max_pixels, self.min_side = DEFAULT_MAX_PIXELS, MIN_SIDE

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, data, model: str = "patchcore", preset: str | None = None, *,
            out: str | Path | None = None, holdout: float = DEFAULT_HOLDOUT,
            max_false_alarm: float = DEFAULT_MAX_FALSE_ALARM, calibration: str = "auto",
            geometry: Geometry | str | None = None, **settings: Any) -> Detector:
        """Learn normal from good images and set the threshold from good images only.

        ``data``: an MVTec-layout category folder (its ``train/good``), a plain folder of good
        images, or a list of images (paths, PIL images or arrays). ``settings`` override the
        model's Config fields (see ``flawscope models``). With ``out`` the model is also saved
        there (and training checkpoints let an interrupted fit resume). ``calibration``:
        how the good images' calibration scores are made, ``auto`` (the default: what the
        model does best), ``holdout``, ``loo`` or ``kfold`` (see
        :mod:`flawscope.calibration`).
        ``geometry``: how images become model inputs, a :class:`~flawscope.geometry.Geometry`
        or a mode name (``"resize"``, the default; ``"keep_aspect"``; ``"tile"`` at native
        resolution).
        """
        if isinstance(geometry, str):
            geometry = Geometry(geometry)
        result = fit_model(data, model, out, preset, settings, holdout, max_false_alarm,
                           calibration, geometry=geometry)
        manifest = result.manifest_fields | {"model": result.model.name}
        return cls(result.model, manifest, out)

    @classmethod
    def load(cls, directory: str | Path, engine: str = "auto", *, threads: int | None = None,
             streams: int = 1) -> Detector:
        """A model directory written by :meth:`save` or ``flawscope fit``.

        ``engine`` runs the scoring graph: ``torch`` (eager), ``onnxruntime`` or ``openvino``
        (the file ``flawscope export`` wrote and checked), or ``auto``: the fastest engine the
        export measured whose parity check passed, else torch (see
        :mod:`flawscope.engines`); ``int8`` (opt-in, never ``auto``) runs the quantized graph
        ``flawscope export --int8`` wrote and checked (:mod:`flawscope.quantize`). The
        engine scores one blank image here, so one-time set-up (building a backbone,
        allocating buffers) is not paid by the first real image; ``warmup_s`` says how long
        that took. ``threads`` (default: PyTorch's setting) and ``streams`` (callers that
        will predict at once, as the service's scoring threads) go to
        :func:`flawscope.engines.open_engine`.
        """
        from .engines import open_engine

        model, manifest = load_model(directory)
        start = time.perf_counter()
        scorer = open_engine(model, Path(directory), engine, threads, streams=streams)
        detector = cls(model, manifest, directory, scorer)
        detector.warmup_s = time.perf_counter() - start
        return detector

    def save(self, directory: str | Path) -> Path:
        """Write the model and its threshold to ``directory`` (atomically)."""
        fields = {k: self.manifest[k] for k in ("fit_info", "calibration", "threshold",
                                                "geometry") if k in self.manifest}
        path = save_model(self.model, directory, extra=fields)
        self.directory = Path(directory)
        return path

    # ------------------------------------------------------------------ facts
    @property
    def name(self) -> str:
        return self.model.name

    @property
    def threshold(self) -> float | None:
        return self.decision.value

    @property
    def engine_name(self) -> str:
        return getattr(self.engine, "name", "torch")

    def __repr__(self) -> str:
        return (f"Detector(model={self.name!r}, engine={self.engine_name!r}, "
                f"threshold={self.threshold}, "
                f"directory={str(self.directory) if self.directory else None!r})")

    # ------------------------------------------------------------------ prediction
    def predict(self, image) -> Prediction:
        """Score one image (path, PIL image or array); a bad image raises a clear error."""
        [prediction] = self.predict_many([image], batch_size=1, on_error="raise")
        return prediction

    def predict_many(self, images: Iterable, batch_size: int = 8, on_error: str = "skip",
                     keep_images: bool = True) -> Iterator[Prediction]:
        """Score images lazily, in batches, yielding one :class:`Prediction` per input in
        input order.

        ``on_error``: ``"skip"`` yields a Prediction with ``error`` set for an unreadable
        image and goes on; ``"raise"`` stops with the error. ``keep_images=False`` drops the
        decoded image from each Prediction (no ``overlay()``), to save memory on long runs.
        """
        if on_error not in ("skip", "raise"):
            raise FlawscopeError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        pending: list[tuple[str, Image.Image | None, str | None]] = []
        for item in images:
            source = _describe(item)
            try:
                image = as_image(item, self.max_pixels, self.min_side)
                check_grid(self.model, self.geometry, image.width, image.height, source)
                pending.append((source, image, None))
            except FlawscopeError as exc:
                if on_error == "raise":
                    yield from self._score_pending(pending, keep_images)  # the inputs before it
                    raise
                pending.append((source, None, str(exc)))
            if sum(1 for _, im, _ in pending if im is not None) == batch_size:
                yield from self._score_pending(pending, keep_images)
                pending = []
        if pending:
            yield from self._score_pending(pending, keep_images)

    @torch.no_grad()
    def _score_pending(self, pending: list, keep_images: bool) -> Iterator[Prediction]:
        decoded = [im for _, im, _ in pending if im is not None]
        results: list[tuple[float, np.ndarray]] = []
        scored_images = score_images(self.model, decoded, self.geometry, self.engine)
        for im, (score, amap) in zip(decoded, scored_images, strict=True):
            full = resize_maps(amap[None], (im.height, im.width))[0].numpy()
            results.append((score, full))
        calibration = self.manifest.get("calibration")
        scored = iter(results)
        for source, im, error in pending:
            if im is None:
                yield Prediction(source, error=error)
                continue
            score, amap = next(scored)
            yield Prediction(source, **self.decision(score), anomaly_map=amap, width=im.width,
                             height=im.height, regions=self._regions(amap),
                             image=im if keep_images else None,
                             colour_range=visualize.display_range(amap, calibration))

    def _regions(self, amap: np.ndarray) -> list[dict] | None:
        """Defect regions of a map at the image's size, from the pixel threshold the good
        calibration images set (None for models calibrated before it existed)."""
        pixel = (self.manifest.get("threshold") or {}).get("pixel_value")
        if pixel is None:
            return None
        baseline = (self.manifest.get("calibration") or {}).get("map_p50")
        return find_regions(amap, float(pixel), baseline=baseline)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data: str | Path, pixel_size: int | None = DEFAULT_PIXEL_SIZE,
                 batch_size: int = 16, out: str | Path | None = None) -> Evaluation:
        """Score a category's test images; ``.metrics`` holds everything ``flawscope test``
        writes (metrics, the stored threshold's false-alarm and detection rates, timings).
        With ``out``, the results folder is written as ``flawscope test`` writes it."""
        evaluation = evaluate(self.model, data, pixel_size, batch_size, self.manifest,
                              self.engine, self.geometry)
        evaluation.metrics["model_dir"] = str(self.directory) if self.directory else None
        evaluation.metrics["engine"] = self.engine_name
        # The one-time cost of the first image, apart from the warm images/s above.
        evaluation.metrics["cold_start_s"] = self.warmup_s
        if out is not None:
            from . import results
            from .gallery import save_report_assets

            # Pictures for `flawscope report`, drawn now because they need the model.
            save_report_assets(self.model, self.manifest, evaluation, out, self.directory)
            results.write(out, evaluation.metrics, evaluation.paths, evaluation.defect_types,
                          evaluation.labels, evaluation.scores)
        return evaluation


def _describe(item) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"<array {'x'.join(map(str, item.shape))}>"
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or f"<image {item.width}x{item.height}>"
    return f"<{type(item).__name__}>"
