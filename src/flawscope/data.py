"""Reading datasets in the MVTec AD layout, with errors a user can act on.

A *category* folder looks like::

    train/good/*.png                      good images only: what "normal" means
    test/good/*.png                       good test images (their masks are all zero)
    test/<defect_type>/*.png              defective test images
    ground_truth/<defect_type>/<stem>_mask.png

A *root* folder holds several categories side by side (symlinks are followed).
Images may be grayscale or RGB, PNG/JPEG/BMP/TIFF, of different sizes; everything is
delivered as RGB resized to the model's square input size (masks with nearest neighbour,
binarized), because every model in flawscope works on a fixed-size 3-channel tensor.
Nothing is ever written into a dataset folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
#: Files that operating systems and tools drop into folders; skipped with a warning.
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", ".gitkeep", ".directory"}
#: Largest image accepted, in pixels. Larger files are refused before decoding, which
#: protects against decompression bombs (a tiny PNG that expands to gigabytes).
DEFAULT_MAX_PIXELS = int(os.environ.get("FLAWSCOPE_MAX_PIXELS", 64_000_000))
GOOD = "good"


@dataclass(frozen=True)
class TestImage:
    """One test image with its label: ``defect_type`` is ``"good"`` for normal images."""

    __test__ = False  # not a pytest test class

    path: Path
    defect_type: str
    mask_path: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != GOOD


@dataclass
class Category:
    """The files of one category, found and checked, but not yet decoded."""

    name: str
    root: Path
    train: list[Path]
    test: list[TestImage] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({t.defect_type for t in self.test if t.is_anomalous})

    def require_test(self) -> list[TestImage]:
        """The test images, or a clear error if this category has none to evaluate on."""
        if not self.test:
            raise DataError(f"{self.root / 'test'}: no test images (need test/good and/or "
                            "test/<defect_type> folders with images)")
        return self.test


def _is_junk(path: Path) -> bool:
    return path.name.lower() in JUNK_NAMES or path.name.startswith("._")


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder``, sorted; junk skipped with a warning, anything else refused."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    images = []
    for path in sorted(folder.iterdir()):
        if _is_junk(path):
            log.warning("skipping %s (not an image)", path)
        elif path.is_dir():
            log.warning("skipping sub-folder %s", path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            raise DataError(f"{path}: not an image file (expected one of "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    if not images:
        raise DataError(f"{folder}: folder contains no images")
    return images


def _find_mask(category_root: Path, image: Path, defect_type: str) -> Path:
    folder = category_root / "ground_truth" / defect_type
    for suffix in (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"):
        for name in (f"{image.stem}_mask{suffix}", f"{image.stem}{suffix}"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{image}: defective test image has no mask "
                    f"(expected {folder / (image.stem + '_mask.png')})")


def open_category(path: str | Path) -> Category:
    """Find and check the files of one category folder (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: category folder not found")
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"{root}: missing train/good folder (is this an MVTec-layout "
                        "category folder? a root of several categories needs --categories)")
    train = list_images(train_dir)
    test: list[TestImage] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for image in list_images(sub):
                if sub.name == GOOD:
                    test.append(TestImage(image, GOOD))
                else:
                    test.append(TestImage(image, sub.name, _find_mask(root, image, sub.name)))
    for item in test:
        if item.mask_path is not None:
            _check_mask_size(item)
    return Category(name=root.name, root=root, train=train, test=test)


def find_categories(root: str | Path) -> list[Path]:
    """Category folders under ``root`` (or ``root`` itself if it is one), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    if (root / "train").is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "train" / GOOD).is_dir())
    if not found:
        raise DataError(f"{root}: no category folders (none has train/good)")
    return found


def _header_size(path: Path, max_pixels: int) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            size = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if size[0] * size[1] > max_pixels:
        raise DataError(f"{path}: image is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, "
                        f"over the limit of {max_pixels:,} (set FLAWSCOPE_MAX_PIXELS to raise it)")
    return size


def _check_mask_size(item: TestImage) -> None:
    image_size = _header_size(item.path, DEFAULT_MAX_PIXELS)
    mask_size = _header_size(item.mask_path, DEFAULT_MAX_PIXELS)
    if image_size != mask_size:
        raise DataError(f"{item.mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image "
                        f"{item.path} is {image_size[0]}x{image_size[1]}")


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully into RGB, refusing corrupt, truncated and oversized files."""
    path = Path(path)
    _header_size(path, max_pixels)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of any PIL mode, mapping 16-bit and float grayscale onto 0..255."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    return im.convert("RGB")


def read_mask(path: str | Path, size: int | None = None) -> np.ndarray:
    """Binary mask as bool array, optionally resized (nearest neighbour) to ``size`` x ``size``."""
    path = Path(path)
    _header_size(path, DEFAULT_MAX_PIXELS)
    try:
        with Image.open(path) as im:
            im.load()
            mask = im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated mask ({exc})") from None
    if size is not None:
        mask = mask.resize((size, size), Image.NEAREST)
    arr = np.asarray(mask)
    # 0/255 masks are the norm; some tools write 0/1.
    return arr >= 128 if arr.max() > 1 else arr > 0


def image_to_tensor(im: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, size, size) in [0, 1] (bilinear, antialiased)."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of paths as (3, size, size) tensors in [0, 1]."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return image_to_tensor(read_image(self.paths[index]), self.size)


class TestDataset(torch.utils.data.Dataset):
    """Test images with their masks: (image tensor, bool mask (mask_size²), index)."""

    __test__ = False  # not a pytest test class

    def __init__(self, items: Sequence[TestImage], size: int, mask_size: int):
        self.items = list(items)
        self.size = size
        self.mask_size = mask_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        image = image_to_tensor(read_image(item.path), self.size)
        if item.mask_path is None:
            mask = np.zeros((self.mask_size, self.mask_size), dtype=bool)
        else:
            mask = read_mask(item.mask_path, self.mask_size)
        return image, torch.from_numpy(mask), index
