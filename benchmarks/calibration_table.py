"""Do thresholds set from good images keep their false-alarm target on real data?

For every category under --data and every model: fit once with the old calibration (10% of
train/good held out of the fit and scored; thresholds by the old estimators: conformal
quantile, else the Gaussian tail) and once with the new one (leave-one-out: fitted on every
good image, each scored as if left out; conformal quantile, else the generalized-Pareto
tail), and score test/ with each model. Then, for each
target false-alarm rate, set the threshold from the calibration scores alone
(:func:`flawscope.threshold.from_good_scores`) and report on test/good the observed false
alarms (count / n) with their Clopper-Pearson 95% interval, and on the defective test images
the detection rate at that threshold beside the detection rate of an oracle threshold tuned on
test/good to the same target (the largest threshold that flags at most floor(target * n) of
test/good). Pooled over the categories: is the observed count inside the central 95% range of
Binomial(pooled n, target), and is the detection rate within 0.05 of the oracle's?

A second table measures the tail estimators where calibration scores are too few for the
target (n < 1/target - 1): from the leave-one-out scores of the categories with many good
images, draw n of them as calibration, set the threshold with the generalized-Pareto and with
the Gaussian tail, and measure the false-alarm rate on the other scores of the category.

Scores are cached per model and category (--cache), so the tables can be printed again with
other targets without refitting:

    flock /tmp/flawscope-bench.lock python benchmarks/calibration_table.py \\
        --data /work/shared/datasets --models patchcore,padim --targets 0.01,0.05

Wrap it in `flock /tmp/flawscope-bench.lock ...` on shared machines (it fits 4 models per
category and scores every test image twice).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

CATEGORIES = ("mvtec_ad/screw", "mvtec_ad/toothbrush", "magnetic_tile/magnetic_tile",
              "battery_weld/welding")


def collect(data: Path, category: str, model_name: str, method: str, cache: Path) -> dict:
    """Fit and calibrate by ``method``, score test/; cached as JSON."""
    from flawscope.calibration import calibrate
    from flawscope.data import open_category
    from flawscope.models import get_model_class
    from flawscope.pipeline import score_paths

    path = cache / f"{category.replace('/', '_')}-{model_name}-{method}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cat = open_category(data / category)
    start = time.perf_counter()
    result = calibrate(lambda: get_model_class(model_name).from_settings(), cat.train,
                       method=method, holdout=0.1, seed=0)
    calibrate_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, _ = score_paths(result.model, [t.path for t in cat.test], desc="test")
    record = {"category": category, "model": model_name, "method": method,
              "n_fit": result.n_fit, "fit_s": result.fit_s, "calibrate_s": calibrate_s,
              "test_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
              "calibration": result.calibration["scores"],
              "test_scores": [float(s) for s in scores],
              "labels": [int(t.is_anomalous) for t in cat.test]}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    print(f"  {category} {model_name} {method}: fit {result.fit_s:.0f} s, calibrate+fit "
          f"{calibrate_s:.0f} s, test {record['test_s']:.0f} s", flush=True)
    return record


def oracle_detection(good: np.ndarray, bad: np.ndarray, target: float) -> float:
    """Detection rate of the largest threshold flagging at most floor(target * n) good."""
    allowed = math.floor(target * len(good) + 1e-9)
    t = np.sort(good)[len(good) - allowed - 1]
    return float(np.mean(bad > t))


def old_threshold(scores: list[float], target: float) -> dict:
    """The threshold as flawscope set it before leave-one-out: the conformal quantile, or
    below 1/target - 1 scores the Gaussian tail (mean + z std, at least the highest)."""
    from flawscope import threshold as th

    n = len(scores)
    if n >= th.images_needed(target):
        return th.from_good_scores(scores, target)
    return th.manual(th.gaussian_tail(scores, target)) | {"method": "good_gaussian_tail",
                                                          "max_false_alarm": target}


def binomial_range(n: int, p: float) -> tuple[int, int]:
    """Central 95% range of Binomial(n, p) (2.5% and 97.5% quantiles)."""
    from scipy.stats import binom

    return int(binom.ppf(0.025, n, p)), int(binom.ppf(0.975, n, p))


def threshold_table(records: list[dict], targets: list[float], models: list[str],
                    methods: list[str]) -> None:
    from flawscope import threshold as th

    print("\n| model | target | calibration | category | n cal | method | false alarms | "
          "95% CI | detection | oracle detection |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pooled_lines = []
    for model in models:
        for target in targets:
            for method in methods:
                fa = n_good = det = n_bad = 0
                oracle_det = 0.0
                for rec in records:
                    if rec["model"] != model or rec["method"] != method:
                        continue
                    labels = np.array(rec["labels"])
                    scores = np.array(rec["test_scores"])
                    record = (old_threshold(rec["calibration"], target) if method == "holdout"
                              else th.from_good_scores(rec["calibration"], target))
                    r = th.rates(record, labels, scores)
                    good, bad = scores[labels == 0], scores[labels == 1]
                    oracle = oracle_detection(good, bad, target)
                    name = rec["category"].split("/")[-1]
                    ci = r.get("false_alarm_ci") or (None, None)
                    print(f"| {model} | {target:.0%} | {method} | {name} | "
                          f"{len(rec['calibration'])} | {record['method']} | "
                          f"{r.get('false_alarms')}/{r.get('n_good')} | "
                          f"{_ci(ci)} | {_pct(r['detection_rate'])} | {_pct(oracle)} |")
                    if r.get("false_alarms") is not None:
                        fa += r["false_alarms"]
                        n_good += r["n_good"]
                        det += r["detections"]
                        n_bad += r["n_defective"]
                        oracle_det += oracle * len(bad)
                if not n_good:
                    continue
                lo, hi = binomial_range(n_good, target)
                ci = th.clopper_pearson(fa, n_good)
                pooled_lines.append(
                    f"| {model} | {target:.0%} | {method} | {fa}/{n_good} ({fa / n_good:.1%}) | "
                    f"{_ci(ci)} | {lo}..{hi} | {'yes' if lo <= fa <= hi else 'NO'} | "
                    f"{det / n_bad:.1%} | {oracle_det / n_bad:.1%} | "
                    f"{'yes' if abs(det - oracle_det) / n_bad <= 0.05 else 'NO'} |")
    print("\nPooled over the categories:\n")
    print("| model | target | calibration | false alarms | 95% CI | binomial 95% range | "
          "inside | detection | oracle detection | within 0.05 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(pooled_lines))


def tail_table(records: list[dict], target: float, sizes: list[int], draws: int) -> None:
    """Realized false-alarm rate of the tail estimators from n leave-one-out scores."""
    from flawscope import threshold as th

    print(f"\nTail estimators at a {target:.0%} target, calibration drawn from leave-one-out "
          f"scores ({draws} draws; false-alarm rate measured on the category's other scores):\n")
    print("| model | category | n | estimator | mean false-alarm rate | draws above 2x target "
          "| mean stated upper bound |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for rec in records:
        pool = np.array(rec["calibration"])
        if rec["method"] != "loo" or len(pool) < 300:
            continue
        for n in sizes:
            rows = {"gpd": [], "gaussian": []}
            bounds = []
            for _ in range(draws):
                pick = rng.permutation(len(pool))
                cal, rest = pool[pick[:n]], pool[pick[n:]]
                gpd = th.from_good_scores(cal, target)
                rows["gpd"].append(np.mean(rest > gpd["value"]))
                bounds.append(gpd.get("false_alarm_upper") or np.nan)
                rows["gaussian"].append(np.mean(rest > th.gaussian_tail(cal, target)))
            for name, fa in rows.items():
                fa = np.array(fa)
                bound = f"{np.nanmean(bounds):.1%}" if name == "gpd" else "-"
                print(f"| {rec['model']} | {rec['category'].split('/')[-1]} | {n} | {name} | "
                      f"{fa.mean():.2%} | {np.mean(fa > 2 * target):.0%} | {bound} |")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _ci(ci) -> str:
    return "-" if ci[0] is None else f"[{ci[0]:.1%}, {ci[1]:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/datasets"))
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--targets", default="0.01,0.05")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/flawscope-calibration"))
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--cached-only", action="store_true",
                        help="print the tables from the cached fits only (nothing is fitted)")
    parser.add_argument("--methods", default="holdout,loo",
                        help="calibrations to compare: holdout (thresholds by the old "
                             "estimators), loo, kfold (both by the new ones)")
    parser.add_argument("--tail-sizes", default="20,40,60")
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    models = args.models.split(",")
    methods = args.methods.split(",")
    import platform

    from flawscope.gallery import cpu_model

    print(f"CPU: {cpu_model()} ({platform.machine()}), torch threads: {torch.get_num_threads()}",
          flush=True)
    records = []
    for category in args.categories.split(","):
        if not (args.data / category).is_dir():
            print(f"  skipping {category}: not found under {args.data}")
            continue
        for model in models:
            for method in methods:
                path = args.cache / f"{category.replace('/', '_')}-{model}-{method}.json"
                if args.cached_only and not path.is_file():
                    print(f"  not cached yet: {category} {model} {method}")
                    continue
                records.append(collect(args.data, category, model, method, args.cache))
    if args.collect_only:
        return
    threshold_table(records, [float(t) for t in args.targets.split(",")], models, methods)
    tail_table(records, 0.01, [int(n) for n in args.tail_sizes.split(",")], args.draws)


if __name__ == "__main__":
    main()
