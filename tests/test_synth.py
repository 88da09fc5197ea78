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
