"""Reading MVTec-layout folders, and a clear error for every kind of bad input."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.data import (
    ImageDataset,
    TestDataset,
    find_categories,
    open_category,
    read_image,
    read_mask,
)
from flawscope.errors import DataError


def _img(path: Path, size=(32, 32), mode="RGB", value=128, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value // 2, 10)).save(path, fmt)
    return path


def _mask(path: Path, size=(32, 32), box=(4, 4, 12, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = Image.new("L", size, 0)
    m.paste(255, box)
    m.save(path)
    return path


def make_category(root: Path) -> Path:
    """A tiny valid category with mixed modes, formats and sizes."""
    _img(root / "train/good/000.png")
    _img(root / "train/good/001.jpg", size=(40, 30), mode="L")
    _img(root / "train/good/002.bmp", size=(24, 24))
    _img(root / "test/good/000.png")
    _img(root / "test/crack/000.png", size=(48, 48))
    _mask(root / "ground_truth/crack/000_mask.png", size=(48, 48))
    return root


def test_reads_a_valid_category_with_mixed_images(tmp_path):
    cat = open_category(make_category(tmp_path / "part"))
    assert cat.name == "part"
    assert [p.name for p in cat.train] == ["000.png", "001.jpg", "002.bmp"]
    assert [(t.path.name, t.defect_type, t.is_anomalous) for t in cat.test] == [
        ("000.png", "crack", True), ("000.png", "good", False)]
    assert cat.defect_types == ["crack"]
    images = ImageDataset(cat.train, 16)
    assert all(images[i].shape == (3, 16, 16) for i in range(len(images)))
    assert 0.0 <= float(images[1].min()) and float(images[1].max()) <= 1.0


def test_test_dataset_gives_no_mask_for_good_and_binary_resized_masks(tmp_path):
    cat = open_category(make_category(tmp_path / "part"))
    data = TestDataset(cat.test, size=16, mask_size=24)
    image, mask, index, target = data[0]  # crack: 48x48 mask, 8x8 box at (4,4) -> 4x4 at 24 px
    assert image.shape == (3, 16, 16) and index == 0 and target == (24, 24)
    assert mask.dtype == bool and mask.shape == (24, 24)
    assert int(mask.sum()) == 16 and bool(mask[2:6, 2:6].all())
    _, good_mask, _, _ = data[1]
    assert good_mask is None
    native = TestDataset(cat.test, size=16)  # masks at their own size (48x48 here)
    _, mask, _, target = native[0]
    assert mask.shape == target == (48, 48) and int(mask.sum()) == 64


def test_grayscale_16_bit_images_are_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    value = np.asarray(read_image(path))[0, 0, 0]
    assert 126 <= value <= 129


def test_mask_with_values_0_and_1_is_read_as_binary(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.eye(4, dtype=np.uint8)).save(path)
    assert read_mask(path).sum() == 4


def test_root_of_categories_follows_symlinks(tmp_path):
    make_category(tmp_path / "store" / "a")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "store" / "a", root / "linked")
    make_category(root / "b")
    assert [p.name for p in find_categories(root)] == ["b", "linked"]
    assert find_categories(root / "b") == [root / "b"]


def test_missing_train_good_names_the_folder(tmp_path):
    (tmp_path / "cat" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match="missing train/good"):
        open_category(tmp_path / "cat")


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "cat/train/good").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        open_category(tmp_path / "cat")


def test_junk_files_are_skipped_with_a_warning(tmp_path, caplog):
    root = make_category(tmp_path / "cat")
    (root / "train/good/.DS_Store").write_bytes(b"\0\1junk")
    (root / "train/good/Thumbs.db").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        cat = open_category(root)
    assert len(cat.train) == 3
    assert ".DS_Store" in caplog.text


def test_non_image_file_is_refused_by_name(tmp_path):
    root = make_category(tmp_path / "cat")
    (root / "train/good/notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file"):
        open_category(root)


def test_corrupt_image_is_refused_by_name(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError, match=r"bad\.png: not a readable image"):
        read_image(path)


def test_truncated_image_is_refused_by_name(tmp_path):
    full = _img(tmp_path / "full.png", size=(64, 64))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: corrupt or truncated"):
        read_image(cut)


def test_defective_image_without_mask_is_refused(tmp_path):
    root = make_category(tmp_path / "cat")
    (root / "ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(DataError, match=r"000\.png: defective test image has no mask"):
        open_category(root)


def test_mask_of_wrong_size_is_refused(tmp_path):
    root = make_category(tmp_path / "cat")
    _mask(root / "ground_truth/crack/000_mask.png", size=(32, 32))
    with pytest.raises(DataError, match="mask is 32x32 but its image"):
        open_category(root)


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    path = _img(tmp_path / "big.png", size=(200, 100))
    with pytest.raises(DataError, match="20,000 pixels, over the limit of 10,000"):
        read_image(path, max_pixels=10_000)


def test_cli_reports_bad_data_without_traceback(tmp_path):
    root = make_category(tmp_path / "cat")
    env = dict(os.environ, FLAWSCOPE_MAX_PIXELS="1000")  # every 32x32 image is over it
    proc = subprocess.run([sys.executable, "-m", "flawscope", "fit", "--data", str(root),
                           "--model", "gaussian", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "over the limit of 1,000" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nested_roots_are_searched_and_names_resolved(tmp_path):
    make_category(tmp_path / "mvtec" / "screw")
    make_category(tmp_path / "welds" / "welding")
    found = find_categories(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["mvtec/screw",
                                                                   "welds/welding"]
    assert find_categories(tmp_path, ["welding", "mvtec/screw"]) == [
        tmp_path / "welds" / "welding", tmp_path / "mvtec" / "screw"]
    with pytest.raises(DataError, match="categories under .*mvtec/screw, welds/welding"):
        find_categories(tmp_path, ["toothbrush"])


def test_tiny_images_are_refused_by_name(tmp_path):
    path = _img(tmp_path / "icon.png", size=(16, 64))
    with pytest.raises(DataError, match="icon.png: image is 16x64 pixels; the shortest side"):
        read_image(path, min_side=32)


def test_a_decompression_bomb_gets_flawscopes_message(tmp_path):
    import zlib

    path = _img(tmp_path / "bomb.png", size=(32, 32))
    data = path.read_bytes()
    header = data[12:16] + (100_000).to_bytes(4, "big") * 2 + data[24:29]
    path.write_bytes(data[:12] + header + zlib.crc32(header).to_bytes(4, "big") + data[33:])
    with pytest.raises(DataError, match="bomb.png: image is over the limit of") as info:
        read_image(path)
    assert "decompression bomb DOS" not in str(info.value)


def test_test_set_is_read_only_by_the_verbs_that_need_it(tmp_path):
    root = make_category(tmp_path / "cat")
    _mask(root / "ground_truth/crack/000_mask.png", size=(32, 32))  # a test-set problem
    assert open_category(root, test=False).train  # fitting does not look at it
    with pytest.raises(DataError, match="mask is 32x32"):
        open_category(root, train=False)
    shutil.rmtree(root / "train")
    shutil.rmtree(root / "ground_truth")
    category = open_category(root, train=False)
    assert not category.has_masks and all(t.mask_path is None for t in category.test)
