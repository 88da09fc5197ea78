"""Fit and test many models on many categories, resumably, one subprocess per step.

Each (model, category) pair runs ``flawscope fit`` then ``flawscope test`` in child
processes: peak memory is then measured per pair, a crash or an out-of-memory kill in one
pair cannot take the others down, and a rerun skips pairs whose ``metrics.json`` exists.
"""

from __future__ import annotations

import csv
import ctypes
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import results
from .data import find_categories
from .errors import FlawscopeError
from .geometry import Geometry
from .models import get_model_class
from .models.base import coerce_overrides

log = logging.getLogger(__name__)

COLUMNS = ["model", "category", "image_auroc", "image_ap", "pixel_auroc", "pixel_aupro",
           "f1_max", "fit_s", "infer_img_per_s", "peak_rss_mb", "infer_mpix_per_s", "geometry",
           "status", "error"]


@dataclass
class Pair:
    model: str
    category: Path

    def folder(self, out: Path) -> Path:
        return out / self.model / self.category.name


def plan(data: Path, models: list[str], categories: list[str] | None,
         settings: dict[str, str] | None = None) -> list[Pair]:
    """Validate names and settings up front so a typo fails before hours of fitting."""
    for name in models:
        model_class = get_model_class(name)
        try:
            coerce_overrides(model_class.Config, settings or {})
        except FlawscopeError as exc:
            raise FlawscopeError(f"model {name!r}: {exc}") from None
    folders = find_categories(data, categories)
    return [Pair(m, c) for m in models for c in folders]


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to kill it when its parent dies, so a benchmark
    worker killed mid-pair (a lost cluster node, a kill -9) leaves no orphan fit behind that
    would write into the folder the retried pair is using."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives its parent, as before
        pass


def _run(args: list[str], log_path: Path) -> None:
    with open(log_path, "a") as log_file:
        proc = subprocess.run([sys.executable, "-m", "flawscope", *args],
                              stdout=log_file, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        with open(log_path, "a") as log_file:
            log_file.write(proc.stderr)
        raise RuntimeError(f"flawscope {args[0]} failed: {tail[0]}")


def geometry_args(geometry: Geometry | None) -> list[str]:
    """``flawscope fit`` options for ``geometry``."""
    if geometry is None:
        return []
    args = ["--geometry", geometry.mode]
    if geometry.max_side is not None:
        args += ["--max-side", str(geometry.max_side)]
    return args


def run_pair(pair: Pair, out: Path, preset: str | None, pixel_size: int | None,
             settings: dict[str, str] | None = None, geometry: Geometry | None = None) -> None:
    folder = pair.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "model"
    fit_args = ["fit", "--data", str(pair.category), "--model", pair.model,
                "--out", str(model_dir)]
    if preset is not None and preset in get_model_class(pair.model).presets:
        fit_args += ["--preset", preset]
    for key, value in (settings or {}).items():
        fit_args += ["--set", f"{key}={value}"]
    fit_args += geometry_args(geometry)
    _run(fit_args, folder / "log.txt")
    _run(["test", "--model", str(model_dir), "--data", str(pair.category), "--out", str(folder),
          "--pixel-size", str(pixel_size or "native")], folder / "log.txt")


def row_for(pair: Pair, out: Path) -> dict:
    folder = pair.folder(out)
    row = {c: "" for c in COLUMNS} | {"model": pair.model, "category": pair.category.name}
    row["status"] = results.status(folder)
    if row["status"] == "ok":
        metrics = results.read_metrics(folder)
        for key in COLUMNS[2:11]:
            row[key] = metrics.get(key)
        row["geometry"] = (metrics.get("geometry") or {}).get("mode", "resize")
    elif row["status"] == "failed":
        row["error"] = results.read_error(folder)
    return row


def run_recorded(pair: Pair, out: Path, preset: str | None = None, pixel_size: int | None = None,
                 settings: dict[str, str] | None = None,
                 geometry: Geometry | None = None) -> str:
    """Run one pair and record its outcome in its folder (``metrics.json`` or ``error.txt``);
    a failure is recorded, never raised. Returns a one-line outcome."""
    folder = pair.folder(out)
    results.clear(folder)
    start = time.perf_counter()
    try:
        run_pair(pair, out, preset, pixel_size, settings, geometry)
        return f"done in {time.perf_counter() - start:.0f} s"
    except Exception as exc:  # one failing pair must not stop the others
        log.error("%s on %s failed: %s", pair.model, pair.category.name, exc)
        results.write_error(folder, str(exc))
        return f"FAILED ({exc})"


def _run_locally(pairs: list[Pair], out: Path, say, **pair_options) -> None:
    for i, pair in enumerate(tqdm(pairs, desc="benchmark", disable=None), 1):
        label = f"[{i}/{len(pairs)}] {pair.model} on {pair.category.name}"
        say(f"{label}: fitting and testing")
        say(f"{label}: {run_recorded(pair, out, **pair_options)}")


def run_benchmark(data: str | Path, models: list[str], categories: list[str] | None,
                  out: str | Path, preset: str | None = None, force: bool = False,
                  pixel_size: int | None = None, settings: dict[str, str] | None = None,
                  progress=None, runner=None,
                  geometry: Geometry | None = None) -> list[dict]:
    """Fit and test each pair; ``settings`` (KEY -> VALUE) override every model's preset;
    ``geometry`` (default ``resize``) is how every model sees images.

    ``progress`` (e.g. ``print``) gets one line as each pair starts and ends, for logs and
    redirected output where a progress bar shows nothing. ``runner`` runs the pairs still to
    do (default: one after another here; :class:`flawscope.cluster.RayPairRunner` runs them
    as Ray tasks); it is called as ``runner(pairs, out, say, preset=, pixel_size=,
    settings=)`` and must leave each pair's outcome recorded by :func:`run_recorded`.
    """
    data, out = Path(data), Path(out)
    pairs = plan(data, models, categories, settings)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: None)
    todo = []
    for pair in pairs:
        if results.status(pair.folder(out)) == "ok" and not force:
            log.info("skipping %s on %s: results exist (use --force to redo)",
                     pair.model, pair.category.name)
            say(f"{pair.model} on {pair.category.name}: results exist, skipped")
        else:
            todo.append(pair)
    (runner or _run_locally)(todo, out, say, preset=preset, pixel_size=pixel_size,
                             settings=settings, geometry=geometry)
    rows = [row_for(p, out) for p in pairs]
    write_tables(rows, out)
    write_report(out)
    return rows


def write_report(out: Path) -> None:
    """report.html from the saved results; a report bug must not cost the benchmark's
    results, which stay on disk for `flawscope report` to retry."""
    from .report import build_report

    try:
        log.info("wrote %s", build_report(out))
    except Exception:
        log.exception("could not write %s/report.html", out)


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    cols = COLUMNS[:12] + ["status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS}
                         for r in rows)
    (out / "results.md").write_text(markdown_table(rows))
