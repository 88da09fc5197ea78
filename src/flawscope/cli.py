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
def synth(out: Path, seed: int, size: int, n_train: int, test_good: int, test_defect: int,
          categories: str | None) -> None:
    """Write a synthetic MVTec-layout dataset with exact defect masks to OUT.

    Two categories: synthetic_texture (grayscale weave; scratch, hole, stain, crack) and
    synthetic_object (RGB part; scratch, missing_piece, stain, crack).
    """
    from .synth import CATEGORIES, SynthSpec, generate

    spec = SynthSpec(size=size, n_train=n_train, n_test_good=test_good,
                     n_test_per_defect=test_defect, seed=seed)
    names = tuple(_split(categories) or CATEGORIES)
    for folder in generate(out, spec, names):
        click.echo(f"wrote {folder}")


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Category folder in MVTec AD layout (needs train/good).")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Model name; see `flawscope models`.")
@click.option("--preset", default=None, help="Named settings of the model, e.g. fast or paper.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one model setting; repeatable.")
@click.option("--holdout", default=0.1, show_default=True,
              help="Fraction of train/good held out to calibrate what normal scores look like.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model directory to write (replaced atomically if it exists).")
def fit(data: Path, model_name: str, preset: str | None, settings: tuple[str, ...],
        holdout: float, out: Path) -> None:
    """Fit a model on the good training images of a category and save it."""
    from .pipeline import fit_model

    result = fit_model(data, model_name, out, preset, _parse_settings(settings), holdout)
    click.echo(f"fitted {model_name} on {result.n_train} images in {result.fit_s:.1f} s "
               f"({result.n_holdout} held out); saved to {out}")


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `flawscope fit`.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Category folder with test/ and ground_truth/.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Results folder: metrics.json and scores.csv.")
@click.option("--pixel-size", default=256, show_default=True,
              help="Maps and masks are resized to this square size for pixel metrics.")
@click.option("--batch-size", default=16, show_default=True)
def test(model_dir: Path, data: Path, out: Path, pixel_size: int, batch_size: int) -> None:
    """Score a category's test images and write metrics (image/pixel AUROC, AP, AU-PRO...)."""
    import torch

    from .modelfile import load_model
    from .pipeline import evaluate, peak_rss_mb

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
        "peak_rss_mb": max(peak_rss_mb(), float(fit_info.get("peak_rss_mb") or 0)),
        "threads": torch.get_num_threads(),
        "flawscope_version": __version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type", "label", "score"])
        for path, kind, label, score in zip(evaluation.paths, evaluation.defect_types,
                                            evaluation.labels, evaluation.scores, strict=True):
            writer.writerow([str(path), kind, int(label), f"{score:.9g}"])
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

    Prints one line per image and writes OUT/predictions.jsonl (path, score) and
    OUT/<name>_heatmap.png.
    """
    from .data import list_images, read_image
    from .modelfile import load_model
    from .visualize import display_range, heatmap_overlay

    model, manifest = load_model(model_dir)
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
            record = {"path": str(path), "score": score, "heatmap": str(heatmap)}
            jsonl.write(json.dumps(record) + "\n")
            click.echo(f"{path}\tscore={score:.6g}")


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
@click.option("--pixel-size", default=256, show_default=True,
              help="Resolution of pixel metrics.")
def benchmark(data: Path, models: str, categories: str | None, preset: str | None, out: Path,
              force: bool, pixel_size: int) -> None:
    """Fit and test every model on every category; resumable, one failure does not stop it."""
    from .benchmark import markdown_table, run_benchmark

    rows = run_benchmark(data, _split(models) or [], _split(categories), out, preset, force,
                         pixel_size)
    click.echo(markdown_table(rows))
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
    click.echo(f"results in {out / 'results'}")


@cli.command("models")
def list_models() -> None:
    """List the available models and their presets."""
    from .models import available_models, get_model_class

    for name in available_models():
        cls = get_model_class(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip()
        first = doc.splitlines()[0] if doc else ""
        presets = ", ".join(sorted(cls.presets)) or "-"
        click.echo(f"{name:<12} presets: {presets:<16} {first}")


def main() -> None:
    cli(prog_name="flawscope")
