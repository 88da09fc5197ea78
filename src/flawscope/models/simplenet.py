"""``simplenet``: a discriminator trained on noisy copies of normal patch features (SimpleNet).

After Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and Localization"
(CVPR 2023):

1. **Features.** Every image goes through a frozen ImageNet backbone
   (:mod:`flawscope.backbones`) and becomes locally aware patch features exactly as in
   PatchCore (:func:`flawscope.models.patchcore.patch_features`: block groups 2 and 4 of
   EfficientNet-Lite0, each averaged over 3 x 3 neighbourhoods, brought to stride 8 and
   concatenated: 152 channels per patch). The features are centred on the training patches'
   mean and divided by their overall standard deviation (``normalize="global"``; per
   channel with ``"channel"``), which sets the scale the noise is measured in.
   The backbone never trains, so the training features are computed **once** and kept in
   memory (float32, 152 values per patch: 160 MB for 256 images at 256 px), and every
   optimizer step is two small matrix products: this is what makes CPU training take minutes.
2. **Feature adaptor.** One linear layer applied to every patch vector (a 1 x 1 convolution),
   trained with the discriminator: it moves the ImageNet features towards the target domain.
3. **Anomalous features** are synthesized, not collected: an adapted normal feature plus
   Gaussian noise of standard deviation ``noise_std`` in every channel.
4. **Discriminator.** A 2-layer perceptron per patch (linear, batch norm, LeakyReLU(0.2),
   linear to one value), trained with the paper's truncated L1 loss
   ``max(0, th - D(normal)) + max(0, th + D(noisy))`` (``th = margin``, 0.5): normal patches
   are pushed above ``th``, noisy ones below ``-th``, and patches already past their margin
   cost nothing.
5. **Scoring.** A patch's anomaly score is ``-D(adaptor(feature))``; the map is upsampled to
   the image and smoothed with a Gaussian of ``sigma`` pixels (the paper's 4), and the image
   score is the maximum of that smoothed map (the paper takes the maximum of the unsmoothed
   patch scores; the smoothed maximum is less sensitive to one odd patch, and it is the same
   map the user sees). The batch norm runs on its training statistics, so a patch's score
   does not depend on the rest of the batch, and scoring is a fixed torch graph (ONNX export
   through :class:`~flawscope.models.base.ScoreBatchModule`).

Differences from the paper: the backbone (EfficientNet-Lite instead of WideResNet-50, which
cannot be had offline), the features' 152 channels scaled as above instead of the paper's
channel pooling to 1536 dimensions, batches of ``batch_size`` patches drawn at random from
all training patches (the paper's batches are the patches of 8 images), a constant learning
rate (the paper decays the discriminator's with a cosine schedule), and no choice of the
epoch by test-set AUROC (the released code reports the best epoch on the test set; here
training simply stops at ``epochs``).

**Presets.** ``paper``: the paper's optimization (Adam, adaptor lr 1e-4, discriminator lr
2e-4, weight decay 1e-5, noise 0.015, margin 0.5, 160 epochs over all patches in batches of
8 images' worth, hidden width 2/3 of the feature width as the paper's 1024 of 1536); many
minutes on a CPU, and on these features its noise is too small: the discriminator hardly
learns (its loss stays near 1.0; see :data:`FAST`). ``fast`` (the default): 800 steps of
4096 patches at lr 1e-3 and noise 0.5, chosen on two dev categories (see :data:`FAST`); it
costs the same on 30 images as on 700 (about 30 s of training on 2 cores, plus the
features).

Measured with ``flawscope benchmark`` (``fast``, resize to 256 px, AMD EPYC, 2 threads;
native-size pixel metrics), image AUROC / AU-PRO / fit seconds: toothbrush 0.939 / 0.719 /
30, welding 0.963 / 0.464 / 30, screw 0.716 / 0.570 / 41, magnetic_tile (686 training
images) 0.772 / 0.451 / 45. Against PatchCore-lite0 with its default settings in the same
benchmark (toothbrush 0.997 / 0.844, welding 0.956 / 0.717, screw 0.944 / 0.960,
magnetic_tile 0.948 / 0.740) that is a little better image AUROC on welding only, far lower
on screw (thin threads on a part at any angle) and magnetic_tile, and worse localization
everywhere: with these
features and this budget SimpleNet does not replace PatchCore.

**Training** runs in the shared loop of :mod:`flawscope.trainloop`: initial weights, the
patch order and the noise all come from ``seed``, so a fit is reproducible (for the same
thread count); with a ``workdir`` it checkpoints after every epoch and on Ctrl-C, and a new fit
with the same settings and images continues from there (``epochs`` may change in between).
Divergence: any non-finite loss or weight sends training back to its last good state at half
the learning rate. The loop's "jump" rule is not used: the truncated L1 loss legitimately
falls to near zero once the discriminator separates the noisy patches, so a later epoch at
twice such a tiny value is not a divergence.

Usage::

    from flawscope.data import ImageDataset, open_category
    from flawscope.models import get_model_class

    category = open_category("datasets/mvtec_ad/screw")
    model = get_model_class("simplenet").from_settings("fast")
    model.fit(ImageDataset(category.train, model.image_size), workdir="runs/screw")
    scores, maps = model.score_tensor(images)  # images: (B, 3, 256, 256) in [0, 1]

or ``flawscope fit --data datasets/mvtec_ad/screw --model simplenet --out models/screw``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..backbones import (
    STAGE_CHANNELS,
    check_intensity,
    create_extractor,
    feature_channels,
)
from ..errors import FlawscopeError
from ..trainloop import TrainLoop
from . import register
from ._maps import upsample_and_smooth
from .base import AnomalyModel, ScoreBatchModule
from .patchcore import patch_features

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
NORMALIZATIONS = ("channel", "global")
#: Settings that may change between an interrupted fit and its resumption.
_RESUMABLE_CHANGES = {"epochs"}

#: The ``fast`` preset (the default). Chosen with benchmarks/simplenet_tuning.py on
#: toothbrush and welding (256 px, training seed 0, AMD EPYC, 2 threads; image AUROC /
#: AU-PRO with maps and masks at 256 px; 800 steps of 4096 patches, lr 1e-3, unless named):
#:
#: ================================  =================  =================
#: setting                           toothbrush         welding
#: ================================  =================  =================
#: channel scaling, noise 0.015      0.817 / 0.169      0.963 / 0.118
#: channel, noise 0.05               0.831 / 0.663      0.888 / 0.299
#: channel, noise 0.1                0.956 / 0.621      0.959 / 0.442
#: channel, noise 0.25               0.900 / 0.712      0.968 / 0.474
#: channel, noise 0.5                0.933 / 0.725      0.976 / 0.442
#: channel, noise 1.0                0.942 / 0.722      0.965 / 0.431
#: global scaling, noise 0.05        0.803 / 0.540      0.907 / 0.386
#: global, noise 0.1                 0.856 / 0.617      0.963 / 0.433
#: global, noise 0.25                0.917 / 0.683      0.959 / 0.459
#: global, noise 0.5 (this preset)   0.958 / 0.721      0.969 / 0.523
#: channel 0.1, the paper's lrs      0.892 / 0.622      0.947 / 0.433
#: channel 0.1, hidden 512 (3x time) 0.950 / 0.707      0.970 / 0.507
#: channel 0.25, 200 steps           0.853 / 0.682      0.974 / 0.523
#: ================================  =================  =================
#:
#: With little noise the discriminator never separates the noisy patches (the loss stays
#: near its starting 1.0: at 0.015, the paper's value, it is 1.000 after 800 steps), and the
#: maps are poor. The figures are of one seed and move by a few hundredths with float
#: rounding alone (channel 0.1 again after a change of the rounding of the standard
#: deviations: 0.936 / 0.635 and 0.947 / 0.378; channel 0.05, where the loss stays near
#: 1.0: 0.597 / 0.000 and 0.861 / 0.409), so only the large differences are real.
#: The image score as the maximum of the smoothed map beat the unsmoothed patch maximum in
#: 11 of 14 runs (mean +0.008). PatchCore with coreset 0.01, maps at 256 px as here:
#: toothbrush 0.950 / 0.813, welding 0.952 / 0.680 (close in image AUROC, far better maps).
FAST = {"epochs": 20, "batches_per_epoch": 40, "batch_size": 4096,
        "lr_adaptor": 1e-3, "lr_discriminator": 1e-3, "noise_std": 0.5}


@dataclass
class SimpleNetConfig:
    #: 256 as for patchcore: stride-8 patches (32 x 32 of them) see defects a few pixels wide.
    image_size: int = 256
    backbone: str = "efficientnet_lite0"
    #: Block groups whose outputs make the patch features (as patchcore's).
    stages: tuple[int, ...] = (2, 4)
    #: "raw", "standardized", "matched" or "highpass": as patchcore's ``intensity``.
    intensity: str = "raw"
    #: Feature scaling before the adaptor: "global" (each channel to mean 0, all divided by
    #: one common standard deviation: the channels keep their relative spreads, so the noise
    #: is isotropic in the backbone's own feature space, as in the paper, where it is added to
    #: unscaled features) or "channel" (each channel to mean 0, standard deviation 1).
    normalize: str = "global"
    #: Hidden width of the discriminator; 0 = two thirds of the feature width (the paper's
    #: 1024 for 1536 features; 101 for the 152 channels of the default stages).
    hidden: int = 0
    #: Standard deviation of the Gaussian noise that makes anomalous features, in units of a
    #: training feature's standard deviation per channel (the paper's 0.015 was for its own
    #: feature scale).
    noise_std: float = 0.015
    #: The loss's truncation threshold th (the paper's 0.5).
    margin: float = 0.5
    lr_adaptor: float = 1e-4
    lr_discriminator: float = 2e-4
    weight_decay: float = 1e-5
    epochs: int = 160
    #: Patches per optimizer step (8192 = the patches of 8 images at 256 px, the paper's 8).
    batch_size: int = 8192
    #: Optimizer steps per epoch; 0 = one pass over all training patches.
    batches_per_epoch: int = 0
    #: Gaussian smoothing of the map, in pixels at image_size (the paper's 4).
    sigma: float = 4.0
    #: Images per backbone batch while computing features.
    feature_batch: int = 16
    #: Channels-last activations in the backbone: measured 1.8x faster on an AVX2 CPU.
    channels_last: bool = True
    seed: int = 0


class SimpleNetHead(nn.Module):
    """Standardization, feature adaptor and discriminator, applied to each patch vector.

    ``forward`` takes patch features ``(B, C, h, w)`` and returns anomaly scores ``(B, h, w)``
    (``-D(adaptor(standardized features))``). Linear layers on the last axis of
    ``(..., C)`` rows are the paper's 1 x 1 convolutions.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.adaptor = nn.Linear(channels, channels)
        self.discriminator = nn.Sequential(
            nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1, bias=False))
        # the paper's initialization (Xavier normal weights) of its linear layers
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)

    def standardize(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows - self.mean) / self.std

    def discriminate(self, adapted: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` adapted rows -> ``(N,)`` discriminator outputs (high = normal)."""
        return self.discriminator(adapted)[:, 0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, c)
        return -self.discriminate(self.adaptor(self.standardize(rows))).view(b, h, w)


@register
class SimpleNetModel(AnomalyModel):
    name = "simplenet"
    Config = SimpleNetConfig
    presets = {
        # Liu et al. 2023, Sec. 4.1: Adam, lr 1e-4 (adaptor) and 2e-4 (discriminator),
        # noise 0.015, th 0.5, 160 epochs (40 x 4) in batches of 8 images.
        "paper": {},
        # A fixed budget of 800 steps of 4096 patches: the cost does not grow with the
        # number of images. Default because it detects (see FAST) where the paper's noise
        # does not on these features, and the paper preset takes many minutes per category
        # on 2 CPU cores (one pass over 300 images' patches is 38 steps, x 160).
        "fast": FAST,
    }
    default_preset = "fast"

    def __init__(self, config: SimpleNetConfig | None = None):
        super().__init__(config)
        check_intensity(self.config.intensity)
        c = self.config
        for key in ("epochs", "batch_size", "feature_batch"):
            if int(getattr(c, key)) < 1:
                raise FlawscopeError(f"{key}={getattr(c, key)}: must be at least 1")
        for key in ("noise_std", "margin", "lr_adaptor", "lr_discriminator"):
            if not float(getattr(c, key)) > 0:
                raise FlawscopeError(f"{key}={getattr(c, key)}: must be positive")
        if c.normalize not in NORMALIZATIONS:
            raise FlawscopeError(f"normalize={c.normalize!r}: choose "
                                 f"{' or '.join(NORMALIZATIONS)}")
        if not c.stages or any(not 0 <= int(s) < len(STAGE_CHANNELS) for s in c.stages):
            raise FlawscopeError(f"stages {tuple(c.stages)}: choose block groups among "
                                 f"0..{len(STAGE_CHANNELS) - 1}")
        # The backbone's real widths (lite2 is wider than lite0; an ensemble adds them up).
        channels = sum(feature_channels(c.backbone, tuple(int(s) for s in c.stages)))
        hidden = int(c.hidden) if int(c.hidden) > 0 else max(1, round(channels * 2 / 3))
        # Initial weights depend on the seed only, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(c.seed))
            self.head = SimpleNetHead(channels, hidden)
        self.head.eval()
        self._extractor: torch.nn.Module | None = None
        self.fitted = False
        #: Per-epoch mean training losses of the last fit: [{"epoch": 1, "loss": ...}, ...].
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- features
    @property
    def extractor(self) -> torch.nn.Module:
        if self._extractor is None:
            self._extractor = create_extractor(self.config.backbone, tuple(self.config.stages),
                                               channels_last=self.config.channels_last,
                                               intensity=self.config.intensity)
        return self._extractor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> locally aware patch features ``(B, C, h, w)`` (as patchcore)."""
        with torch.no_grad():
            return patch_features(self.extractor, images)

    def _training_rows(self, images: torch.utils.data.Dataset) -> tuple[torch.Tensor, str]:
        """Every training patch's features as one ``(N * h * w, C)`` float32 matrix, computed
        once, and a digest of the images (for the checkpoint fingerprint)."""
        if len(images) == 0:
            raise FlawscopeError("simplenet: no training images")
        size = self.image_size
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.feature_batch)
        digest = hashlib.sha256()
        rows: torch.Tensor | None = None
        filled = 0
        for batch in tqdm(loader, desc="features", leave=False, disable=None):
            if tuple(batch.shape[1:]) != (3, size, size):
                raise FlawscopeError(f"simplenet: expected images of shape (3, {size}, "
                                     f"{size}), got {tuple(batch.shape[1:])}")
            digest.update(batch.float().numpy().tobytes())
            emb = self.embed(batch)
            part = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            if rows is None:  # one preallocated matrix: no list of batches plus a copy
                rows = torch.empty(len(images) * len(part) // len(batch), part.shape[1])
            rows[filled:filled + len(part)] = part
            filled += len(part)
        assert rows is not None and filled == len(rows)
        return rows, digest.hexdigest()

    # ----------------------------------------------------------------- fitting
    def fit(self, images: torch.utils.data.Dataset, workdir: Path | None = None) -> None:
        self.extractor.fit_intensity(images)
        rows, digest = self._training_rows(images)
        workdir = Path(workdir) if workdir is not None else None
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        head = self.head
        mean, var = rows.mean(0), rows.var(0)
        if self.config.normalize == "global":  # the centred features' root mean square
            var = var.mean().expand_as(var)
        # a floor: a channel that never varies (ReLU6 at 0) must not blow up to infinity
        std = var.sqrt().clamp_min(1e-6 * float(rows.abs().max().clamp_min(1)))
        head.mean.copy_(mean)
        head.std.copy_(std)
        rows.sub_(mean).div_(std)  # in place: no second copy of the features
        try:
            self._train(rows, digest, workdir)
        finally:
            head.eval()
        self.fitted = True

    def _train(self, rows: torch.Tensor, digest: str, workdir: Path | None) -> None:
        c = self.config
        head = self.head
        gen = torch.Generator().manual_seed(int(c.seed))
        optimizers = {
            "adaptor": torch.optim.Adam(head.adaptor.parameters(), lr=c.lr_adaptor,
                                        weight_decay=c.weight_decay),
            "discriminator": torch.optim.Adam(head.discriminator.parameters(),
                                              lr=c.lr_discriminator,
                                              weight_decay=c.weight_decay)}
        n, bs = len(rows), int(c.batch_size)
        n_batches = c.batches_per_epoch if c.batches_per_epoch > 0 else -(-n // bs)

        def epoch_order(g: torch.Generator) -> torch.Tensor:
            if c.batches_per_epoch > 0:  # a fixed budget: patches drawn with replacement
                return torch.randint(n, (n_batches * bs,), generator=g)
            return torch.randperm(n, generator=g)

        def batch(order: torch.Tensor, b: int) -> torch.Tensor:
            return rows[order[b * bs:(b + 1) * bs]]

        def step(x: torch.Tensor, n_step: int) -> dict[str, float]:
            head.train()
            normal = head.adaptor(x)
            noisy = normal + c.noise_std * torch.randn(normal.shape, generator=gen)
            # one discriminator pass over both halves, as the paper: batch norm sees both
            out = head.discriminate(torch.cat([normal, noisy]))
            d_normal, d_noisy = out[:len(x)], out[len(x):]
            loss = ((c.margin - d_normal).clamp_min(0).mean()
                    + (c.margin + d_noisy).clamp_min(0).mean())
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers.values():
                opt.step()
            with torch.no_grad():
                p_normal = float((d_normal > 0).float().mean())
                p_noisy = float((d_noisy < 0).float().mean())
            return {"loss": float(loss.detach()), "p_normal": p_normal, "p_noisy": p_noisy}

        settings = {k: v for k, v in dataclasses.asdict(c).items()
                    if k not in _RESUMABLE_CHANGES}
        loop = TrainLoop(
            "training simplenet", modules={"adaptor": head.adaptor,
                                           "discriminator": head.discriminator},
            optimizers=optimizers, generator=gen, epochs=c.epochs, batches_per_epoch=n_batches,
            epoch_order=epoch_order, batch=batch, step=step, monitor=None,
            checkpoint=workdir / CHECKPOINT if workdir else None,
            fingerprint=f"simplenet {json.dumps(settings, sort_keys=True)} data={digest}",
            csv=workdir / "losses.csv" if workdir else None, what="simplenet training")
        self.history = loop.run()

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fitted:
            raise FlawscopeError("simplenet model is not fitted")
        self.head.eval()
        patch = self.head(self.embed(images.float()))
        maps = upsample_and_smooth(patch, self.image_size, float(self.config.sigma))
        return maps.flatten(1).amax(1), maps

    def onnx_module(self) -> nn.Module:
        """Scoring is a fixed torch graph (backbone, head, upsampling): exported as is."""
        self.extractor  # noqa: B018 - built now, so that the wrapper registers it
        return ScoreBatchModule(self)

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise FlawscopeError("simplenet model is not fitted")
        return {**{f"head.{k}": v for k, v in self.head.state_dict().items()},
                **self.extractor.intensity_state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        try:
            self.head.load_state_dict(state)
        except RuntimeError as exc:
            raise FlawscopeError(f"simplenet model file does not match its settings: "
                                 f"{exc}") from None
        self.head.eval()
        self.extractor.load_intensity_state(tensors, self.name)
        self.fitted = True
