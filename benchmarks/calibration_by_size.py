"""False alarms by image size: are test/good images flagged more than calibration predicted
because they are a different mix of images?

Reads the scores cached by ``benchmarks/calibration_table.py`` (``--collect-only``; the
calibration scores of the training images in ``train/good`` order, the test scores in
``test/`` order) and each image's size from its header. For each target rate, the threshold
is set from the calibration scores (:func:`flawscope.threshold.from_good_scores`, as
``flawscope fit`` does), then the share of good images above it is reported per size group
(the image's longer side below ``--small`` px or not), for the calibration images (leave-one-
out scores) and for test/good. If each group's rate is the same in both sets while the
pooled rates differ, the excess false alarms come from test/good holding more images of the
group that scores higher, not from a threshold that is wrong for every image.

    python benchmarks/calibration_by_size.py --data /work/shared/datasets \\
        --category magnetic_tile/magnetic_tile --models patchcore,padim --targets 0.01,0.05
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from flawscope.data import open_category
from flawscope.threshold import from_good_scores


def longer_side(path: Path) -> int:
    with Image.open(path) as im:
        return max(im.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--category", default="magnetic_tile/magnetic_tile")
    ap.add_argument("--models", default="patchcore,padim")
    ap.add_argument("--method", default="loo", help="calibration of the cached fit")
    ap.add_argument("--targets", default="0.01,0.05")
    ap.add_argument("--small", type=int, default=400, help="longer side below this = small")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/flawscope-calibration"))
    args = ap.parse_args()
    cat = open_category(args.data / args.category)
    train_small = np.array([longer_side(p) < args.small for p in cat.train])
    good = [t for t in cat.test if not t.is_anomalous]
    test_small = np.array([longer_side(t.path) < args.small for t in good])
    print(f"{args.category}: small (longer side < {args.small} px) = "
          f"{train_small.mean():.0%} of {len(train_small)} train/good, "
          f"{test_small.mean():.0%} of {len(test_small)} test/good")
    print("| model | target | set | all | small | large |")
    print("|---|---|---|---|---|---|")
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
            for name, scores, small in (("calibration (LOO)", calibration, train_small),
                                        ("test/good", test, test_small)):
                flagged = scores > threshold
                cells = [f"{flagged[m].sum()}/{m.sum()} ({flagged[m].mean():.1%})"
                         for m in (np.ones_like(small), small, ~small)]
                print(f"| {model} | {target:.0%} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
