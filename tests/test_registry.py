"""The model registry finds every model module and survives a broken one."""

import pytest

import flawscope.models as models
from flawscope.errors import FlawscopeError


def test_every_shipped_model_is_registered():
    assert {"gaussian", "ae_l2", "ae_ssim", "fanogan", "patchcore", "padim",
            "simplenet"} <= set(models.available_models())


def test_a_broken_model_module_is_named_and_does_not_hide_the_others(tmp_path, monkeypatch):
    (tmp_path / "brokenmodel.py").write_text("def oops(:\n")
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    monkeypatch.setattr(models, "_discovered", False)
    monkeypatch.setattr(models, "_BROKEN", {})
    assert models.get_model_class("gaussian").name == "gaussian"
    with pytest.raises(FlawscopeError, match="module brokenmodel failed to import"):
        models.get_model_class("brokenmodel")
