"""Run flawscope on a Ray cluster: benchmarks as Ray tasks, batch scoring over Ray Data.

Needs the optional extra: ``pip install 'flawscope[ray]'``. Every node must see the data, the
model and the output folder at the same paths (a shared file system), and have flawscope
installed in the same environment.

Example::

    from flawscope import cluster

    # every (model, category) pair is one Ray task holding 2 CPUs
    rows = cluster.run_benchmark("data", ["gaussian", "padim"], None, "bench",
                                 address="head:6379", cpus_per_task=2)

    # score every image of a list file (one path per line) with a pool of actors
    summary = cluster.predict("models/screw", ["archive.txt"], "scores", address="head:6379")
    for record in cluster.read_predictions("scores"):
        print(record["path"], record["score"], record["error"])

Batch scoring is resumable and exactly-once: the inputs are first listed, streaming, into
fixed shards of ``shard_size`` paths (``OUT/inputs/part-NNNNNN.tsv``); each shard is scored
by one actor through :meth:`flawscope.Detector.predict_many` and its records are written in
one atomic rename (``OUT/predictions/part-NNNNNN.jsonl``, or ``.parquet``). A shard whose
worker dies is retried on another actor and written once; a rerun scores only the shards
that have no output yet.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .data import IMAGE_SUFFIXES, _is_junk
from .errors import FlawscopeError

log = logging.getLogger(__name__)

#: Files given as inputs with these suffixes are lists of image paths, one per line.
LIST_SUFFIXES = {".txt", ".lst", ".list"}
#: Paths per shard: one actor call, one output file. About 10 s of work for a small model on
#: one core, so a lost worker costs little and Ray's per-call overhead stays negligible.
DEFAULT_SHARD_SIZE = 1000
PLAN = "plan.json"
FORMATS = ("jsonl", "parquet")


def _ray():
    try:
        import ray
    except ImportError:
        raise FlawscopeError("Ray is not installed: pip install 'flawscope[ray]'") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (``HOST:PORT``), or start a local Ray instance with
    ``num_cpus`` CPUs (all by default). Returns True when this call started Ray (and so the
    caller should shut it down); reuses a Ray already initialized in this process."""
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise FlawscopeError(f"could not start or join {where}: {exc}") from None
    return True


# ============================================================================ benchmark
def run_benchmark(data: str | Path, models: list[str], categories: list[str] | None,
                  out: str | Path, *, address: str | None = None, cpus_per_task: int = 1,
                  num_cpus: int | None = None, **options: Any) -> list[dict]:
    """:func:`flawscope.benchmark.run_benchmark` with every pending pair a Ray task holding
    ``cpus_per_task`` CPUs; the same files, report and resume rules as the local run.
    ``options`` are that function's (preset, force, pixel_size, settings, progress)."""
    from . import benchmark

    # A typo in a name or setting fails here, before a cluster is started or joined.
    benchmark.plan(Path(data), models, categories, options.get("settings"))
    started = connect(address, num_cpus)
    try:
        runner = RayPairRunner(cpus_per_task)
        return benchmark.run_benchmark(data, models, categories, out, runner=runner, **options)
    finally:
        if started:
            _ray().shutdown()


@dataclass
class RayPairRunner:
    """Runs benchmark pairs as Ray tasks (see :func:`flawscope.benchmark.run_benchmark`).

    A task whose worker dies is retried up to ``retries`` times (Ray re-runs it elsewhere);
    an error raised by the pair itself is recorded by the task as the local run records it.
    """

    cpus_per_task: int = 1
    retries: int = 3

    def __call__(self, pairs: list, out: Path, say: Callable[[str], None],
                 **pair_options: Any) -> None:
        from . import benchmark, results

        ray = _ray()
        task = ray.remote(_pair_task).options(num_cpus=self.cpus_per_task,
                                              max_retries=self.retries, retry_exceptions=False)
        pending = {task.remote(pair, out, self.cpus_per_task, pair_options): pair
                   for pair in pairs}
        say(f"submitted {len(pending)} pair(s) to Ray, {self.cpus_per_task} CPU(s) each")
        finished = 0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            pair = pending.pop(ref)
            finished += 1
            label = f"[{finished}/{len(pairs)}] {pair.model} on {pair.category.name}"
            try:
                say(f"{label}: {ray.get(ref)}")
            except ray.exceptions.RayError as exc:  # lost more often than `retries` allows
                message = f"lost on the cluster: {str(exc).splitlines()[0]}"
                results.write_error(benchmark.Pair.folder(pair, out), message)
                say(f"{label}: FAILED ({message})")


def _pair_task(pair, out: Path, threads: int, pair_options: dict[str, Any]) -> str:
    from . import benchmark

    # The pair's `flawscope fit` / `test` children inherit this: as many threads as CPUs held.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return benchmark.run_recorded(pair, out, **pair_options)


# ============================================================================ predict
@dataclass
class PredictSummary:
    """What :func:`predict` did: counts over every input (earlier runs' shards included)."""

    out: Path
    n_inputs: int
    n_failed: int
    n_shards: int
    shards_scored: int
    seconds: float
    files: list[Path] = field(default_factory=list)
    scored_images: int = 0

    @property
    def images_per_s(self) -> float:
        """Images scored by this run per second of its wall time."""
        return self.scored_images / self.seconds if self.seconds > 0 else 0.0


def predict(model_dir: str | Path, inputs: Iterable[str | Path], out: str | Path, *,
            address: str | None = None, num_cpus: int | None = None, recursive: bool = False,
            cpus_per_task: int = 1, workers: int | None = None, batch_size: int = 8,
            shard_size: int = DEFAULT_SHARD_SIZE, heatmaps: bool = True, annotate: bool = False,
            maps: str | None = None, fmt: str = "jsonl", engine: str = "auto",
            progress: Callable[[str], None] | None = None) -> PredictSummary:
    """Score images (folders, image files, list files of paths) on Ray; see the module
    docstring for the output layout. ``workers`` actors (default: as many as the cluster's
    CPUs allow) each load the model once (with ``engine``, as :meth:`Detector.load`) and hold
    ``cpus_per_task`` CPUs (and threads)."""
    if fmt not in FORMATS:
        raise FlawscopeError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if shard_size < 1 or batch_size < 1 or cpus_per_task < 1:
        raise FlawscopeError("shard size, batch size and CPUs per task must be at least 1")
    out, model_dir = Path(out), Path(model_dir)
    say = progress or (lambda line: None)
    from .modelfile import load_model

    load_model(model_dir)  # a wrong model folder fails here, before any Ray work
    plan = plan_shards(inputs, out, recursive=recursive, shard_size=shard_size,
                       model_dir=model_dir, fmt=fmt)
    todo = [k for k in range(plan["n_shards"]) if not shard_output(out, k, fmt).exists()]
    say(f"{plan['n_inputs']} input(s) in {plan['n_shards']} shard(s); "
        f"{len(todo)} to score")
    start = time.perf_counter()
    scored = scored_images = 0
    if todo:
        started = connect(address, num_cpus)
        try:
            scored, scored_images = _score_on_ray(todo, plan, out, model_dir, cpus_per_task,
                                                  workers, batch_size, heatmaps, annotate,
                                                  maps, fmt, engine, say, start)
        finally:
            if started:
                _ray().shutdown()
    seconds = time.perf_counter() - start
    files = [shard_output(out, k, fmt) for k in range(plan["n_shards"])]
    n_failed = sum(1 for r in read_predictions(out) if r["error"] is not None)
    return PredictSummary(out, plan["n_inputs"], n_failed, plan["n_shards"], scored, seconds,
                          files, scored_images)


def _score_on_ray(todo: list[int], plan: dict, out: Path, model_dir: Path, cpus_per_task: int,
                  workers: int | None, batch_size: int, heatmaps: bool, annotate: bool,
                  maps: str | None, fmt: str, engine: str, say: Callable[[str], None],
                  start: float) -> tuple[int, int]:
    ray = _ray()
    import ray.data  # noqa: F811 - the submodule of the package _ray() checked

    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
    workers = min(workers, len(todo))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    # One shard per block: a lost worker re-runs one shard, never a neighbour's.
    shards = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
    scored = shards.map_batches(
        ShardScorer, batch_size=1,
        fn_constructor_kwargs={"model_dir": str(model_dir), "out": str(out),
                               "batch_size": batch_size, "heatmaps": heatmaps,
                               "annotate": annotate, "maps": maps, "fmt": fmt,
                               "threads": cpus_per_task, "engine": engine},
        # Ray Data restarts a killed actor and retries its call without limit by default;
        # the shard is then rewritten whole, and its output appears once, by rename.
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_task)
    say(f"scoring on Ray: {workers} actor(s), {cpus_per_task} CPU(s) each")
    done = images = failed = 0
    for row in scored.iter_rows():
        done += 1
        images += int(row["n"])
        failed += int(row["failed"])
        rate = images / max(time.perf_counter() - start, 1e-9)
        say(f"[{done}/{len(todo)} shards] {images} images, {failed} unreadable, "
            f"{rate:.1f} images/s")
    return done, images


class ShardScorer:
    """A Ray Data actor: loads the model once, then scores whole shards."""

    def __init__(self, model_dir: str, out: str, batch_size: int, heatmaps: bool,
                 annotate: bool, maps: str | None, fmt: str, threads: int,
                 engine: str = "auto"):
        import torch

        from .detector import Detector

        torch.set_num_threads(threads)
        self.detector = Detector.load(model_dir, engine)
        self.out = Path(out)
        self.options = {"batch_size": batch_size, "heatmaps": heatmaps, "annotate": annotate,
                        "maps": maps, "fmt": fmt}

    def __call__(self, batch: dict) -> dict:
        rows: dict[str, list] = {"shard": [], "n": [], "failed": []}
        for shard in batch["shard"]:
            n, failed = score_shard(self.detector, self.out, int(shard), **self.options)
            rows["shard"].append(int(shard))
            rows["n"].append(n)
            rows["failed"].append(failed)
        return rows


def score_shard(detector, out: Path, shard: int, batch_size: int = 8, heatmaps: bool = True,
                annotate: bool = False, maps: str | None = None,
                fmt: str = "jsonl") -> tuple[int, int]:
    """Score one shard's paths and write its output file atomically; ``(n, n_unreadable)``.
    Records are those of local ``flawscope predict``, in input order."""
    from .predict_files import PredictionWriter

    entries = read_shard_inputs(out, shard)
    buffer = io.StringIO()
    writer = PredictionWriter(out, heatmaps=heatmaps, annotate=annotate, maps=maps)
    writer._jsonl = buffer  # the records go to memory; the shard file is written once below
    stream = detector.predict_many([path for _, path in entries], batch_size=batch_size,
                                   on_error="skip", keep_images=heatmaps)
    failed = 0
    for (name, _), prediction in zip(entries, stream, strict=True):
        writer.write(prediction, name)
        failed += not prediction.ok
    target = shard_output(out, shard, fmt)
    if fmt == "jsonl":
        _write_atomic(target, buffer.getvalue().encode())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = [json.loads(line) for line in buffer.getvalue().splitlines()]
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=_PARQUET_SCHEMA()), sink)
        _write_atomic(target, sink.getvalue())
    return len(entries), failed


def _PARQUET_SCHEMA():  # noqa: N802 - a constant built lazily (pyarrow comes with Ray)
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("score", pa.float64()),
                      ("normalized_score", pa.float64()), ("is_anomalous", pa.bool_()),
                      ("threshold", pa.float64()), ("width", pa.int64()),
                      ("height", pa.int64()), ("error", pa.string()),
                      ("heatmap", pa.string()), ("map", pa.string())])


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


# ============================================================================ shards
def shard_output(out: Path, shard: int, fmt: str = "jsonl") -> Path:
    return Path(out) / "predictions" / f"part-{shard:06d}.{fmt}"


def _shard_inputs(out: Path, shard: int) -> Path:
    return Path(out) / "inputs" / f"part-{shard:06d}.tsv"


def read_shard_inputs(out: Path, shard: int) -> list[tuple[str, str]]:
    """``(output name, path)`` of every input of one shard."""
    with open(_shard_inputs(out, shard)) as f:
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]


def read_predictions(out: str | Path) -> Iterator[dict]:
    """Every record written so far, shard by shard, in input order (streams)."""
    folder = Path(out) / "predictions"
    for path in sorted(folder.glob("part-*.jsonl")):
        with open(path) as f:
            for line in f:
                yield json.loads(line)
    for path in sorted(folder.glob("part-*.parquet")):
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()


def plan_shards(inputs: Iterable[str | Path], out: Path, *, recursive: bool = False,
                shard_size: int = DEFAULT_SHARD_SIZE, model_dir: Path | None = None,
                fmt: str = "jsonl") -> dict:
    """List the inputs into shard files under ``OUT/inputs`` (streaming: memory does not grow
    with the number of paths) and return the plan; a plan already complete for the same
    inputs is reused, so a rerun keeps every shard's contents and scores only what is
    missing."""
    out = Path(out)
    inputs = [str(Path(i)) for i in inputs]
    identity = {"inputs": [str(Path(i).resolve()) for i in inputs], "recursive": recursive,
                "shard_size": shard_size, "format": fmt,
                "model": str(Path(model_dir).resolve()) if model_dir else None}
    plan_file = out / "inputs" / PLAN
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        if {k: plan.get(k) for k in identity} != identity:
            raise FlawscopeError(f"{out} holds a run over other inputs, model or settings: "
                                 f"use another --out (or delete {out})")
        return plan
    if not inputs:
        raise FlawscopeError("no inputs given")
    n_inputs = n_shards = 0
    lines: list[str] = []
    for name, path in iter_inputs(inputs, recursive):
        if "\t" in name or "\n" in path or "\t" in path:
            raise FlawscopeError(f"{path}: tabs and line breaks in file names are not supported")
        lines.append(f"{name}\t{path}\n")
        n_inputs += 1
        if len(lines) == shard_size:
            _write_atomic(_shard_inputs(out, n_shards), "".join(lines).encode())
            n_shards, lines = n_shards + 1, []
    if lines:
        _write_atomic(_shard_inputs(out, n_shards), "".join(lines).encode())
        n_shards += 1
    if n_inputs == 0:
        raise FlawscopeError(f"no images found in {', '.join(inputs)}")
    plan = identity | {"n_inputs": n_inputs, "n_shards": n_shards}
    _write_atomic(plan_file, json.dumps(plan, indent=2).encode())  # written last: complete
    return plan


def iter_inputs(inputs: Iterable[str], recursive: bool = False) -> Iterator[tuple[str, str]]:
    """``(output name, path)`` for every image, lazily. Folders are walked in sorted order
    (one folder's entries in memory at a time), with names mirroring the path below the
    folder given, its own name included, as local ``predict`` names them; each line of a list
    file is a path (relative ones are relative to the list file's folder), named after its
    path without the leading ``/``."""
    for item in map(Path, inputs):
        if item.is_dir():
            yield from _walk(item, PurePosixPath(item.resolve().name), recursive)
        elif item.suffix.lower() in LIST_SUFFIXES and item.is_file():
            # Plain strings, not Path objects: pathlib interns every path part, which grows
            # the interpreter's table of interned strings with the number of paths.
            base = os.path.dirname(str(item))
            with open(item) as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        path = line if os.path.isabs(line) else os.path.join(base, line)
                        yield _list_name(path), path
        elif item.exists() or item.suffix.lower() in IMAGE_SUFFIXES:
            yield item.stem, str(item)  # a missing image gets an error record, as locally
        else:
            raise FlawscopeError(f"{item}: no such file or folder")


def _walk(folder: Path, name: PurePosixPath, recursive: bool) -> Iterator[tuple[str, str]]:
    with os.scandir(folder) as entries:
        ordered = sorted((e.name, e.is_dir()) for e in entries if not _is_junk(Path(e.name)))
    for entry, is_dir in ordered:
        if is_dir:
            if recursive:
                yield from _walk(folder / entry, name / entry, recursive)
        elif Path(entry).suffix.lower() in IMAGE_SUFFIXES:
            yield str((name / entry).with_suffix("")), str(folder / entry)


def _list_name(path: str) -> str:
    return os.path.splitext(os.path.abspath(path).lstrip("/"))[0]
