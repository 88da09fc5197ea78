"""The files ``flawscope predict`` reads and writes.

Inputs are files and folders. Each image gets an output name that mirrors its path below the
folder it was found through, that folder's own name included (``test/crack/000.png`` given as
``test/crack`` is ``crack/000``), so two folders holding ``000.png`` never overwrite each
other; a name already taken gets ``~2``, ``~3``... Outputs::

    OUT/predictions.jsonl          one JSON record per input, flushed as it is written
    OUT/heatmaps/<name>.png        heat-map overlay (optional)
    OUT/maps/<name>.npy | .tiff    raw float32 anomaly map at the image's size (optional)
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .data import IMAGE_SUFFIXES, list_images
from .errors import DataError


def collect_inputs(inputs: tuple[Path, ...] | list[Path],
                   recursive: bool = False) -> list[tuple[Path, str]]:
    """``(path, output name)`` for every image to score, in order; a file given by name is
    kept even if it is not an image (its record then carries the error)."""
    found: list[tuple[Path, str]] = []
    taken: set[str] = set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            base = item.resolve().parent
            files = list_images(item, recursive=recursive, strict=False)
            names = [PurePosixPath(*p.resolve().relative_to(base).parts).with_suffix("")
                     for p in files]
        elif item.exists() or item.suffix.lower() in IMAGE_SUFFIXES:
            files, names = [item], [PurePosixPath(item.stem)]
        else:
            raise DataError(f"{item}: no such file or folder")
        for path, name in zip(files, names, strict=True):
            found.append((path, _unique(str(name), taken)))
    return found


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}~{n}"
    taken.add(candidate)
    return candidate


class PredictionWriter:
    """Writes each :class:`~flawscope.detector.Prediction` as it comes (see the module
    docstring); use as a context manager."""

    def __init__(self, out: Path, heatmaps: bool = True, annotate: bool = False,
                 maps: str | None = None):
        self.out = Path(out)
        self.heatmaps, self.annotate, self.maps = heatmaps, annotate, maps

    def __enter__(self) -> PredictionWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out / "predictions.jsonl", "w")
        return self

    def __exit__(self, *exc) -> None:
        self._jsonl.close()

    def write(self, prediction, name: str) -> dict:
        record = prediction.record()
        record["heatmap"] = record["map"] = None
        if prediction.ok:
            if self.heatmaps:
                target = self._target("heatmaps", name, ".png")
                prediction.overlay(annotate=self.annotate).save(target)
                record["heatmap"] = str(target)
            if self.maps:
                target = self._target("maps", name, "." + self.maps)
                amap = prediction.anomaly_map.astype(np.float32)
                if self.maps == "npy":
                    np.save(target, amap)
                else:
                    Image.fromarray(amap).save(target)  # mode F: 32-bit float TIFF
                record["map"] = str(target)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        return record

    def _target(self, kind: str, name: str, suffix: str) -> Path:
        target = self.out / kind / (name + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
