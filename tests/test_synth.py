"""The built-in synthetic data: deterministic, MVTec layout, exact masks."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from flawscope.data import open_category
from flawscope.synth import (
    OBJECT_DEFECTS,
    TEXTURE_DEFECTS,
    SynthSpec,
    add_object_defect,
    add_texture_defect,
    generate,
    object_image,
    texture_image,
)

SMALL = SynthSpec(size=64, n_train=4, n_test_good=2, n_test_per_defect=2, seed=3)


def _digest(root):
    files = sorted(p for p in root.rglob("*.png"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return len(files), h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate(tmp_path / "a", SMALL)
    generate(tmp_path / "b", SMALL)
    generate(tmp_path / "c", SynthSpec(**{**SMALL.__dict__, "seed": 4}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")[1] != _digest(tmp_path / "c")[1]


def test_layout_counts_and_modes(tmp_path):
    generate(tmp_path, SMALL)
    texture = open_category(tmp_path / "synthetic_texture")
    obj = open_category(tmp_path / "synthetic_object")
    assert texture.defect_types == sorted(TEXTURE_DEFECTS)
    assert obj.defect_types == sorted(OBJECT_DEFECTS)
    assert len(obj.train) == 4 and len(obj.test) == 2 + 2 * len(OBJECT_DEFECTS)
    assert Image.open(texture.train[0]).mode == "L"
    assert Image.open(obj.train[0]).mode == "RGB"
    for item in obj.test + texture.test:
        if item.mask_path is not None:
            mask = np.asarray(Image.open(item.mask_path))
            assert set(np.unique(mask)) == {0, 255}


@pytest.mark.parametrize("kind", TEXTURE_DEFECTS)
def test_texture_masks_are_exactly_the_changed_pixels(kind):
    clean = texture_image(np.random.default_rng(7), 96)
    rng = np.random.default_rng(7)
    img, mask = add_texture_defect(rng, texture_image(rng, 96), kind)
    assert mask.sum() >= 10
    assert np.array_equal(img[~mask], clean[~mask])
    assert np.abs(img - clean)[mask].mean() > 0.15  # visible


@pytest.mark.parametrize("kind", OBJECT_DEFECTS)
def test_object_masks_are_exactly_the_changed_pixels_on_the_part(kind):
    clean, part = object_image(np.random.default_rng(11), 96)
    rng = np.random.default_rng(11)
    base, _ = object_image(rng, 96)
    img, mask = add_object_defect(rng, base, part, kind)
    assert mask.sum() >= 10 and not (mask & ~part).any()
    assert np.array_equal(img[~mask], clean[~mask])
    largest_channel_change = np.abs(img - clean).max(axis=-1)
    assert largest_channel_change[mask].mean() > 0.15


def test_smallest_size_has_every_defect_on_both_categories(tmp_path):
    generate(tmp_path, SynthSpec(size=32, n_train=1, n_test_good=1, n_test_per_defect=3))
    for name in ("synthetic_texture", "synthetic_object"):
        for item in open_category(tmp_path / name).test:
            if item.mask_path is not None:
                assert np.asarray(Image.open(item.mask_path)).any(), item.mask_path
    with pytest.raises(Exception, match="at least 32"):
        generate(tmp_path / "tiny", SynthSpec(size=24))


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "synthetic_texture").mkdir()
    (tmp_path / "synthetic_texture" / "precious.txt").write_text("keep me")
    with pytest.raises(Exception, match="not written by flawscope synth"):
        generate(tmp_path, SMALL)
    assert (tmp_path / "synthetic_texture" / "precious.txt").exists()


def _pixel_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        pixels = np.asarray(Image.open(p))
        h.update(str(p.relative_to(root)).encode())
        h.update(str(pixels.shape).encode())
        h.update(pixels.tobytes())
    return h.hexdigest()


# Pixels written before high-resolution support (sizes up to 512 must never change: test
# sets and saved results depend on them). Values pass through sin, hypot and arctan2, whose
# last bit may differ between CPUs (numpy's AVX-512 paths for them), but a pixel changes only
# if a value lies within about 1e-16 (relative) of a rounding boundary of the 8-bit output: for
# the ~1e6 values here, a chance far below 1e-6. Pinned on an AMD EPYC (AVX2).
PINNED = {
    64: "11e21ffdc7b34155e2afe41e0d4d642cac35c0dbbeb30adc1b6f5e6a46e07dab",
    512: "74d5fcd802bf4397061e8c1b0790c3d52a9c9c5b8b22c3d0fc2ea507d6102e1e",
}


@pytest.mark.parametrize("size", sorted(PINNED))
def test_existing_sizes_keep_their_pixels(tmp_path, size):
    generate(tmp_path, SynthSpec(size=size, n_train=1, n_test_good=1, n_test_per_defect=1,
                                 seed=3))
    assert _pixel_digest(tmp_path) == PINNED[size]


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


@pytest.mark.parametrize("kind", TEXTURE_DEFECTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_texture_defects_fit_the_box_and_are_exact(kind, seed):
    clean = texture_image(np.random.default_rng(seed), 256)
    rng = np.random.default_rng(seed)
    img, mask = add_texture_defect(rng, texture_image(rng, 256), kind, defect_px=8)
    assert mask.sum() >= 4 and max(_extent(mask)) <= 8
    assert np.array_equal(img[~mask], clean[~mask])
    assert np.abs(img - clean)[mask].mean() > 0.15  # visible at native size


@pytest.mark.parametrize("kind", OBJECT_DEFECTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_object_defects_fit_the_box_on_the_part(kind, seed):
    clean, part = object_image(np.random.default_rng(seed), 256)
    rng = np.random.default_rng(seed)
    base, _ = object_image(rng, 256)
    img, mask = add_object_defect(rng, base, part, kind, defect_px=8)
    assert mask.sum() >= 2 and max(_extent(mask)) <= 8 and not (mask & ~part).any()
    assert np.array_equal(img[~mask], clean[~mask])
    assert np.abs(img - clean).max(axis=-1)[mask].mean() > 0.15


def test_high_resolution_with_small_defects(tmp_path):
    # 1024 px: above 512 the smooth noise is drawn coarse and enlarged; shapes must match.
    generate(tmp_path, SynthSpec(size=1024, n_train=1, n_test_good=1, n_test_per_defect=1,
                                 defect_px=6), ("synthetic_texture",))
    category = open_category(tmp_path / "synthetic_texture")
    assert Image.open(category.train[0]).size == (1024, 1024)
    for item in category.test:
        if item.mask_path is not None:
            mask = np.asarray(Image.open(item.mask_path)) > 0
            assert mask.shape == (1024, 1024) and mask.any()
            assert max(_extent(mask)) <= 6, item.mask_path
    assert "defect_px=6" in (tmp_path / "synthetic_texture" / ".flawscope-synth").read_text()


def test_sizes_above_512_that_are_not_a_power_of_two(tmp_path):
    # The blob's noise field is enlarged from 512 px by a non-integer factor here.
    img, mask = add_object_defect(np.random.default_rng(0), *object_image(
        np.random.default_rng(0), 600), "stain")
    assert img.shape == (600, 600, 3) and mask.shape == (600, 600) and mask.sum() > 100


def test_small_defects_refuse_a_box_too_small_or_too_large(tmp_path):
    with pytest.raises(Exception, match="--defect-px 2"):
        generate(tmp_path, SynthSpec(size=64, defect_px=2))
    with pytest.raises(Exception, match="--defect-px 40: small defects need 3 to 16"):
        generate(tmp_path, SynthSpec(size=64, defect_px=40))


def test_cli_synth_writes_small_defects(tmp_path):
    from click.testing import CliRunner

    from flawscope.cli import cli

    result = CliRunner().invoke(cli, ["synth", str(tmp_path), "--size", "64", "--train", "1",
                                      "--test-good", "1", "--test-defect", "2",
                                      "--defect-px", "5", "--categories", "synthetic_object"])
    assert result.exit_code == 0, result.output
    for item in open_category(tmp_path / "synthetic_object").test:
        if item.mask_path is not None:
            assert max(_extent(np.asarray(Image.open(item.mask_path)) > 0)) <= 5


def test_parallel_workers_write_the_same_files(tmp_path):
    generate(tmp_path / "one", SMALL, workers=1)
    generate(tmp_path / "two", SMALL, workers=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
