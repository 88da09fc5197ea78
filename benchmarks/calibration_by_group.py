"""False alarms by group of images: are test/good images flagged more than calibration
predicted because they are a different mix of images?

Reads the scores cached by ``benchmarks/calibration_table.py`` (``--collect-only``; the
calibration scores of the training images in ``train/good`` order, the test scores in
``test/`` order) and each image's size from its header. For each target rate, the threshold
is set from the calibration scores (:func:`flawscope.threshold.from_good_scores`, as
``flawscope fit`` does), then the share of good images above it is reported per group, for
the calibration images (leave-one-out scores) and for test/good. Groups: ``--groups size``
(the image's longer side below ``--small`` px or not) or ``--groups prefix`` (the file name
up to its first ``_``, e.g. the acquisition batch ``exp3`` of ``exp3_num_12.jpg``). If each
group's rate is the same in both sets while the pooled rates differ, the excess false alarms
come from test/good holding more images of a group that scores higher; if one group's rate
differs between the sets, its test images differ from its training images.

    python benchmarks/calibration_by_group.py --data /work/shared/datasets \\
        --category magnetic_tile/magnetic_tile --models patchcore,padim --groups prefix
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from flawscope.data import open_category
from flawscope.threshold import from_good_scores


def group_of(path: Path, groups: str, small: int) -> str:
    if groups == "prefix":
        return path.name.split("_", 1)[0]
    with Image.open(path) as im:
        return f"< {small} px" if max(im.size) < small else f">= {small} px"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--category", default="magnetic_tile/magnetic_tile")
    ap.add_argument("--models", default="patchcore,padim")
    ap.add_argument("--method", default="loo", help="calibration of the cached fit")
    ap.add_argument("--targets", default="0.01,0.05")
    ap.add_argument("--groups", choices=("size", "prefix"), default="size")
    ap.add_argument("--small", type=int, default=400, help="longer side below this = small")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/flawscope-calibration"))
    args = ap.parse_args()
    cat = open_category(args.data / args.category)
    train_group = np.array([group_of(p, args.groups, args.small) for p in cat.train])
    good = [t for t in cat.test if not t.is_anomalous]
    test_group = np.array([group_of(t.path, args.groups, args.small) for t in good])
    names = sorted(set(train_group) | set(test_group))
    print(f"{args.category}: " + ", ".join(
        f"{g}: {(train_group == g).mean():.0%} of train/good, {(test_group == g).mean():.0%} "
        "of test/good" for g in names))
    print("| model | target | set | all | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for model in args.models.split(","):
        path = args.cache / f"{args.category.replace('/', '_')}-{model}-{args.method}.json"
        record = json.loads(path.read_text())
        calibration = np.array(record["calibration"])
        if len(calibration) != len(cat.train):
            raise SystemExit(f"{path}: {len(calibration)} calibration scores for "
                             f"{len(cat.train)} training images (a holdout fit? use loo)")
        test = np.array([s for s, t in zip(record["test_scores"], cat.test, strict=True)
                         if not t.is_anomalous])
        for target in (float(t) for t in args.targets.split(",")):
            threshold = from_good_scores(calibration.tolist(), target)["value"]
            for name, scores, group in (("calibration (LOO)", calibration, train_group),
                                        ("test/good", test, test_group)):
                flagged = scores > threshold
                masks = [np.ones(len(group), bool)] + [group == g for g in names]
                cells = [f"{flagged[m].sum()}/{m.sum()} ({flagged[m].mean():.1%})"
                         if m.any() else "-" for m in masks]
                print(f"| {model} | {target:.0%} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
