"""``report.html``: a benchmark's results as one file a quality engineer can open and forward.

Built only from what ``flawscope benchmark`` / ``flawscope test`` saved in the results folder
(``<model>/<category>/metrics.json``, ``scores.csv``, ``report_assets/``, ``error.txt``), so
``flawscope report DIR`` never loads or re-runs a model. Every picture is embedded as a
``data:`` URI and a Content-Security-Policy forbids anything else, so the page is one
self-contained file: it works offline, from an e-mail attachment, and can never fetch from
the network.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from . import __version__, plots, results
from .errors import FlawscopeError
from .gallery import ASSETS_DIR

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

#: Summary rows: (metrics.json key, label, higher is better, format). The first
#: :data:`MEAN_ROWS` are also averaged over categories.
SUMMARY_METRICS = [
    ("image_auroc", "image AUROC", True, "{:.3f}"),
    ("image_ap", "image AP", True, "{:.3f}"),
    ("pixel_auroc", "pixel AUROC", True, "{:.3f}"),
    ("pixel_aupro", "AU-PRO", True, "{:.3f}"),
    ("f1_max", "F1-max", True, "{:.3f}"),
    ("detection_rate", "detection rate at the stored threshold", True, "{:.1%}"),
    ("false_alarm_rate", "false-alarm rate at the stored threshold", False, "{:.1%}"),
    ("threshold_n_good", "good images the threshold rests on", True, "{:.0f}"),
    ("fit_s", "fit time (s)", False, "{:.1f}"),
    ("infer_img_per_s", "images/s", True, "{:.1f}"),
    ("peak_rss_mb", "peak memory (MiB)", False, "{:.0f}"),
]

MEAN_ROWS = 7

GALLERY_SECTIONS = [
    ("false_alarms", "Most anomalous good images (false-alarm candidates)"),
    ("misses", "Least anomalous defective images (misses)"),
    ("examples", "One typical example per defect type (median score of its type)"),
]


@dataclass
class PairResult:
    """What was saved for one (model, category) pair."""

    model: str
    category: str
    folder: Path
    status: str  # ok | failed | missing
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    defect_types: list[str] = field(default_factory=list)
    assets: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def load_pair(out: Path, model: str, category: str) -> PairResult:
    """One pair's saved results; a folder with unreadable files counts as failed."""
    folder = out / model / category
    pair = PairResult(model, category, folder, results.status(folder))
    try:
        if pair.ok:
            pair.metrics = results.read_metrics(folder)
            pair.labels, pair.scores, pair.defect_types = results.read_scores(folder)
            if (folder / ASSETS_DIR / "assets.json").is_file():
                pair.assets = json.loads((folder / ASSETS_DIR / "assets.json").read_text())
        elif pair.status == "failed":
            pair.error = results.read_error(folder)
    except (OSError, ValueError, KeyError) as exc:
        pair.status, pair.error = "failed", f"saved results unreadable: {exc}"
    return pair


def discover(out: Path) -> list[tuple[str, str]]:
    """(model, category) pairs in benchmark order: results.csv first, then any other
    ``<model>/<category>/`` folder holding results or an error."""
    found: list[tuple[str, str]] = []
    if (out / "results.csv").is_file():
        with open(out / "results.csv", newline="") as f:
            found = [(r["model"], r["category"]) for r in csv.DictReader(f)]
    for model_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        for cat_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            key = (model_dir.name, cat_dir.name)
            if key not in found and results.status(cat_dir) != "missing":
                found.append(key)
    return found


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _file_uri(path: Path) -> str | None:
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    try:
        return _data_uri(path.read_bytes(), mime)
    except OSError:
        log.warning("report: picture %s missing", path)
        return None


def _row(label: str, values: list[float | None], higher: bool, fmt: str) -> dict:
    """One table row: formatted cells, the best value(s) marked when two or more compare."""
    numbers = [v for v in values if v is not None]
    best = (max(numbers) if higher else min(numbers)) if len(numbers) >= 2 else None
    cells = [{"text": "–" if v is None else fmt.format(v),
              "best": best is not None and v is not None and math.isclose(v, best,
                                                                          rel_tol=1e-9)}
             for v in values]
    return {"label": label, "cells": cells, "higher": higher}


def summary_table(pairs: dict[tuple[str, str], PairResult], models: list[str],
                  categories: list[str]) -> list[dict]:
    """Row groups (one per category, plus the mean when there are several categories)."""
    groups = []
    for category in categories:
        status = [pairs[(m, category)].status if (m, category) in pairs else "missing"
                  for m in models]
        rows = []
        for key, label, higher, fmt in SUMMARY_METRICS:
            values = [_number(pairs[(m, category)].metrics.get(key))
                      if status[i] == "ok" else None for i, m in enumerate(models)]
            rows.append(_row(label, values, higher, fmt))
        groups.append({"name": category, "anchor": f"cat-{category}", "status": status,
                       "errors": [pairs[(m, category)].error if (m, category) in pairs else ""
                                  for m in models], "rows": rows})
    # Means only over categories every model finished: a mean over fewer categories would
    # flatter (or punish) a model that failed on some.
    common = [c for c in categories
              if all((m, c) in pairs and pairs[(m, c)].ok for m in models)]
    if len(categories) > 1 and common:
        rows = []
        for key, label, higher, fmt in SUMMARY_METRICS[:MEAN_ROWS]:
            values = []
            for m in models:
                per_cat = [_number(pairs[(m, c)].metrics.get(key)) for c in common]
                values.append(None if any(v is None for v in per_cat) else float(np.mean(per_cat)))
            rows.append(_row(label, values, higher, fmt))
        name = (f"mean over {len(common)} categories" if len(common) == len(categories) else
                f"mean over the {len(common)} categories every model finished "
                f"({', '.join(common)})")
        groups.append({"name": name, "anchor": None, "status": ["ok"] * len(models),
                       "errors": [""] * len(models), "rows": rows})
    return groups


def _gallery(pair: PairResult) -> dict | None:
    if not pair.assets:
        return None
    folder = pair.folder / ASSETS_DIR
    sections = []
    for key, title in GALLERY_SECTIONS:
        entries = []
        for entry in pair.assets.get("gallery", {}).get(key, []):
            entries.append(entry | {"image_uri": _file_uri(folder / entry["image"]),
                                    "overlay_uri": _file_uri(folder / entry["overlay"])})
        sections.append({"title": title, "entries": entries})
    recon = pair.assets.get("reconstructions")
    if recon:
        recon = recon | {"rows": [row | {k + "_uri": _file_uri(folder / row[k])
                                         for k in ("original", "reconstruction", "residual")}
                                  for row in recon["rows"]]}
    samples = pair.assets.get("samples")
    if samples:
        samples = samples | {"uri": _file_uri(folder / samples["image"])}
    training = [t | {"uri": _file_uri(folder / t["image"])}
                for t in pair.assets.get("training") or []]
    return {"sections": sections, "reconstructions": recon, "samples": samples,
            "training": training, "colour_scale": pair.assets.get("colour_scale"),
            "problems": pair.assets.get("problems") or []}


def category_section(category: str, models: list[str],
                     pairs: dict[tuple[str, str], PairResult]) -> dict:
    """Curves, histograms, per-defect comparison and galleries of one category."""
    present = [pairs[(m, category)] for m in models if (m, category) in pairs]
    ok = [p for p in present if p.ok and p.labels.size]
    colour_of = {m: i for i, m in enumerate(models)}
    section: dict[str, Any] = {"name": category, "anchor": f"cat-{category}",
                               "failed": [p for p in present if not p.ok], "models": []}
    if ok:
        # Curves keep each model's colour even when an earlier model failed here.
        ordered = sorted(ok, key=lambda p: colour_of[p.model])
        padded = []
        for m in models:
            match = [p for p in ordered if p.model == m]
            padded.append(match[0] if match else None)
        roc = [(p.model, p.labels, p.scores, _number(p.metrics.get("image_auroc")))
               if p else ("", np.zeros(0), np.zeros(0), None) for p in padded]
        pr = [(p.model, p.labels, p.scores, _number(p.metrics.get("image_ap")))
              if p else ("", np.zeros(0), np.zeros(0), None) for p in padded]
        section["roc_uri"] = _data_uri(plots.roc_plot(roc, f"ROC: {category}"))
        section["pr_uri"] = _data_uri(plots.pr_plot(pr, f"Precision-recall: {category}"))
    defect_types = sorted({t for p in ok for t in (p.metrics.get("per_defect") or {})})
    per_defect = {p.model: p.metrics.get("per_defect") or {} for p in ok}
    ok_models = [p.model for p in ok]
    section["defect_rows"] = [
        _row(t, [_number(per_defect[m].get(t)) for m in ok_models], True, "{:.3f}")
        for t in defect_types]
    section["defect_models"] = ok_models
    if defect_types and ok_models:
        section["defect_uri"] = _data_uri(plots.defect_bars(
            defect_types, ok_models, per_defect, f"Image AUROC per defect type: {category}"))
    for p in ok:
        section["models"].append({
            "name": p.model, "metrics": p.metrics,
            "histogram_uri": _data_uri(plots.score_histogram(
                p.labels, p.scores, _number(p.metrics.get("f1_threshold")),
                f"{p.model}: scores on {category}", colour_of[p.model],
                _number(p.metrics.get("threshold")))),
            "gallery": _gallery(p),
            "decision": results.decision_summary(p.metrics),
        })
    return section


def settings(pairs: list[PairResult], data_roots: list[str]) -> dict:
    """How the results were made: per model its preset and config, and the machine."""
    per_model: dict[str, dict] = {}
    machine: dict[str, Any] = {}
    for p in pairs:
        if not p.ok:
            continue
        config = (p.assets or {}).get("config")
        if config is None and (p.folder / "model" / "manifest.json").is_file():
            try:
                config = json.loads((p.folder / "model" / "manifest.json").read_text()
                                    ).get("config")
            except (OSError, ValueError):
                config = None
        entry = per_model.setdefault(p.model, {"preset": p.metrics.get("preset"),
                                               "config": config, "dates": [],
                                               "threads": set(), "pixel_size": set()})
        entry["dates"].append(p.metrics.get("date") or "")
        entry["threads"].add(p.metrics.get("threads"))
        entry["pixel_size"].add(p.metrics.get("pixel_size"))
        if not machine and p.assets and p.assets.get("machine"):
            machine = p.assets["machine"]
    rows = []
    for model, entry in per_model.items():
        config = entry["config"] or {}
        dates = sorted(d for d in entry["dates"] if d)
        rows.append({
            "model": model, "preset": entry["preset"] or "(defaults)",
            "image_size": config.get("image_size", "?"),
            "pixel_size": ", ".join(str(s) for s in sorted(entry["pixel_size"] - {None})),
            "threads": ", ".join(str(t) for t in sorted(entry["threads"] - {None})),
            "tested": f"{dates[0]} – {dates[-1]}" if len(dates) > 1 else (dates or ["?"])[0],
            "config": ", ".join(f"{k}={v}" for k, v in config.items()),
        })
    return {"models": rows, "machine": machine, "data": data_roots}


def build_report(out: str | Path) -> Path:
    """Write ``out/report.html`` from the saved results under ``out`` and return its path."""
    out = Path(out)
    keys = discover(out)
    if not keys:
        raise FlawscopeError(f"{out}: no results found (expected <model>/<category>/"
                             "metrics.json or error.txt, as `flawscope benchmark` writes)")
    pairs = {key: load_pair(out, *key) for key in keys}
    models = _unique(m for m, _ in keys)
    categories = _unique(c for _, c in keys)
    data_roots = _unique(str(Path(p.metrics["dataset"]).parent) for p in pairs.values()
                         if p.ok and p.metrics.get("dataset"))
    env = jinja2.Environment(loader=jinja2.PackageLoader("flawscope", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("report.html").render(
        title=f"flawscope benchmark: {', '.join(models) or 'no results'}",
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        version=__version__,
        out=str(out.resolve()),
        models=models, categories=categories,
        colours={m: plots.hex_colour(i) for i, m in enumerate(models)},
        summary=summary_table(pairs, models, categories),
        failed=[p for p in pairs.values() if not p.ok],
        sections=[category_section(c, models, pairs) for c in categories],
        settings=settings(list(pairs.values()), data_roots),
    )
    target = out / REPORT_NAME
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, target)  # a reader never sees half a report
    return target
