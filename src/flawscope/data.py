"""Reading datasets in the MVTec AD layout, with errors a user can act on.

A *category* folder looks like::

    train/good/*.png                      good images only: what "normal" means
    test/good/*.png                       good test images (their masks are all zero)
    test/<defect_type>/*.png              defective test images
    ground_truth/<defect_type>/<stem>_mask.png

Each verb reads only what it needs: fitting reads ``train/good`` (or, for a plain folder of
good images, the folder itself); testing reads ``test/`` and, where ``ground_truth/`` exists,
the masks (without it a category is evaluated at image level only).

A *root* folder holds several categories side by side, at any depth (symlinks are followed).
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
#: Shortest side of an image to inspect (``Detector.predict``, ``flawscope predict``, the
#: service), in pixels. Smaller inputs (a 1x1 thumbnail, an icon sent by mistake) carry no
#: inspectable part; every model upsamples them to its input size and would return a
#: confident but meaningless verdict. Datasets are not held to it (``min_side=1``).
MIN_SIDE = 32
GOOD = "good"
#: What the library accepts as one image: a file path, a PIL image, or an (H, W) / (H, W, 3)
#: array (uint8 0..255, or float in [0, 1]).
ImageSource = "str | os.PathLike | Image.Image | np.ndarray"


@dataclass(frozen=True)
class TestImage:
    """One test image with its label: ``defect_type`` is ``"good"`` for normal images."""

    __test__ = False  # not a pytest test class

    path: Path
    defect_type: str
    mask_path: Path | None = None  # None for good images and where ground_truth/ is absent

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != GOOD


@dataclass
class Category:
    """The files of one category, found and checked, but not yet decoded."""

    name: str
    root: Path
    train: list[Path] = field(default_factory=list)
    test: list[TestImage] = field(default_factory=list)
    #: Whether defective test images have masks (``ground_truth/`` exists): pixel metrics
    #: are computed only then.
    has_masks: bool = False

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


def list_images(folder: Path, recursive: bool = False, strict: bool = True,
                _top: bool = True) -> list[Path]:
    """Image files in ``folder``, sorted; junk skipped with a warning.

    ``strict`` (datasets): any other file is refused, because a stray file in a training
    folder usually means the wrong folder. Not strict (``predict`` on a folder a line wrote):
    other files are skipped with a warning. ``recursive`` descends into sub-folders
    (otherwise they are skipped with a warning).
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    images = []
    for path in sorted(folder.iterdir()):
        if _is_junk(path):
            log.warning("skipping %s (not an image)", path)
        elif path.is_dir():
            if recursive:
                images.extend(list_images(path, recursive=True, strict=strict, _top=False))
            else:
                log.warning("skipping sub-folder %s", path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif strict:
            raise DataError(f"{path}: not an image file (expected one of "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        else:
            log.warning("skipping %s (not an image file)", path)
    if not images and _top:
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


def open_category(path: str | Path, train: bool = True, test: bool = True) -> Category:
    """Find and check the files of one category folder (see the module docstring).

    ``train``: read ``train/good`` (required); a folder that holds images itself and has no
    ``train/`` is taken as a plain folder of good images. ``test``: read ``test/`` and the
    masks of its defective images (required where ``ground_truth/`` exists). A verb checks only
    what it reads: fitting never fails on a test-set problem, and testing needs no train/good.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: category folder not found")
    category = Category(name=root.name, root=root)
    if train:
        category.train = _train_images(root)
    if test:
        category.has_masks = (root / "ground_truth").is_dir()
        test_dir = root / "test"
        if not test_dir.is_dir():
            raise DataError(f"{root}: missing test/ folder (an MVTec-layout category has "
                            "test/good and test/<defect_type> folders)")
        for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for image in list_images(sub):
                mask = None
                if sub.name != GOOD and category.has_masks:
                    mask = _find_mask(root, image, sub.name)
                category.test.append(TestImage(image, sub.name, mask))
        for item in category.test:
            if item.mask_path is not None:
                _check_mask_size(item)
    return category


def _train_images(root: Path) -> list[Path]:
    train_dir = root / "train" / GOOD
    if train_dir.is_dir():
        return list_images(train_dir)
    if not (root / "train").exists() and any(p.suffix.lower() in IMAGE_SUFFIXES
                                             for p in root.iterdir() if p.is_file()):
        return list_images(root)  # a plain folder of good images
    raise DataError(f"{root}: missing train/good folder (expected an MVTec-layout category "
                    "folder with train/good/, or a folder of good images)")


def find_categories(root: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Category folders under ``root`` at any depth (or ``root`` itself if it is one).

    A category is a folder with ``train/good``; symlinks are followed. With ``names``, each
    name is a path relative to ``root`` (``mvtec_ad/screw``) or the folder name of exactly one
    category found (``screw``); an unknown name is an error listing what was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    found = _categories_under(root, depth=4)
    if not found:
        raise DataError(f"{root}: no category folders (none has train/good)")
    if not names:
        return found
    chosen = []
    for name in names:
        direct = root / name
        matches = ([direct] if (direct / "train" / GOOD).is_dir()
                   else [p for p in found if p.name == name])
        if len(matches) != 1:
            listing = ", ".join(str(p.relative_to(root)) for p in found)
            problem = "no such category" if not matches else "ambiguous category name"
            raise DataError(f"{root / name}: {problem}; categories under {root}: {listing}")
        chosen.append(matches[0])
    return chosen


def _categories_under(folder: Path, depth: int) -> list[Path]:
    """Folders with ``train/good`` at most ``depth`` levels down, in sorted order; the walk
    follows symlinks and does not descend into a category or a hidden folder."""
    if (folder / "train" / GOOD).is_dir():
        return [folder]
    if depth == 0:
        return []
    found = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found.extend(_categories_under(child, depth - 1))
    return found


class ImageTooLarge(DataError):
    """An image over the pixel limit."""


class ImageTooSmall(DataError):
    """An image whose shorter side is under the minimum."""


def check_dimensions(width: int, height: int, where: object,
                     max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_SIDE) -> None:
    """Refuse images too large to decode safely or too small to inspect (``where`` names
    the file or upload in the message). The one size rule of the CLI, the library and the
    service."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"{where}: image is {width}x{height} = {width * height:,} pixels, "
                            f"over the limit of {max_pixels:,} (set FLAWSCOPE_MAX_PIXELS to "
                            "raise it)")
    if min(width, height) < min_side:
        raise ImageTooSmall(f"{where}: image is {width}x{height} pixels; the shortest side "
                            f"must be at least {min_side} pixels")


def open_checked(source, where: object, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = MIN_SIDE, formats: Sequence[str] | None = None) -> Image.Image:
    """``Image.open`` of a path or file object, with the size rule applied to the header before
    anything is decoded. Pillow's own decompression-bomb limit (about 179 megapixels) is
    reported as flawscope's limit, since it lies above it."""
    try:
        im = Image.open(source, formats=formats)
    except FileNotFoundError:
        raise DataError(f"{where}: file not found") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{where}: image is over the limit of {max_pixels:,} pixels (over "
                        f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from None
    try:
        check_dimensions(*im.size, where, max_pixels, min_side)
    except DataError:
        im.close()
        raise
    return im


def _header_size(path: Path, max_pixels: int) -> tuple[int, int]:
    with open_checked(path, path, max_pixels, min_side=1) as im:
        return im.size


def _check_mask_size(item: TestImage) -> None:
    image_size = _header_size(item.path, DEFAULT_MAX_PIXELS)
    mask_size = _header_size(item.mask_path, DEFAULT_MAX_PIXELS)
    if image_size != mask_size:
        raise DataError(f"{item.mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image "
                        f"{item.path} is {image_size[0]}x{image_size[1]}")


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = 1) -> Image.Image:
    """Decode an image fully into RGB, refusing corrupt, truncated, oversized and tiny files."""
    path = Path(path)
    with open_checked(path, path, max_pixels, min_side) as im:
        try:
            im.load()
            return to_rgb(im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: corrupt or truncated image ({exc})") from None


def as_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """One image from any :data:`ImageSource` as an RGB PIL image (size rule applied)."""
    if isinstance(source, Image.Image):
        check_dimensions(*source.size, "image", max_pixels, min_side)
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return array_to_image(source, max_pixels, min_side)
    if isinstance(source, (str, os.PathLike)):
        return read_image(source, max_pixels, min_side)
    raise DataError(f"cannot read an image from a {type(source).__name__} (give a path, a PIL "
                    "image or a numpy array)")


def array_to_image(array: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS,
                   min_side: int = 1) -> Image.Image:
    """(H, W), (H, W, 1) or (H, W, 3) array -> RGB image. uint8 is taken as 0..255, floats as
    0..1 (values outside are clipped)."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise DataError(f"image array of shape {arr.shape}: expected (H, W) or (H, W, 3)")
    check_dimensions(arr.shape[1], arr.shape[0], f"image array of shape {arr.shape}", max_pixels,
                     min_side)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"image array of dtype {arr.dtype}: expected uint8 or float in [0, 1]")
        if not np.isfinite(arr).all():
            raise DataError("image array holds NaN or infinite values")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


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
    """Images (paths, PIL images or arrays) as (3, size, size) tensors in [0, 1]."""

    def __init__(self, sources: Sequence, size: int):
        self.sources = list(sources)
        self.size = size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor:
        return image_to_tensor(as_image(self.sources[index]), self.size)


class TestDataset(torch.utils.data.Dataset):
    """Test images for evaluation: ``(image tensor (3, size, size), mask, index, target)``.

    ``target`` is the ``(height, width)`` at which the image's map is compared with its mask:
    the image's own size when ``mask_size`` is None (the official MVTec protocol), else
    ``mask_size`` squared. ``mask`` is a bool array of that size, or None for good images and
    where the category has no masks. Batch with :func:`collate_test` (sizes differ).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, items: Sequence[TestImage], size: int, mask_size: int | None = None):
        self.items = list(items)
        self.size = size
        self.mask_size = mask_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        image = read_image(item.path)
        target = ((image.height, image.width) if self.mask_size is None
                  else (self.mask_size, self.mask_size))
        mask = None if item.mask_path is None else read_mask(item.mask_path, self.mask_size)
        return image_to_tensor(image, self.size), mask, index, target


def collate_test(batch: list) -> tuple[torch.Tensor, list, list[int], list[tuple[int, int]]]:
    """Stack a batch of :class:`TestDataset` items: images as one tensor, the rest as lists."""
    images, masks, indices, targets = zip(*batch, strict=True)
    return torch.stack(images), list(masks), list(indices), list(targets)
