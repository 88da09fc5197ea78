"""The ``flawscope`` command line.

Every verb is a thin layer over :mod:`flawscope.pipeline`; a
:class:`~flawscope.errors.FlawscopeError` becomes a one-line ``Error: ...`` and exit code 1,
never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import __version__
from .allocator import keep_freed_memory
from .errors import FlawscopeError

log = logging.getLogger("flawscope")

#: The model the README's main command and ``flawscope demo`` use.
DEFAULT_MODEL = "gaussian"
#: Exit code of ``flawscope predict`` when some inputs could not be read (the rest were).
PREDICT_SOME_FAILED = 3


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


def _pixel_size(_ctx, _param, value) -> int | None:
    """``--pixel-size``: ``native`` (None) or a positive number of pixels."""
    if value in (None, "native"):
        return None
    try:
        size = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give `native` or a number of pixels") from None
    if size < 8:
        raise click.BadParameter(f"{size}: at least 8 pixels")
    return size


def _engine_option(command):
    return click.option(
        "--engine", type=click.Choice(["auto", "torch", "onnxruntime", "openvino", "int8"]),
        default="auto", show_default=True,
        help="What runs the scoring graph: auto takes the fastest engine `flawscope export` "
             "measured and checked against PyTorch, else torch; int8 (opt-in, never auto) "
             "runs the graph `flawscope export --int8` quantized and checked.")(command)


def _progress_lines():
    """Per-step lines on stderr when it is not a terminal (a log file, CI), where the progress
    bar stays silent; None on a terminal, which has the bar."""
    if sys.stderr.isatty():
        return None
    return lambda line: click.echo(line, err=True)


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _geometry_options(command):
    """--geometry, --max-side and --tile-size (see flawscope.geometry)."""
    options = [
        click.option("--geometry", type=click.Choice(["resize", "keep_aspect", "tile"]),
                     default="resize", show_default=True,
                     help="How images become model inputs: resize squashes the whole image "
                          "to the model's size; keep_aspect scales its longer side to "
                          "--max-side and covers it with tiles; tile cuts the image at "
                          "--max-side (native by default) into overlapping tiles."),
        click.option("--max-side", type=click.IntRange(min=0), default=None,
                     help="Longer side of the working image in pixels, 0 = the image's own "
                          "size [default: the model's size for keep_aspect, 0 for tile]."),
        click.option("--tile-size", type=click.IntRange(min=32), default=None,
                     help="Tile side in pixels (sets the model's image_size) [default: the "
                          "model's image_size]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _with_tile_size(settings: dict[str, str], tile_size: int | None) -> dict[str, str]:
    if tile_size is None:
        return settings
    if "image_size" in settings and int(settings["image_size"]) != tile_size:
        raise FlawscopeError(f"--tile-size {tile_size} and --set image_size="
                             f"{settings['image_size']} disagree (the tile is the model input)")
    return {**settings, "image_size": str(tile_size)}


def _ray_options(f):
    """--ray, --ray-address and --cpus-per-task, shared by `predict` and `benchmark`."""
    f = click.option("--cpus-per-task", default=1, show_default=True, type=click.IntRange(1),
                     help="With Ray: CPUs (and threads) each task or actor holds.")(f)
    f = click.option("--ray-address", default=None, metavar="HOST:PORT",
                     help="Run on the Ray cluster at this address (`ray start --head` "
                          "prints it); data and --out must be on storage every node sees.")(f)
    return click.option("--ray", "use_ray", is_flag=True,
                        help="Run on a local Ray instance (pip install 'flawscope[ray]').")(f)


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
              help="Category folder in MVTec AD layout (its train/good is read), or a plain "
                   "folder of good images.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Model name; see `flawscope models`.")
@click.option("--preset", default=None,
              help="Named settings of the model (see `flawscope models`): `fast` trains in "
                   "minutes on 2 CPU cores, `paper` uses the published settings (hours).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one model setting; repeatable (see `flawscope models`).")
@click.option("--holdout", default=0.1, show_default=True,
              help="With --calibration holdout (or auto for the trained models): fraction "
                   "of the good images held out to calibrate what normal scores look like "
                   "(none with fewer than 10 images: a warning says so).")
@click.option("--max-false-alarm", default=0.01, show_default=True,
              type=click.FloatRange(0, 0.5, min_open=True, max_open=True),
              help="Target fraction of good parts flagged; sets the decision threshold from "
                   "the good images' calibration scores only.")
@click.option("--calibration", type=click.Choice(["holdout", "auto", "loo", "kfold"]),
              default="auto", show_default=True,
              help="How the good images' calibration scores are made: holdout (score the "
                   "--holdout images), loo (every image, scored by the model without it: "
                   "padim, gaussian, patchcore), kfold (fit without each fifth, score it), "
                   "or auto (what each model does best: loo for padim and gaussian, kfold "
                   "for patchcore, holdout for the trained models).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model directory to write (replaced atomically if it exists).")
@_geometry_options
def fit(data: Path, model_name: str, preset: str | None, settings: tuple[str, ...],
        holdout: float, max_false_alarm: float, calibration: str, out: Path, geometry: str,
        max_side: int | None, tile_size: int | None) -> None:
    """Fit a model on good images and save it.

    The decision threshold is set from good images only (scored by a model that did not see
    them, see --calibration) for the --max-false-alarm rate;
    change it later with `flawscope threshold`. The --geometry is saved with the model and
    used wherever it scores (test, predict, serve, report).
    """
    from .geometry import Geometry
    from .pipeline import fit_model

    overrides = _with_tile_size(_parse_settings(settings), tile_size)
    result = fit_model(data, model_name, out, preset, overrides, holdout, max_false_alarm,
                       calibration, geometry=Geometry(geometry, max_side))
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
              help="Category folder with test/ (and ground_truth/ for pixel metrics; without "
                   "it only image metrics are computed).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Results folder: metrics.json, scores.csv and report_assets/ (pictures "
                   "for `flawscope report`).")
@click.option("--pixel-size", default="native", show_default=True, callback=_pixel_size,
              help="Resolution of pixel metrics: `native` compares each map with its mask at "
                   "the mask's own size (the official MVTec protocol); a number N resizes "
                   "both to N x N.")
@click.option("--batch-size", default=16, show_default=True,
              help="Images scored at once (more is faster up to memory limits).")
@_engine_option
def test(model_dir: Path, data: Path, out: Path, pixel_size: int | None,
         batch_size: int, engine: str) -> None:
    """Score a category's test images; write and print metrics and the stored threshold's
    false-alarm and detection rates."""
    from .detector import Detector

    detector = Detector.load(model_dir, engine)
    evaluation = detector.evaluate(data, pixel_size=pixel_size, batch_size=batch_size, out=out)
    click.echo(_metrics_table(evaluation.metrics))
    click.echo(f"wrote {out / 'metrics.json'}")


def _metrics_table(m: dict) -> str:
    from .results import decision_summary

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{m['model']} on {m['category']} ({m['n_images']} test images, "
             f"{m['n_defective']} defective)",
             f"  image AUROC {f(m['image_auroc'])}   image AP {f(m['image_ap'])}   "
             f"F1-max {f(m['f1_max'])}"]
    if m.get("pixel_size") is None:
        lines.append("  pixel AUROC -   AU-PRO -   (no ground_truth/ masks: image level only)")
    else:
        lines.append(f"  pixel AUROC {f(m['pixel_auroc'])}   AU-PRO {f(m['pixel_aupro'])}")
    for kind, auc in m.get("per_defect", {}).items():
        lines.append(f"  {kind:<20} image AUROC {auc:.3f}")
    lines.append("  " + decision_summary(m))
    if m.get("threshold_warning"):
        lines.append(f"  warning: {m['threshold_warning']}")
    return "\n".join(lines)


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `flawscope fit`.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for predictions.jsonl, heatmaps/ and maps/.")
@click.option("-r", "--recursive", is_flag=True, help="Also score images in sub-folders.")
@click.option("--on-error", type=click.Choice(["skip", "stop"]), default="skip",
              show_default=True,
              help="skip: an unreadable file becomes a record with an `error` field and the "
                   "batch goes on (exit code 3 at the end); stop: stop at the first one.")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Write a heat-map overlay per image.")
@click.option("--annotate", is_flag=True,
              help="Draw the colour scale, the score and the decision under each heat map.")
@click.option("--save-maps", type=click.Choice(["npy", "tiff"]), default=None,
              help="Also write the raw anomaly map (float32, at the image's size) per image.")
@click.option("--batch-size", default=8, show_default=True, help="Images scored at once.")
@_engine_option
@_ray_options
@click.option("--workers", default=None, type=click.IntRange(1),
              help="With Ray: scoring actors (default: as many as the cluster's CPUs allow).")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1),
              help="With Ray: inputs per output file (the unit of retry and resume).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl",
              show_default=True, help="With Ray: format of the prediction shards.")
def predict(model_dir: Path, inputs: tuple[Path, ...], out: Path, recursive: bool,
            on_error: str, heatmaps: bool, annotate: bool, save_maps: str | None,
            batch_size: int, engine: str, use_ray: bool, ray_address: str | None,
            cpus_per_task: int, workers: int | None, shard_size: int, fmt: str) -> None:
    """Score new images (files or folders) and write their heat maps.

    Prints one line per image and writes OUT/predictions.jsonl (one JSON record per input,
    written as it goes) plus OUT/heatmaps/ and OUT/maps/. Output names mirror each input's
    path below the folder given (a folder's own name included), so equal file names in
    different folders never overwrite each other. Each record has the raw `score`,
    `normalized_score` (logistic: the threshold is 0.5, a typical good part 0.1),
    `is_anomalous` (score > threshold; null when the model has no threshold), `threshold`,
    the image's `width` and `height`, and `error` (null, or why the file could not be read).
    Non-image files in folders are skipped with a warning.

    With --ray or --ray-address, scoring runs on Ray Data: INPUTS may also be list files
    (.txt, one image path per line), and OUT gets predictions/part-NNNNNN.jsonl (one record
    per input, the same fields) written shard by shard; a rerun scores only missing shards.
    """
    if use_ray or ray_address:
        _predict_on_ray(model_dir, inputs, out, recursive, on_error, heatmaps, annotate,
                        save_maps, batch_size, ray_address, cpus_per_task, workers,
                        shard_size, fmt, engine)
        return
    if fmt != "jsonl" or workers is not None:
        raise FlawscopeError("--format and --workers apply to Ray runs: add --ray or "
                             "--ray-address")
    from .detector import Detector
    from .predict_files import PredictionWriter, collect_inputs

    detector = Detector.load(model_dir, engine)
    if detector.threshold is None:
        click.echo("warning: this model has no decision threshold; every image is reported as "
                   "undecided (set one with `flawscope threshold`)", err=True)
    items = collect_inputs(inputs, recursive)
    failed = 0
    with PredictionWriter(out, heatmaps=heatmaps, annotate=annotate, maps=save_maps) as writer:
        stream = detector.predict_many([str(path) for path, _ in items], batch_size=batch_size,
                                       on_error="raise" if on_error == "stop" else "skip",
                                       keep_images=heatmaps)
        for (_, name), prediction in zip(items, stream, strict=True):  # one per input, in order
            writer.write(prediction, name)
            failed += not prediction.ok
            if prediction.ok:
                normalized = prediction.normalized_score
                click.echo(f"{prediction.source}\tscore={prediction.score:.6g}\tnormalized="
                           f"{'-' if normalized is None else f'{normalized:.3f}'}\t"
                           f"{prediction.verdict}")
            else:
                click.echo(f"{prediction.source}\terror: {prediction.error}", err=True)
    click.echo(f"{len(items) - failed} of {len(items)} images scored; wrote "
               f"{out / 'predictions.jsonl'}")
    if failed:
        click.echo(f"{failed} file(s) could not be read (see the `error` field)", err=True)
        sys.exit(PREDICT_SOME_FAILED)


def _predict_on_ray(model_dir: Path, inputs: tuple[Path, ...], out: Path, recursive: bool,
                    on_error: str, heatmaps: bool, annotate: bool, save_maps: str | None,
                    batch_size: int, ray_address: str | None, cpus_per_task: int,
                    workers: int | None, shard_size: int, fmt: str, engine: str) -> None:
    from . import cluster

    if on_error == "stop":
        raise FlawscopeError("--on-error stop is not supported with Ray: unreadable files "
                             "are recorded with an `error` field")
    summary = cluster.predict(model_dir, inputs, out, address=ray_address, recursive=recursive,
                              cpus_per_task=cpus_per_task, workers=workers,
                              batch_size=batch_size, shard_size=shard_size, heatmaps=heatmaps,
                              annotate=annotate, maps=save_maps, fmt=fmt, engine=engine,
                              progress=lambda line: click.echo(line, err=True))
    click.echo(f"{summary.n_inputs - summary.n_failed} of {summary.n_inputs} images scored "
               f"({summary.scored_images} in this run, {summary.images_per_s:.1f} images/s); "
               f"wrote {summary.n_shards} shard(s) in {out / 'predictions'}")
    if summary.n_failed:
        click.echo(f"{summary.n_failed} file(s) could not be read (see the `error` field)",
                   err=True)
        sys.exit(PREDICT_SOME_FAILED)


@cli.command("threshold")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["good", "f1"]), default=None,
              help="good: from the held-out good images for --max-false-alarm; f1: best F1 on "
                   "labelled images in --data. Without --method/--value: show the threshold.")
@click.option("--max-false-alarm", default=0.01, show_default=True,
              type=click.FloatRange(0, 0.5, min_open=True, max_open=True),
              help="For --method good: target fraction of good parts flagged.")
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
        # From the stored calibration: the pixel threshold of defect regions comes back too.
        record = th.from_calibration(manifest.get("calibration"), max_false_alarm)
    else:
        if data is None:
            raise FlawscopeError("--method f1 needs --data with labelled images")
        from .geometry import Geometry

        model, _ = load_model(model_dir)
        geometry = Geometry.from_manifest(manifest).resolved(model.image_size)
        record = th.from_validation(model, data, good, geometry)
    update_manifest(model_dir, threshold=record)
    click.echo(_threshold_line(record))


@cli.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="File format of the exported graph (ONNX, run by onnxruntime).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="File to write (default MODEL_DIR/model.onnx).")
@click.option("--int8", "int8", is_flag=True,
              help="Also write MODEL_DIR/model.int8.onnx: the backbone statically quantized "
                   "to int8, calibrated on good training images, refused unless it keeps "
                   "the float32 AUROC and score scale (the `int8` engine).")
@click.option("--calibration-data", type=click.Path(path_type=Path), default=None,
              help="Good images for --int8 (a category with train/good, or a folder); "
                   "default: the category the model was fitted on.")
def export_cmd(model_dir: Path, fmt: str, out: Path | None, int8: bool,
               calibration_data: Path | None) -> None:
    """Export a fitted model's scoring graph (images [B,3,S,S] in [0,1] -> scores, maps).

    The file is checked with onnxruntime (and OpenVINO where installed) against PyTorch
    before it is written; both engines are timed and the result recorded in the manifest, so
    `--engine auto` of predict, test and serve can take the fastest checked one.

    With --int8 the graph is also quantized (static int8, QDQ, backbone convolutions) and
    checked on held-out good images and synthetic-defect versions of them: it is refused,
    with the measured figures, if image AUROC drops by more than 0.005, the correlation of
    its scores with float32 is below 0.99, or the good images' scores move by more than a
    tenth of the decision margin (threshold minus the median good score) on average.
    """
    from .export import export_model_dir

    if calibration_data is not None and not int8:
        raise click.UsageError("--calibration-data is for --int8")
    if int8 and out is not None:
        raise click.UsageError("--int8 writes beside the weights: leave out --out")

    report = export_model_dir(model_dir, out)
    click.echo(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB); onnxruntime vs "
               f"PyTorch relative error: scores {report.score_rel_err:.1e}, "
               f"maps {report.map_rel_err:.1e}")
    if report.img_per_s:
        click.echo("images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                            report.img_per_s.items()))
    if int8:
        from .quantize import quantize_model_dir

        q = quantize_model_dir(model_dir, calibration_data)
        click.echo(f"wrote {q.path} ({q.size_bytes / 1e6:.1f} MB); on {q.n_good} good and "
                   f"{q.n_defect} synthetic-defect images: AUROC {q.auroc_int8:.4f} int8 vs "
                   f"{q.auroc_fp32:.4f} fp32, score correlation {q.correlation:.4f}")
        if "good_flagged_int8" in q.entry:
            click.echo(f"good images over the (float32) threshold: "
                       f"{q.entry['good_flagged_fp32']} fp32, {q.entry['good_flagged_int8']} "
                       f"int8 of {q.n_good}; median shift of good scores "
                       f"{q.entry['good_score_shift']:+.1%}")
        if q.img_per_s:
            click.echo("images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                q.img_per_s.items()))


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Root folder holding category folders (symlinks are followed).")
@click.option("--models", default=DEFAULT_MODEL, show_default=True,
              help="Comma-separated model names.")
@click.option("--categories", default=None,
              help="Comma-separated categories: paths below --data (mvtec_ad/screw) or folder "
                   "names found at any depth (screw); default all.")
@click.option("--preset", default=None, help="Preset for every model that has it.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Results folder: results.csv, results.md, one sub-folder per pair.")
@click.option("--force", is_flag=True, help="Redo pairs whose results already exist.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one setting of every model; repeatable. Results already in OUT "
                   "are kept: use a new --out or --force.")
@click.option("--pixel-size", default="native", show_default=True, callback=_pixel_size,
              help="Resolution of pixel metrics: `native` (each mask's own size) or N for "
                   "N x N.")
@_geometry_options
@_ray_options
def benchmark(data: Path, models: str, categories: str | None, preset: str | None, out: Path,
              force: bool, settings: tuple[str, ...], pixel_size: int | None, geometry: str,
              max_side: int | None, tile_size: int | None, use_ray: bool,
              ray_address: str | None, cpus_per_task: int) -> None:
    """Fit and test every model on every category; resumable, one failure does not stop it.

    Writes OUT/results.csv, OUT/results.md and OUT/report.html (rebuild the report later with
    `flawscope report OUT`). With --ray or --ray-address every pair is a Ray task holding
    --cpus-per-task CPUs; the results are the same files.
    """
    from .benchmark import markdown_table, run_benchmark
    from .geometry import Geometry

    options = {"preset": preset, "force": force, "pixel_size": pixel_size,
               "settings": _with_tile_size(_parse_settings(settings), tile_size),
               "geometry": Geometry(geometry, max_side)}
    if use_ray or ray_address:
        from . import cluster

        rows = cluster.run_benchmark(data, _split(models) or [], _split(categories), out,
                                     address=ray_address, cpus_per_task=cpus_per_task,
                                     progress=lambda line: click.echo(line, err=True),
                                     **options)
    else:
        rows = run_benchmark(data, _split(models) or [], _split(categories), out,
                             progress=_progress_lines(), **options)
    click.echo(markdown_table(rows))
    click.echo(f"report: {out / 'report.html'}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise FlawscopeError(f"{len(failed)} of {len(rows)} pairs failed; see error.txt files "
                             f"under {out}")


@cli.command()
@click.option("--out", default=Path("runs/demo"), show_default=True,
              type=click.Path(path_type=Path), help="Where data and results go.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Model to fit and evaluate; see `flawscope models`.")
@click.option("--force", is_flag=True, help="Redo results that already exist.")
def demo(out: Path, model_name: str, force: bool) -> None:
    """The main job on built-in data: generate synthetic data, fit, evaluate, print the table."""
    from .benchmark import markdown_table, run_benchmark
    from .synth import CATEGORIES, generate

    data = out / "data"
    if force or not all((data / c / "train").is_dir() for c in CATEGORIES):
        generate(data)
    rows = run_benchmark(data, [model_name], list(CATEGORIES), out / "results", force=force,
                         progress=_progress_lines())
    click.echo(markdown_table(rows))
    click.echo(f"results in {out / 'results'}; open {out / 'results' / 'report.html'}")


@cli.command("serve")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 exposes the service to the network).")
@click.option("--port", default=8000, show_default=True, help="TCP port to listen on.")
@click.option("--workers", default=2, show_default=True,
              help="Scoring threads (each gets cpu_count/workers PyTorch threads; an "
                   "exported engine runs one stream per scoring thread).")
@click.option("--max-batch", default=16, show_default=True,
              help="Most images of concurrent requests scored together.")
@click.option("--batch-window-ms", default=5.0, show_default=True,
              help="How long a request waits for others to share its batch.")
@click.option("--max-upload-mb", default=20.0, show_default=True,
              help="Larger uploads are refused with 413.")
@click.option("--max-pixels", default=None, type=int,
              help="Images with more pixels are refused with 413 before decoding "
                   "[default: the CLI's limit, FLAWSCOPE_MAX_PIXELS or 64 megapixels].")
@click.option("--min-side", default=None, type=int,
              help="Images whose shorter side is smaller are refused with 422 [default: 32].")
@click.option("--access-log", is_flag=True, help="Log every request.")
@_engine_option
def serve_cmd(model_dir: Path, host: str, port: int, workers: int, max_batch: int,
              batch_window_ms: float, max_upload_mb: float, max_pixels: int | None,
              min_side: int | None, access_log: bool, engine: str) -> None:
    """Serve a model over HTTP: POST /predict (multipart field `file`, ?heatmap=true), GET
    /health. Answers JSON with score, normalized_score, is_anomalous and latency_ms."""
    from .serve import serve

    limits = {k: v for k, v in (("max_pixels", max_pixels), ("min_side", min_side))
              if v is not None}
    serve(model_dir, host, port, access_log=access_log, max_upload_mb=max_upload_mb,
          workers=workers, max_batch=max_batch, batch_window_ms=batch_window_ms,
          engine=engine, **limits)


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
@click.argument("names", nargs=-1)
def list_models(names: tuple[str, ...]) -> None:
    """List the available models (or only NAMES): what each is, its presets and the default
    one, whether it exports to ONNX, and every setting `--set` takes with its default."""
    import dataclasses
    import textwrap

    from .models import available_models, get_model_class

    for name in names or available_models():
        cls = get_model_class(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip()
        first = doc.splitlines()[0].replace("``", "") if doc else ""
        first = first.removeprefix(f"{name}: ")
        presets = ", ".join(sorted(cls.presets)) or "none"
        default = cls.default_preset or "none (the settings' defaults)"
        settings = ", ".join(f"{f.name}={_default_text(f)}"
                             for f in dataclasses.fields(cls.Config))
        click.echo(f"{name}: {first}")
        click.echo(f"  presets: {presets}; default preset: {default}; "
                   f"ONNX export: {'yes' if cls.exports_onnx() else 'no'}")
        click.echo(textwrap.fill(f"settings: {settings}", width=96, initial_indent="  ",
                                 subsequent_indent="    ", break_on_hyphens=False))


def _default_text(f) -> str:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def main() -> None:
    cli(prog_name="flawscope")
