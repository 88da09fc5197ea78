"""The ``flawscope`` command line.

Every verb is a thin layer over :mod:`flawscope.pipeline`; a
:class:`~flawscope.errors.FlawscopeError` becomes a one-line ``Error: ...`` and exit code 1,
never a traceback.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import sys
import time
from pathlib import Path

import click

from . import __version__
from .allocator import keep_freed_memory
from .errors import FlawscopeError

log = logging.getLogger("flawscope")

#: The model the README's main command and ``flawscope demo`` use.
DEFAULT_MODEL = "gaussian"


class _Group(click.Group):
    """Turns user-facing errors into clean messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FlawscopeError as exc:
            raise click.ClickException(str(exc)) from None


def _parse_settings(values: tuple[str, ...]) -> dict[str, str]:
    settings = {}
    for item in values:
        if "=" not in item:
            raise FlawscopeError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        settings[key.strip()] = value.strip()
    return settings


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flawscope")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """flawscope: learn what good parts look like from good images only, then score new
    images and localize defects with a heat map.

    Typical use: `flawscope fit` on a folder in MVTec AD layout, `flawscope test` to measure
    it, `flawscope predict` on new images. `flawscope synth` writes built-in synthetic data.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # every model allocates large tensors over and over


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; same seed, same data.")
@click.option("--size", default=128, show_default=True, help="Image side length in pixels.")
@click.option("--train", "n_train", default=60, show_default=True,
              help="Good training images per category.")
@click.option("--test-good", default=12, show_default=True, help="Good test images per category.")
@click.option("--test-defect", default=6, show_default=True,
              help="Test images per defect type.")
@click.option("--categories", default=None,
              help="Comma-separated subset of synthetic_texture,synthetic_object.")
@click.option("--defect-px", default=0, show_default=True,
              help="0: defects scale with the image; N: every defect fits in an N x N pixel "
                   "box (e.g. --size 1024 --defect-px 8 for defects a few pixels wide).")
@click.option("--workers", default=0, show_default=True,
              help="Processes drawing images (0: one per CPU core); the files are the same.")
def synth(out: Path, seed: int, size: int, n_train: int, test_good: int, test_defect: int,
          categories: str | None, defect_px: int, workers: int) -> None:
    """Write a synthetic MVTec-layout dataset with exact defect masks to OUT.

    Two categories: synthetic_texture (grayscale weave; scratch, hole, stain, crack) and
    synthetic_object (RGB part; scratch, missing_piece, stain, crack).
    """
    from .synth import CATEGORIES, SynthSpec, generate

    spec = SynthSpec(size=size, n_train=n_train, n_test_good=test_good,
                     n_test_per_defect=test_defect, seed=seed, defect_px=defect_px)
    names = tuple(_split(categories) or CATEGORIES)
    for folder in generate(out, spec, names, workers):
        click.echo(f"wrote {folder}")


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Category folder in MVTec AD layout (needs train/good).")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Model name; see `flawscope models`.")
@click.option("--preset", default=None,
              help="Named settings of the model (see `flawscope models`): `fast` trains in "
                   "minutes on 2 CPU cores, `paper` uses the published settings (hours).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one model setting; repeatable.")
@click.option("--holdout", default=0.1, show_default=True,
              help="Fraction of train/good held out to calibrate what normal scores look like.")
@click.option("--max-false-alarm", default=0.01, show_default=True,
              type=click.FloatRange(0, 0.5, min_open=True, max_open=True),
              help="Target fraction of good parts flagged; sets the decision threshold from "
                   "the held-out good images only.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model directory to write (replaced atomically if it exists).")
def fit(data: Path, model_name: str, preset: str | None, settings: tuple[str, ...],
        holdout: float, max_false_alarm: float, out: Path) -> None:
    """Fit a model on the good training images of a category and save it.

    The decision threshold is set from held-out good images for the --max-false-alarm rate;
    change it later with `flawscope threshold`.
    """
    from .pipeline import fit_model

    result = fit_model(data, model_name, out, preset, _parse_settings(settings), holdout,
                       max_false_alarm)
    click.echo(f"fitted {model_name} on {result.n_train} images in {result.fit_s:.1f} s "
               f"({result.n_holdout} held out); saved to {out}")
    click.echo(_threshold_line(result.threshold, warn=False))  # the pipeline logged it


def _threshold_line(record: dict | None, warn: bool = True) -> str:
    record = record or {}
    if record.get("value") is None:
        line = "threshold: none (predictions will be 'undecided')"
    else:
        line = f"threshold: {record['value']:.6g} ({record['method']}"
        if record.get("max_false_alarm") is not None and record["method"].startswith("good"):
            line += f", target false-alarm rate {record['max_false_alarm']:.2%}"
        line += f", from {record.get('n_good')} good images)"
    if warn and record.get("warning"):
        line += f"\nwarning: {record['warning']}"
    return line


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `flawscope fit`.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Category folder with test/ and ground_truth/.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Results folder: metrics.json, scores.csv and report_assets/ (pictures "
                   "for `flawscope report`).")
@click.option("--pixel-size", default=256, show_default=True,
              help="Maps and masks are resized to this square size for pixel metrics.")
@click.option("--batch-size", default=16, show_default=True)
def test(model_dir: Path, data: Path, out: Path, pixel_size: int, batch_size: int) -> None:
    """Score a category's test images and write metrics (image/pixel AUROC, AP, AU-PRO...)."""
    import torch

    from .gallery import save_report_assets
    from .modelfile import load_model
    from .pipeline import evaluate, peak_rss_mb
    from .threshold import rates

    model, manifest = load_model(model_dir)
    evaluation = evaluate(model, data, pixel_size=pixel_size, batch_size=batch_size)
    fit_info = manifest.get("fit_info") or {}
    n = len(evaluation.scores)
    metrics = dict(evaluation.metrics)
    metrics.update({
        "model": model.name,
        "preset": model.preset,
        "model_dir": str(model_dir),
        "dataset": str(data),
        "category": evaluation.category.name,
        "n_images": n,
        "n_defective": int(evaluation.labels.sum()),
        "pixel_size": pixel_size,
        "fit_s": fit_info.get("fit_s"),
        "infer_s": evaluation.infer_s,
        "infer_img_per_s": n / evaluation.infer_s if evaluation.infer_s > 0 else None,
        **rates(manifest.get("threshold"), evaluation.labels, evaluation.scores),
        "peak_rss_mb": max(peak_rss_mb(), float(fit_info.get("peak_rss_mb") or 0)),
        "threads": torch.get_num_threads(),
        "flawscope_version": __version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    out.mkdir(parents=True, exist_ok=True)
    # Pictures for `flawscope report`, drawn now because they need the loaded model.
    save_report_assets(model, manifest, evaluation, out, model_dir)
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type", "label", "score"])
        for path, kind, label, score in zip(evaluation.paths, evaluation.defect_types,
                                            evaluation.labels, evaluation.scores, strict=True):
            writer.writerow([str(path), kind, int(label), f"{score:.9g}"])
    # metrics.json last and atomically: a benchmark treats its presence as "pair done".
    (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.json.tmp").replace(out / "metrics.json")
    click.echo(_metrics_table(metrics))
    click.echo(f"wrote {out / 'metrics.json'}")


def _metrics_table(m: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{m['model']} on {m['category']} ({m['n_images']} test images)",
             f"  image AUROC {f(m['image_auroc'])}   image AP {f(m['image_ap'])}   "
             f"F1-max {f(m['f1_max'])}",
             f"  pixel AUROC {f(m['pixel_auroc'])}   AU-PRO {f(m['pixel_aupro'])}"]
    for kind, auc in m.get("per_defect", {}).items():
        lines.append(f"  {kind:<20} image AUROC {auc:.3f}")
    return "\n".join(lines)


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `flawscope fit`.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for heat-map overlays and predictions.jsonl.")
def predict(model_dir: Path, inputs: tuple[Path, ...], out: Path) -> None:
    """Score new images (files or folders) and write heat-map overlays.

    Prints one line per image and writes OUT/predictions.jsonl and OUT/<name>_heatmap.png.
    Each JSON line has the raw `score`, `normalized_score` (logistic: the threshold is 0.5,
    a typical good part 0.1), `is_anomalous` (score > threshold; null when the model has no
    threshold) and `threshold`.
    """
    from .data import list_images, read_image
    from .modelfile import load_model
    from .threshold import decision_for
    from .visualize import display_range, heatmap_overlay

    model, manifest = load_model(model_dir)
    decide = decision_for(manifest)
    if not decide.has_threshold:
        click.echo("warning: this model has no decision threshold; every image is reported as "
                   "undecided (set one with `flawscope threshold`)", err=True)
    paths: list[Path] = []
    for item in inputs:
        paths.extend(list_images(item) if item.is_dir() else [item])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as jsonl:
        for path in paths:
            image = read_image(path)
            [(score, amap)] = model.score([image])
            overlay = heatmap_overlay(image, amap,
                                      display_range(amap, manifest.get("calibration")))
            heatmap = out / f"{path.stem}_heatmap.png"
            overlay.save(heatmap)
            record = {"path": str(path), **decide(score), "heatmap": str(heatmap)}
            jsonl.write(json.dumps(record) + "\n")
            verdict = {True: "ANOMALOUS", False: "ok", None: "undecided"}[record["is_anomalous"]]
            normalized = record["normalized_score"]
            click.echo(f"{path}\tscore={score:.6g}\tnormalized="
                       f"{'-' if normalized is None else f'{normalized:.3f}'}\t{verdict}")


@cli.command("threshold")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["good", "f1"]), default=None,
              help="good: from the held-out good images for --max-false-alarm; f1: best F1 on "
                   "labelled images in --data. Without --method/--value: show the threshold.")
@click.option("--max-false-alarm", default=0.01, show_default=True,
              type=click.FloatRange(0, 0.5, min_open=True, max_open=True))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="For --method f1: a folder with good/ and <defect>/ sub-folders, or an MVTec "
                   "category (its test/ is used; then do not judge the model on that test set).")
@click.option("--value", type=float, default=None, help="Set this raw-score threshold by hand.")
def threshold_cmd(model_dir: Path, method: str | None, max_false_alarm: float,
                  data: Path | None, value: float | None) -> None:
    """Show or change the decision threshold stored in a model directory."""
    from . import threshold as th
    from .modelfile import load_model, read_manifest, update_manifest

    manifest = read_manifest(model_dir)
    good = (manifest.get("calibration") or {}).get("scores") or []
    if method is None and value is None:
        click.echo(_threshold_line(manifest.get("threshold")))
        return
    if value is not None and method is not None:
        raise FlawscopeError("give either --method or --value, not both")
    if value is not None:
        record = th.manual(value, good)
    elif method == "good":
        record = th.from_good_scores(good, max_false_alarm)
    else:
        if data is None:
            raise FlawscopeError("--method f1 needs --data with labelled images")
        model, _ = load_model(model_dir)
        record = th.from_validation(model, data, good)
    update_manifest(model_dir, threshold=record)
    click.echo(_threshold_line(record))


@cli.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="File to write (default MODEL_DIR/model.onnx).")
def export_cmd(model_dir: Path, fmt: str, out: Path | None) -> None:
    """Export a fitted model's scoring graph (images [B,3,S,S] in [0,1] -> scores, maps).

    The file is checked with onnxruntime against PyTorch before it is written.
    """
    from .export import export_onnx
    from .modelfile import load_model

    model, manifest = load_model(model_dir)
    report = export_onnx(model, out or model_dir / "model.onnx", manifest)
    click.echo(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB); onnxruntime vs "
               f"PyTorch relative error: scores {report.score_rel_err:.1e}, "
               f"maps {report.map_rel_err:.1e}")


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Root folder holding category folders (symlinks are followed).")
@click.option("--models", default=DEFAULT_MODEL, show_default=True,
              help="Comma-separated model names.")
@click.option("--categories", default=None, help="Comma-separated category names (default all).")
@click.option("--preset", default=None, help="Preset for every model that has it.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Results folder: results.csv, results.md, one sub-folder per pair.")
@click.option("--force", is_flag=True, help="Redo pairs whose results already exist.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one setting of every model; repeatable. Results already in OUT "
                   "are kept: use a new --out or --force.")
@click.option("--pixel-size", default=256, show_default=True,
              help="Resolution of pixel metrics.")
def benchmark(data: Path, models: str, categories: str | None, preset: str | None, out: Path,
              force: bool, settings: tuple[str, ...], pixel_size: int) -> None:
    """Fit and test every model on every category; resumable, one failure does not stop it.

    Writes OUT/results.csv, OUT/results.md and OUT/report.html (rebuild the report later with
    `flawscope report OUT`).
    """
    from .benchmark import markdown_table, run_benchmark

    rows = run_benchmark(data, _split(models) or [], _split(categories), out, preset, force,
                         pixel_size, _parse_settings(settings))
    click.echo(markdown_table(rows))
    click.echo(f"report: {out / 'report.html'}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise FlawscopeError(f"{len(failed)} of {len(rows)} pairs failed; see error.txt files "
                             f"under {out}")


@cli.command()
@click.option("--out", default=Path("runs/demo"), show_default=True,
              type=click.Path(path_type=Path), help="Where data and results go.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True)
@click.option("--force", is_flag=True, help="Redo results that already exist.")
def demo(out: Path, model_name: str, force: bool) -> None:
    """The main job on built-in data: generate synthetic data, fit, evaluate, print the table."""
    from .benchmark import markdown_table, run_benchmark
    from .synth import CATEGORIES, generate

    data = out / "data"
    if force or not all((data / c / "train").is_dir() for c in CATEGORIES):
        generate(data)
    rows = run_benchmark(data, [model_name], list(CATEGORIES), out / "results", force=force)
    click.echo(markdown_table(rows))
    click.echo(f"results in {out / 'results'}; open {out / 'results' / 'report.html'}")


@cli.command("serve")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 exposes the service to the network).")
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=2, show_default=True,
              help="Scoring threads (each gets cpu_count/workers PyTorch threads).")
@click.option("--max-upload-mb", default=20.0, show_default=True,
              help="Larger uploads are refused with 413.")
@click.option("--max-pixels", default=40_000_000, show_default=True,
              help="Images with more pixels are refused with 413 before decoding.")
@click.option("--access-log", is_flag=True, help="Log every request.")
def serve_cmd(model_dir: Path, host: str, port: int, workers: int, max_upload_mb: float,
              max_pixels: int, access_log: bool) -> None:
    """Serve a model over HTTP: POST /predict (multipart field `file`, ?heatmap=true), GET
    /health. Answers JSON with score, normalized_score, is_anomalous and latency_ms."""
    from .serve import serve

    serve(model_dir, host, port, access_log=access_log, max_upload_mb=max_upload_mb,
          max_pixels=max_pixels, workers=workers)


@cli.command("report")
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_cmd(results_dir: Path) -> None:
    """Rebuild RESULTS_DIR/report.html from a benchmark's saved results (no model is run).

    One self-contained HTML file: summary table, ROC/PR curves, score histograms, AUROC per
    defect type, heat-map galleries, reconstructions, settings.
    """
    from .report import build_report

    click.echo(f"wrote {build_report(results_dir)}")


@cli.command("models")
def list_models() -> None:
    """List the available models and their presets."""
    from .models import available_models, get_model_class

    for name in available_models():
        cls = get_model_class(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip()
        first = doc.splitlines()[0].replace("``", "") if doc else ""
        presets = ", ".join(sorted(cls.presets)) or "-"
        click.echo(f"{name:<12} presets: {presets:<20} {first}")


def main() -> None:
    cli(prog_name="flawscope")
