"""Model files: checksum, format version, atomic saves, exact round trip, no code on load."""

import json
import os
import pickle

import pytest
import torch

from flawscope import modelfile
from flawscope.errors import ModelFileError
from flawscope.modelfile import FORMAT_VERSION, load_model, read_manifest, save_model
from flawscope.models.gaussian import GaussianConfig, GaussianModel

IMAGES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def fitted(seed: int) -> GaussianModel:
    model = GaussianModel(GaussianConfig(image_size=32, sigma=1.0))
    g = torch.Generator().manual_seed(seed)
    model.mean = torch.rand(3, 32, 32, generator=g)
    model.std = torch.rand(3, 32, 32, generator=g) + 0.05
    return model


@pytest.fixture
def saved(tmp_path):
    model = fitted(0)
    save_model(model, tmp_path / "m", extra={"threshold": {"value": 1.5, "scale": 0.1}})
    return model, tmp_path / "m"


def test_scores_identical_after_save_and_load(saved):
    model, path = saved
    loaded, manifest = load_model(path)
    s1, m1 = model.score_tensor(IMAGES)
    s2, m2 = loaded.score_tensor(IMAGES)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert manifest["threshold"]["value"] == 1.5 and manifest["config"]["sigma"] == 1.0


def test_checksum_mismatch_is_refused(saved):
    _, path = saved
    weights = path / modelfile.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit-flipped byte of tensor data: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum does not match"):
        load_model(path)


def test_newer_format_is_refused_with_a_clear_message(saved):
    _, path = saved
    manifest = json.loads((path / modelfile.MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / modelfile.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"newer than this flawscope.*upgrade flawscope"):
        load_model(path)


class _Crash(Exception):
    pass


def _crash_on_call(monkeypatch, target, name, at):
    """Make ``target.name`` raise on its ``at``-th call (0-based); returns the call counter."""
    real = getattr(target, name)
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] - 1 == at:
            raise _Crash(f"simulated crash in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, fake)
    return calls


def test_crash_at_any_step_of_a_save_leaves_the_old_model_intact(saved, monkeypatch):
    old, path = saved
    (path / "training").mkdir()
    (path / "training" / "loss.png").write_bytes(b"png")
    before = old.score_tensor(IMAGES)
    old_manifest = read_manifest(path)
    # Count the renames of a clean save, then crash at each one in turn, and mid-way through
    # writing the weights.
    other = path.parent / "other"
    save_model(fitted(9), other)
    (other / "training").mkdir()
    (other / "training" / "loss.png").write_bytes(b"png")
    with monkeypatch.context() as m:
        calls = _crash_on_call(m, modelfile.os, "replace", at=-1)
        save_model(fitted(9), other)
    assert calls[0] == 2  # move the old aside, move the new in
    crash_points = [("replace", i) for i in range(calls[0])] + [("link", 0)]

    def half_written(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise _Crash("simulated crash while writing weights")

    for target, at in crash_points + [("save_file", 0)]:
        with monkeypatch.context() as m:
            if target == "save_file":
                m.setattr(modelfile, "save_file", half_written)
            else:
                _crash_on_call(m, modelfile.os, target, at)
            with pytest.raises(_Crash):
                save_model(fitted(1), path)
        loaded, manifest = load_model(path)
        after = loaded.score_tensor(IMAGES)
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]), target
        assert manifest["weights_sha256"] == old_manifest["weights_sha256"]
        assert (path / "training" / "loss.png").is_file(), f"crash at {target} #{at}"
    # A later save still works and leaves no temporary folders behind.
    save_model(fitted(1), path)
    assert not torch.equal(load_model(path)[0].score_tensor(IMAGES)[0], before[0])
    assert sorted(p.name for p in path.parent.iterdir()) == ["m", "other"]


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles(saved, tmp_path, monkeypatch):
    _, path = saved
    marker = tmp_path / "code-ran"

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle/torch.load used while loading a model")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_model(path)  # a normal model loads without any of them

    # A pickle dressed up as weights, with a matching checksum, is refused and never run.
    payload = pickle.dumps(_Payload(marker))
    (path / modelfile.WEIGHTS).write_bytes(payload)
    manifest = json.loads((path / modelfile.MANIFEST).read_text())
    manifest["weights_sha256"] = modelfile._sha256(path / modelfile.WEIGHTS)
    (path / modelfile.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="unreadable weights"):
        load_model(path)
    assert not marker.exists()


def test_missing_or_foreign_directories_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="not a flawscope model directory"):
        load_model(tmp_path)
    (tmp_path / modelfile.MANIFEST).write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable manifest"):
        load_model(tmp_path)


def test_update_manifest_keeps_weights_and_is_kept_by_a_resave(saved):
    from flawscope.modelfile import update_manifest

    model, path = saved
    update_manifest(path, threshold={"value": 2.0, "scale": 0.2})
    assert load_model(path)[1]["threshold"]["value"] == 2.0
    save_model(model, path)  # re-saving the weights keeps the directory's threshold
    assert read_manifest(path)["threshold"]["value"] == 2.0
    assert not [p for p in os.listdir(path) if p.startswith(".")]
