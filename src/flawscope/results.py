"""The results folder of one tested (model, category) pair: the one module that writes and
reads it.

``flawscope test`` (and :meth:`flawscope.Detector.evaluate` with ``out=``) writes, and
``flawscope benchmark`` and ``flawscope report`` read::

    metrics.json     every figure of the evaluation (see the README's table); written last
                     and atomically, so its presence means "this pair is done"
    scores.csv       path, defect_type, label, score of every test image
    error.txt        instead of metrics.json when the pair failed: the one-line reason
    report_assets/   pictures for the report (written by :mod:`flawscope.gallery`)

Example::

    from flawscope import results
    metrics = results.read_metrics("bench/patchcore/screw")   # None if not done
    labels, scores, defect_types = results.read_scores("bench/patchcore/screw")
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = "metrics.json"
SCORES = "scores.csv"
ERROR = "error.txt"


def write(folder: str | Path, metrics: dict[str, Any], paths: Sequence[Path | str],
          defect_types: Sequence[str], labels: Sequence[int], scores: Sequence[float]) -> Path:
    """Write ``scores.csv`` then ``metrics.json`` (atomically, last) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR).unlink(missing_ok=True)
    with open(folder / SCORES, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type", "label", "score"])
        for path, kind, label, score in zip(paths, defect_types, labels, scores, strict=True):
            writer.writerow([str(path), kind, int(label), f"{float(score):.9g}"])
    _write_atomic(folder / METRICS, json.dumps(metrics, indent=2))
    return folder / METRICS


def write_error(folder: str | Path, message: str) -> None:
    """Record a failed pair (its metrics, if any, are removed: a failure is never 'done')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METRICS).unlink(missing_ok=True)
    _write_atomic(folder / ERROR, message.strip() + "\n")


def clear(folder: str | Path) -> None:
    """Forget a pair's outcome before it is run again."""
    for name in (METRICS, ERROR):
        (Path(folder) / name).unlink(missing_ok=True)


def status(folder: str | Path) -> str:
    """``ok`` (metrics.json exists), ``failed`` (error.txt) or ``missing``."""
    folder = Path(folder)
    if (folder / METRICS).is_file():
        return "ok"
    return "failed" if (folder / ERROR).is_file() else "missing"


def read_metrics(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / METRICS
    return json.loads(path.read_text()) if path.is_file() else None


def read_error(folder: str | Path) -> str:
    path = Path(folder) / ERROR
    return path.read_text().strip() if path.is_file() else ""


def read_scores(folder: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(labels, scores, defect_types)`` from ``scores.csv`` (empty arrays if absent)."""
    path = Path(folder) / SCORES
    labels, scores, kinds = [], [], []
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                labels.append(int(row["label"]))
                scores.append(float(row["score"]))
                kinds.append(row["defect_type"])
    return np.array(labels, dtype=int), np.array(scores, dtype=np.float64), kinds


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def decision_summary(metrics: dict[str, Any]) -> str:
    """One sentence on what the stored threshold does on the test set: the figures a line
    acts on (shown by ``flawscope test`` and the report)."""
    if metrics.get("threshold") is None:
        return "no decision threshold stored: every image is undecided"

    def pct(value):
        return "-" if value is None else f"{value:.1%}"

    target = metrics.get("threshold_max_false_alarm")
    basis = f"{metrics.get('threshold_method')}, from {metrics.get('threshold_n_good')} good images"
    if target is not None:
        basis += f", target false-alarm rate {target:.1%}"
    line = (f"at the stored threshold {metrics['threshold']:.6g} ({basis}): detection rate "
            f"{pct(metrics.get('detection_rate'))}, false-alarm rate "
            f"{pct(metrics.get('false_alarm_rate'))}")
    interval = metrics.get("false_alarm_ci")
    if interval and metrics.get("false_alarms") is not None:
        line += (f" ({metrics['false_alarms']} of {metrics['n_good']} good images; 95% "
                 f"interval {pct(interval[0])}-{pct(interval[1])})")
    return line
