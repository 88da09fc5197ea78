"""Does the per-pixel ``gaussian`` baseline detect a category's defects by brightness or by
structure?

The per-pixel Gaussian scores a pixel by how far its intensity lies from that pixel's mean
over the good training images. ``flawscope.models.gaussian`` itself (its defaults: 128 px,
2-px smoothing of the map, image score its maximum) is fitted here on three versions of
every image:

- ``raw``: the image itself;
- ``brightness``: the image blurred with a Gaussian of ``s`` pixels, i.e. only its local
  mean (local structure removed);
- ``structure``: the image minus that blur, i.e. only its local structure (local mean
  removed).

When ``brightness`` keeps the raw image AUROC and ``structure`` loses it, the defects are
changes of local brightness at fixed places, which SSIM (Wang et al. 2004: luminance
compared only through ``(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)``, 0.98 for a 20%
brighter patch at mid-grey) hardly sees: the reason ``ae_ssim`` cannot reach the baseline
on such a category.

    python benchmarks/brightness_or_structure.py ../shared/datasets/battery_weld/welding

Prints the image AUROC of each version.
"""

from __future__ import annotations

import argparse

import torch
from torchvision.transforms.functional import gaussian_blur

from flawscope.data import ImageDataset, open_category
from flawscope.metrics import image_auroc
from flawscope.models.gaussian import GaussianConfig, GaussianModel


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    size = 2 * int(4 * sigma + 0.5) + 1
    return gaussian_blur(images, [size, size], [sigma, sigma])


def per_pixel_gaussian_scores(train: torch.Tensor, test: torch.Tensor) -> list[float]:
    """Image scores of the ``gaussian`` model fitted on ``train``, for ``test``."""
    model = GaussianModel(GaussianConfig(image_size=train.shape[-1]))
    model.fit(train)
    return model.score_batch(test)[0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", help="category folder in MVTec AD layout")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--sigmas", default="2,4,8", help="blur widths in pixels")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    category = open_category(args.category)

    def load(items) -> torch.Tensor:
        data = ImageDataset(items, args.size)
        return torch.stack([data[i] for i in range(len(data))])

    train, test = load(category.train), load([t.path for t in category.test])
    labels = [int(t.is_anomalous) for t in category.test]
    print(f"{category.name}: {len(train)} good training images, {len(test)} test images, "
          f"{args.size} px, {args.threads} thread(s)")
    print(f"raw: image AUROC {image_auroc(labels, per_pixel_gaussian_scores(train, test)):.3f}")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        versions = {"brightness": lambda x, s=sigma: blur(x, s),
                    "structure": lambda x, s=sigma: x - blur(x, s) + 0.5}
        for name, version in versions.items():
            auroc = image_auroc(labels, per_pixel_gaussian_scores(version(train), version(test)))
            print(f"{name} (blur {sigma:g} px): image AUROC {auroc:.3f}")


if __name__ == "__main__":
    main()
