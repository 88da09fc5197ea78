"""flawscope on Ray: a local cluster on loopback (a head without CPUs and two worker nodes of
one CPU each), a benchmark and a predict through it, equal to local runs, and killed workers.

One cluster serves the whole module (starting one costs about 10 s here).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from flawscope import Detector, cluster, results
from flawscope.cli import cli
from flawscope.synth import SynthSpec, generate

ray = pytest.importorskip("ray")

N_IMAGES = 2000
SHARD = 200  # a multiple of the batch size: shards batch the images as the local run does


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    # The driver's tasks and actors must run on the worker nodes, so the head has no CPU.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, logging_level="WARNING")
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """A gaussian model at 32 px and 2,000 small images plus two unreadable files."""
    root = tmp_path_factory.mktemp("ray_predict")
    generate(root / "synth", SynthSpec(size=32, n_train=20, n_test_good=2, n_test_per_defect=1))
    Detector.fit(root / "synth" / "synthetic_object", model="gaussian",
                 image_size=32).save(root / "model")
    images = root / "images"
    rng = np.random.default_rng(0)
    for sub in range(2):  # two folders: names mirror the folder structure, as locally
        (images / f"line{sub}").mkdir(parents=True)
        for i in range(N_IMAGES // 2):
            pixels = rng.integers(0, 256, (32 + i % 3, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"line{sub}" / f"{i:04d}.png")
    (images / "line1" / "broken.png").write_bytes(b"not a png")
    (images / "line0" / "empty.jpg").write_bytes(b"")
    return root


def _local_scores(model: Path, paths: list[str]) -> dict[str, float | None]:
    detector = Detector.load(model)
    return {p.source: p.score for p in detector.predict_many(paths, batch_size=8,
                                                             keep_images=False)}


def _ray_records(out: Path) -> list[dict]:
    return list(cluster.read_predictions(out))


def _kill_when(match: str, ready, killed: list[int], timeout: float = 120) -> threading.Thread:
    """A thread that SIGKILLs the first Ray worker whose title contains ``match`` once
    ``ready()`` holds (the worker is then mid-task)."""

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not killed:
            if ready():
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if f"ray::{match}" in " ".join(proc.info["cmdline"] or []) or (
                            match == "ShardScorer"
                            and "(ShardScorer)" in " ".join(proc.info["cmdline"] or [])):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_listing_streams_into_shards_named_as_local_predict_names(tmp_path):
    from flawscope.predict_files import collect_inputs

    folder = tmp_path / "line"
    for name in ("b.png", "a.jpg", "sub/c.png", "sub/deeper/d.bmp", "notes.txt", "._x.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    single = tmp_path / "e.png"
    single.write_bytes(b"")
    inputs = [folder, single]
    local = [(name, str(path)) for path, name in collect_inputs(inputs, recursive=True)]
    assert list(cluster.iter_inputs(inputs, recursive=True)) == local
    assert [n for n, _ in local] == ["line/a", "line/b", "line/sub/c", "line/sub/deeper/d", "e"]
    plan = cluster.plan_shards(inputs, tmp_path / "out", recursive=True, shard_size=2)
    assert (plan["n_inputs"], plan["n_shards"]) == (5, 3)
    shards = [cluster.read_shard_inputs(tmp_path / "out", k) for k in range(3)]
    assert [tuple(e) for shard in shards for e in shard] == local
    assert cluster.plan_shards(inputs, tmp_path / "out", recursive=True, shard_size=2) == plan
    with pytest.raises(cluster.FlawscopeError, match="other inputs"):
        cluster.plan_shards(inputs, tmp_path / "out", recursive=True, shard_size=3)


def test_predict_on_ray_equals_local_despite_a_killed_worker(ray_cluster, scoring, tmp_path):
    out = tmp_path / "out"
    killed: list[int] = []
    # Kill one scoring actor once the first shard is written: others are then mid-shard.
    thread = _kill_when("ShardScorer", lambda: any((out / "predictions").glob("part-*")),
                        killed)
    summary = cluster.predict(scoring / "model", [scoring / "images"], out, recursive=True,
                              shard_size=SHARD, heatmaps=True)
    thread.join()
    assert killed, "no scoring worker was found to kill"
    assert summary.n_inputs == N_IMAGES + 2 and summary.n_failed == 2
    assert summary.n_shards == summary.shards_scored == 11
    # Every input exactly once, no partial file left, every heat map named is whole.
    records = _ray_records(out)
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == N_IMAGES + 2
    assert not list((out / "predictions").glob(".*tmp"))
    for record in records[::97]:
        if record["error"] is None:
            with Image.open(record["heatmap"]) as picture:
                picture.load()
    # Same decoding, same batches of 8, same code: the scores are the local run's. The
    # tolerance only allows another thread count to reorder a float sum.
    local = _local_scores(scoring / "model", paths)
    for record in records:
        if record["error"] is None:
            assert record["score"] == pytest.approx(local[record["path"]], rel=1e-6)
        else:
            assert local[record["path"]] is None
            assert Path(record["path"]).name in ("broken.png", "empty.jpg")
    assert set(records[0]) == {"path", "score", "normalized_score", "is_anomalous",
                               "threshold", "width", "height", "regions", "error", "heatmap", "map"}
    # A lost shard (as after Ctrl-C) is the only one a rerun scores, identically.
    shard = cluster.shard_output(out, 4)
    before = shard.read_bytes()
    shard.unlink()
    again = cluster.predict(scoring / "model", [scoring / "images"], out, recursive=True,
                            shard_size=SHARD, heatmaps=True)
    assert again.shards_scored == 1 and again.scored_images == SHARD
    assert shard.read_bytes() == before
    with pytest.raises(cluster.FlawscopeError, match="other inputs"):
        cluster.predict(scoring / "model", [scoring / "images" / "line0"], out)


def test_predict_cli_on_ray_with_list_file_and_parquet(ray_cluster, scoring, tmp_path):
    from click.testing import CliRunner

    listing = tmp_path / "todo.txt"
    names = [str(scoring / "images" / "line0" / f"{i:04d}.png") for i in range(5)]
    listing.write_text("\n".join(names + ["# a comment", "missing.png"]) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", "--model", str(scoring / "model"),
                                      str(listing), "--out", str(out), "--ray",
                                      "--no-heatmaps", "--format", "parquet",
                                      "--shard-size", "4"])
    assert result.exit_code == 3, result.output  # one input could not be read
    assert "5 of 6 images scored" in result.output
    records = _ray_records(out)
    assert [r["path"] for r in records] == names + [str(tmp_path / "missing.png")]
    assert records[-1]["error"] and records[0]["score"] == pytest.approx(
        _local_scores(scoring / "model", names[:1])[names[0]], rel=1e-6)


def test_benchmark_on_ray_equals_local_despite_a_killed_worker(ray_cluster, tmp_path):
    data = tmp_path / "data"
    generate(data, SynthSpec(size=64, n_train=16, n_test_good=4, n_test_per_defect=2))
    models, categories = ["gaussian", "padim"], ["synthetic_object", "synthetic_texture"]
    settings = {"image_size": "32"}
    out = tmp_path / "ray"
    killed: list[int] = []

    def mid_pair():  # a pair task whose `flawscope fit` or `test` child is running
        for proc in psutil.process_iter():
            try:
                if "ray::_pair_task" in " ".join(proc.cmdline()) and proc.children():
                    return True
            except psutil.Error:
                pass
        return False

    thread = _kill_when("_pair_task", mid_pair, killed)
    rows = cluster.run_benchmark(data, models, categories, out, settings=settings)
    thread.join()
    assert killed, "no benchmark worker was found to kill"
    assert [(r["model"], r["category"], r["status"]) for r in rows] == [
        (m, c, "ok") for m in models for c in categories]
    for m in models:
        for c in categories:
            with open(out / m / c / "scores.csv") as f:
                assert len(list(csv.DictReader(f))) == 4 + 4 * 2  # every test image
            assert json.loads((out / m / c / "metrics.json").read_text())["image_auroc"] >= 0
    assert (out / "results.csv").is_file() and (out / "report.html").is_file()
    # The gaussian pairs fitted and tested here, in this process, give the same scores.
    for c in categories:
        local = Detector.fit(data / c, model="gaussian", image_size=32).evaluate(data / c)
        _, ray_scores, _ = results.read_scores(out / "gaussian" / c)
        np.testing.assert_allclose(ray_scores, local.scores, rtol=1e-6)  # .9g in scores.csv
    # A rerun skips every finished pair.
    lines: list[str] = []
    cluster.run_benchmark(data, ["gaussian"], categories, out, settings=settings,
                          progress=lines.append)
    assert sum("results exist, skipped" in line for line in lines) == 2
    assert any("submitted 0 pair(s)" in line for line in lines)


def test_a_failing_pair_on_ray_is_recorded(ray_cluster, tmp_path):
    broken = tmp_path / "data" / "broken_part"
    for split in ("train", "test"):
        (broken / split / "good").mkdir(parents=True)
        (broken / split / "good" / "000.png").write_bytes(b"not a png")
    rows = cluster.run_benchmark(tmp_path / "data", ["gaussian"], None, tmp_path / "out")
    assert [r["status"] for r in rows] == ["failed"]
    assert "flawscope fit failed" in results.read_error(tmp_path / "out" / "gaussian" /
                                                         "broken_part")


def test_benchmark_with_ray_rejects_a_typo_before_starting_ray(tmp_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["benchmark", "--data", str(tmp_path), "--models",
                                      "gausian", "--out", str(tmp_path / "o"), "--ray"])
    assert result.exit_code == 1 and "gausian" in result.output
