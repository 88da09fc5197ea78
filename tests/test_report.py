"""The benchmark report: resumable benchmark, failures recorded, report.html correct in a real
browser, report rebuilt from saved results alone, reconstruction and sample pictures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from flawscope import results
from flawscope.benchmark import run_benchmark
from flawscope.cli import cli
from flawscope.gallery import ASSETS_DIR, save_report_assets, select_gallery
from flawscope.models.base import AnomalyModel
from flawscope.pipeline import evaluate
from flawscope.report import build_report, summary_table
from flawscope.synth import SynthSpec, generate

CATEGORIES = ["synthetic_texture", "broken", "synthetic_object"]
CSP = "default-src 'none';"

# Injected at the top of <head> by the browser check: records every failed resource, script
# error, console.error and CSP violation, and on load writes the result into the DOM, where
# `chromium --dump-dom` shows it.
CHECK_SCRIPT = """<script>
window.__problems = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__problems.push(t && t.tagName ? 'failed to load ' + t.tagName + ' ' + (t.alt || '')
                                        : 'script error: ' + e.message);
}, true);
window.addEventListener('securitypolicyviolation', function (e) {
  window.__problems.push('blocked by CSP: ' + e.blockedURI);
});
var origError = console.error;
console.error = function () {
  window.__problems.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  origError.apply(console, arguments);
};
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.alt; });
  var pre = document.createElement('pre');
  pre.id = 'flawscope-check';
  pre.textContent = JSON.stringify({images: images.length, broken: broken,
                                    problems: window.__problems});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is required in CI (.ci/run installs it)")
    pytest.skip("chromium not installed (apt-get install -y chromium); report not checked "
                "in a browser")


def browser_check(report: Path) -> tuple[dict, str]:
    """Open a copy of ``report`` (with the check script) in headless Chromium, no network.

    Returns the check's result and Chromium's stderr (console messages are logged there).
    """
    binary = chromium()
    html = report.read_text(encoding="utf-8")
    assert CSP in html, "the report must forbid loading anything but inline data"
    html = html.replace(CSP, CSP + " script-src 'unsafe-inline';", 1)
    html = html.replace("<head>", "<head>\n" + CHECK_SCRIPT, 1)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(html, encoding="utf-8")
        proc = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", f"--user-data-dir={tmp}/profile",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
             "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="flawscope-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"page did not finish loading in chromium: {proc.stderr[-2000:]}"
    text = found.group(1).replace("&quot;", '"').replace("&amp;", "&")
    text = text.replace("&lt;", "<").replace("&gt;", ">")
    return json.loads(text), proc.stderr


def assert_renders_cleanly(report: Path, min_images: int) -> None:
    result, stderr = browser_check(report)
    assert result["broken"] == [], f"images that did not load: {result['broken']}"
    assert result["problems"] == [], result["problems"]
    assert result["images"] >= min_images
    console = [line for line in stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    assert not re.search(r'(src|href)="(https?:)?//', report.read_text()), "no network links"


# ---------------------------------------------------------------------- the benchmark run
@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    """A gaussian benchmark on three tiny categories, killed once midway and then resumed.

    ``broken`` is synthetic_object with one truncated training image: its fit raises, as a
    model raising on one category would.
    """
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    generate(data, SynthSpec(size=64, n_train=12, n_test_good=4, n_test_per_defect=2, seed=3))
    shutil.copytree(data / "synthetic_object", data / "broken")
    victim = sorted((data / "broken" / "train" / "good").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = root / "out"

    # First run: kill the whole process tree (like a power cut) once the first pair is done.
    args = [sys.executable, "-m", "flawscope", "benchmark", "--data", str(data),
            "--models", "gaussian", "--categories", ",".join(CATEGORIES), "--out", str(out)]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = out / "gaussian" / CATEGORIES[0] / "metrics.json"
    deadline = time.monotonic() + 240
    try:
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first.exists(), "the first pair never finished"
    interrupted_before_end = not (out / "gaussian" / CATEGORIES[2] / "metrics.json").exists()
    first_mtime = first.stat().st_mtime_ns

    rows = run_benchmark(data, ["gaussian"], CATEGORIES, out)  # the resumed run
    return {"data": data, "out": out, "rows": rows, "first_mtime": first_mtime,
            "interrupted_before_end": interrupted_before_end}


def test_interrupted_benchmark_resumes_without_redoing_finished_pairs(bench):
    assert bench["interrupted_before_end"]
    folder = bench["out"] / "gaussian" / CATEGORIES[0]
    assert (folder / "metrics.json").stat().st_mtime_ns == bench["first_mtime"]
    assert (folder / "log.txt").read_text().count("fitted gaussian") == 1  # fitted once
    status = {r["category"]: r["status"] for r in bench["rows"]}
    assert status == {"synthetic_texture": "ok", "broken": "failed", "synthetic_object": "ok"}


def test_failing_pair_is_recorded_and_the_rest_is_intact(bench):
    out = bench["out"]
    error = (out / "gaussian" / "broken" / "error.txt").read_text()
    assert "corrupt or truncated" in error
    for category in ("synthetic_texture", "synthetic_object"):
        metrics = json.loads((out / "gaussian" / category / "metrics.json").read_text())
        assert metrics["image_auroc"] > 0.5
        assets = json.loads((out / "gaussian" / category / ASSETS_DIR / "assets.json")
                            .read_text())
        assert assets["gallery"]["false_alarms"] and assets["gallery"]["examples"]
        assert assets["reconstructions"] is None  # gaussian does not reconstruct
    html = (out / "report.html").read_text()
    assert "corrupt or truncated" in html
    assert 'class="failed"' in html
    for category in ("synthetic_texture", "synthetic_object"):
        assert f'id="cat-{category}"' in html
    assert "Image AUROC per defect type" in html and "missing_piece" in html


def test_report_loads_in_chromium_without_errors(bench):
    # Per ok category: ROC, PR, histogram, bar chart and 2 pictures per gallery entry.
    assert_renders_cleanly(bench["out"] / "report.html", min_images=2 * (4 + 2 * 4))


def test_report_rebuilds_from_saved_results_without_models(bench, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(bench["out"], copy)
    for model_dir in copy.glob("*/*/model"):
        shutil.rmtree(model_dir)  # nothing left that could be re-run
    (copy / "report.html").unlink()
    result = CliRunner().invoke(cli, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    html = (copy / "report.html").read_text()
    metrics = json.loads((copy / "gaussian" / "synthetic_object" / "metrics.json").read_text())
    assert f"{metrics['image_auroc']:.3f}" in html
    assert "corrupt or truncated" in html
    # The decision beside AUROC: rates at the stored threshold and what it rests on.
    assert "detection rate at the stored threshold" in html
    assert results.decision_summary(metrics) in html
    empty = CliRunner().invoke(cli, ["report", str(tmp_path / "results" / "gaussian")])
    assert empty.exit_code == 1 and "no results found" in empty.output


# ---------------------------------------------------------------------- smaller pieces
def test_gallery_picks_false_alarms_misses_and_typical_examples():
    scores = np.array([0.1, 0.9, 0.3, 0.2, 0.8, 0.5, 0.7, 0.6])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    types = ["good", "good", "good", "cut", "cut", "hole", "hole", "hole"]
    chosen = select_gallery(scores, labels, types, k=2)
    assert chosen["false_alarms"] == [1, 2]  # highest good scores first
    assert chosen["misses"] == [3, 5]  # lowest defective scores first
    assert chosen["examples"] == [3, 7]  # median of each type (lower median for two)


def test_summary_marks_the_best_model_per_row():
    from flawscope.report import PairResult

    def pair(model, auroc, fit_s, category="c"):
        return PairResult(model, category, Path("."), "ok",
                          metrics={"image_auroc": auroc, "fit_s": fit_s})

    pairs = {("a", "c"): pair("a", 0.9, 5.0), ("b", "c"): pair("b", 0.8, 1.0),
             ("x", "c"): PairResult("x", "c", Path("."), "failed", error="boom")}
    [group] = summary_table(pairs, ["a", "b", "x"], ["c"])
    rows = {r["label"]: r for r in group["rows"]}
    assert [c["best"] for c in rows["image AUROC"]["cells"]] == [True, False, False]
    assert [c["best"] for c in rows["fit time (s)"]["cells"]] == [False, True, False]
    pairs[("a", "c")].metrics |= {"detection_rate": 0.43, "false_alarm_rate": 0.029,
                                  "threshold_n_good": 4}
    [group] = summary_table(pairs, ["a", "b", "x"], ["c"])
    rows = {r["label"]: r for r in group["rows"]}
    assert rows["detection rate at the stored threshold"]["cells"][0]["text"] == "43.0%"
    assert rows["false-alarm rate at the stored threshold"]["cells"][0]["text"] == "2.9%"
    assert rows["good images the threshold rests on"]["cells"][0]["text"] == "4"
    assert group["status"] == ["ok", "ok", "failed"] and group["errors"][2] == "boom"

    # Means only over the categories every model finished (here only "d").
    pairs |= {("a", "d"): pair("a", 0.5, 1.0, "d"), ("b", "d"): pair("b", 0.7, 1.0, "d"),
              ("x", "d"): pair("x", 0.6, 1.0, "d")}
    *_, mean = summary_table(pairs, ["a", "b", "x"], ["c", "d"])
    assert mean["name"].endswith("every model finished (d)")
    assert [c["text"] for c in mean["rows"][0]["cells"]] == ["0.500", "0.700", "0.600"]


class _Reconstructor(AnomalyModel):
    """Test-only model that reconstructs (a blur) and generates samples, like f-AnoGAN."""

    name = "test_reconstructor"

    class Config:  # noqa: D106 - minimal config
        image_size = 64
        seed = 0

    def fit(self, images, workdir=None):
        pass

    def reconstruct(self, images):
        return torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2,
                                              count_include_pad=False)

    def score_batch(self, images):
        maps = (images - self.reconstruct(images)).abs().mean(1)
        return maps.flatten(1).amax(1), maps

    def sample(self, n):
        return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def state_tensors(self):
        return {}

    def load_state_tensors(self, tensors):
        pass

    def config_dict(self):
        return {"image_size": 64, "seed": 0}


def test_reconstructions_and_samples_reach_the_report(tmp_path):
    generate(tmp_path / "data", SynthSpec(size=64, n_train=2, n_test_good=3,
                                          n_test_per_defect=1, seed=5), ["synthetic_object"])
    model = _Reconstructor()
    evaluation = evaluate(model, tmp_path / "data" / "synthetic_object", pixel_size=64)
    folder = tmp_path / "out" / model.name / "synthetic_object"
    model_dir = folder / "model"
    (model_dir / "training").mkdir(parents=True)
    Image.new("RGB", (40, 30), "white").save(model_dir / "training" / "losses.png")
    save_report_assets(model, {}, evaluation, folder, model_dir)
    (folder / "scores.csv").write_text(
        "path,defect_type,label,score\n" + "".join(
            f"{p},{t},{lab},{s}\n" for p, t, lab, s in zip(
                evaluation.paths, evaluation.defect_types, evaluation.labels,
                evaluation.scores, strict=True)))
    (folder / "metrics.json").write_text(json.dumps(
        evaluation.metrics | {"model": model.name, "n_images": len(evaluation.scores)}))
    assets = json.loads((folder / ASSETS_DIR / "assets.json").read_text())
    rows = assets["reconstructions"]["rows"]
    assert len(rows) == 2 + 4  # two good images + one per defect type
    for row in rows:
        for key in ("original", "reconstruction", "residual"):
            assert (folder / ASSETS_DIR / row[key]).is_file()
    assert assets["samples"]["source"].endswith("sample(16)")
    assert [t["source"] for t in assets["training"]] == ["losses.png"]
    html = build_report(tmp_path / "out").read_text()
    assert "Original / reconstruction / residual" in html and "Generated samples" in html
    assert "<h4>Training</h4>" in html
    assert_renders_cleanly(tmp_path / "out" / "report.html",
                           min_images=4 + 2 * 6 + 3 * 6 + 1 + 1)


def test_samples_fall_back_to_pictures_from_training(tmp_path):
    """A generative model without ``sample()`` still shows the newest sample grid it drew."""
    from flawscope.gallery import _samples

    (tmp_path / "model" / "training").mkdir(parents=True)
    for epoch in (1, 2):
        Image.new("RGB", (8, 8), (epoch, 0, 0)).save(
            tmp_path / "model" / "training" / f"stage1_samples_epoch{epoch:05d}.png")
    (tmp_path / "assets").mkdir()
    found = _samples(object(), tmp_path / "model", tmp_path / "assets")
    assert found["source"] == "training picture stage1_samples_epoch00002.png"
    assert Image.open(tmp_path / "assets" / found["image"]).getpixel((0, 0)) == (2, 0, 0)
    assert _samples(object(), None, tmp_path / "assets") is None


class _BrokenSampler(_Reconstructor):
    name = "test_broken_sampler"

    def sample(self, n):
        raise RuntimeError("generator exploded")


def test_a_broken_picture_hook_does_not_lose_the_results(tmp_path):
    generate(tmp_path / "data", SynthSpec(size=32, n_train=2, n_test_good=2,
                                          n_test_per_defect=1, seed=6), ["synthetic_texture"])
    model = _BrokenSampler()
    evaluation = evaluate(model, tmp_path / "data" / "synthetic_texture", pixel_size=32)
    folder = save_report_assets(model, {}, evaluation, tmp_path / "out")
    assets = json.loads((folder / "assets.json").read_text())
    assert assets["samples"] is None
    assert assets["problems"] == ["samples: RuntimeError: generator exploded"]
    assert assets["gallery"]["examples"] and assets["reconstructions"]["rows"]
