"""Conv autoencoders, L2 / SSIM loss (Bergmann 2019); preset fast: 5-16 s on 2 CPU cores.

``ae_l2`` and ``ae_ssim`` are the seed's reconstruction models.

An autoencoder trained on good images only learns to reproduce normal parts; a defect is
"repaired" towards normal, so the difference between an image and its reconstruction is
large where the defect is. Both models share one network and one training loop and differ
in what "different" means:

- ``ae_l2`` trains with the per-pixel mean squared error. Anomaly map: squared error
  (in [0, 1] intensity units, mean over channels), smoothed with a Gaussian of
  ``smooth_sigma`` pixels.
- ``ae_ssim`` (Bergmann et al., "Improving Unsupervised Defect Segmentation by Applying
  Structural Similarity to Autoencoders", VISAPP 2019) trains with the SSIM loss and maps
  ``1 - SSIM(x, reconstruction)`` per pixel (mean over channels), which sees structural
  differences (a missing thread, a scratch) that a per-pixel L2 error blurs away.
  SSIM itself lives in :mod:`flawscope.ssim`.

The image score reduces the map (``score_reduction``): ``max`` (default; one bad spot makes a
bad part), ``mean`` (whole-image drift), or ``topk`` (mean of the ``score_topk`` fraction of
hottest pixels: a max that one noisy pixel cannot dominate).

``map_normalization="good_pixels"`` standardizes the (smoothed) map per pixel before the
reduction: ``(map - mean_good) / (std_good + eps)`` with the statistics of the good training
images' maps, computed once after training and saved with the weights
(:mod:`flawscope.models._mapnorm`). On an aligned part the residual of good images is largest
on the rim and machining marks that the network never reproduces; standardized, a pixel
scores by how unusual its residual is *for that place on the part*. Off (``none``) in the
``paper`` presets, as in the paper.

**Network** (Bergmann et al. 2019, Table 1), for a 128 x 128 input; every layer but the last
is followed by a LeakyReLU(0.2), no normalization layers::

    encoder                                    decoder (mirror, transposed where stride 2)
    conv 4x4/2  -> 64 x 64 x 32                convT 8x8/1 -> 8 x 8 x 32   (from 1 x 1 x d)
    conv 4x4/2  -> 32 x 32 x 32                conv 3x3/1  -> 8 x 8 x 64
    conv 3x3/1  -> 32 x 32 x 32                conv 3x3/1  -> 8 x 8 x 128
    conv 4x4/2  -> 16 x 16 x 64                convT 4x4/2 -> 16 x 16 x 64
    conv 3x3/1  -> 16 x 16 x 64                conv 3x3/1  -> 16 x 16 x 64
    conv 4x4/2  -> 8 x 8 x 128                 convT 4x4/2 -> 32 x 32 x 32
    conv 3x3/1  -> 8 x 8 x 64                  conv 3x3/1  -> 32 x 32 x 32
    conv 3x3/1  -> 8 x 8 x 32                  convT 4x4/2 -> 64 x 64 x 32
    conv 8x8/1  -> 1 x 1 x d  (dense bottleneck) convT 4x4/2 -> 128 x 128 x C (no activation)

Assumptions where the paper is silent or differs from the seed:

- **Other input sizes.** The table is for 128 x 128. For ``128 · 2^m`` (the seed's 256) we add
  ``m`` more stride-2 4x4 convolutions with 32 channels at the input (and transposed ones
  at the output), so the bottleneck still sees 8 x 8 x 32; below 128 (tests use 64) the
  bottleneck kernel shrinks to ``image_size / 16``. Sizes must be multiples of 16, >= 32.
- **Colour.** The paper works on grayscale; flawscope delivers RGB, so the network has 3
  input and output channels and the SSIM map is averaged over channels.
- **SSIM window.** Gaussian-weighted 11 x 11 (sigma 1.5) with ``C1 = 0.01²``, ``C2 = 0.03²``
  on [0, 1] images (Wang et al.'s defaults; the paper's ``k = 11``, ``c1 = 0.01``,
  ``c2 = 0.03``); borders reflect-padded so the map covers the whole image.
- **Output range.** Images are normalized with mean 0.5 / std 0.5 (the seed), i.e. to
  [-1, 1]; the last layer is linear (the paper's table has no output activation). Losses and
  maps are computed after mapping the reconstruction back to [0, 1].
- **Optimizer.** Adam without learning-rate schedule; weight decay 1e-5 (Bergmann et al.;
  the seed does not say). Latent size: the seed's 1024 in ``paper``, the paper's 100 in
  ``fast``.
- **Epochs.** ``batches_per_epoch = 0`` is one pass over the training images (the seed's
  epoch); a fixed number makes the ``fast`` preset cost the same on 37 images as on 700.

**Presets.** ``paper``: the seed's settings (256 px, latent 1024, 300 epochs, batch 70, Adam
lr 1e-3, random horizontal flip). ``fast`` (the default) of ``ae_l2``: 32 px, 240 batches of
16, map standardized per pixel by the good images, about 5 s on 2 CPU cores
(:data:`L2_FAST` has the measurements). ``fast`` of ``ae_ssim``: 32 px, 480 batches of 16,
raw SSIM map, about 16 s on 2 Xeon cores (:data:`SSIM_FAST`). ``aligned`` of ``ae_ssim``, for
parts photographed in one fixed pose: the fast preset at 64 px, without mirrored training
images, its map standardized per pixel (:data:`SSIM_ALIGNED`).

**Training** runs in the shared loop of :mod:`flawscope.trainloop`. It draws every random
number (image order, flips) from one generator seeded by ``seed``; initial weights come from
``seed`` too, so a fit is reproducible (for the same thread count). Given a ``workdir`` it
checkpoints after every epoch and on Ctrl-C, which takes effect at the end of the optimizer
step in progress (weights, optimizer, RNG and position in the epoch; ``torch.save`` of plain
tensors and dicts, loaded with ``weights_only=True``), and a new fit with the same settings
and images continues from there, bit for bit; ``epochs`` and picture settings may change in
between, so a finished fit can be extended. A diverging loss (non-finite, or an epoch's mean
over twice its recent low) sends training back to its best epoch at half the learning rate,
at most three times, then stops with an error naming the epoch. The workdir also receives
``losses.csv``, ``losses.png`` and ``reconstructions.png`` (original / reconstruction /
anomaly map of a few training images).

**Memory.** Training images are decoded once and kept as uint8 (3 · S² bytes each: 150 MB
for 760 images at 256 px); nothing else grows with the dataset. Scoring is per batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from ..errors import FlawscopeError
from ..ssim import ssim_map
from ..trainfiles import tile, to_uint8, write_csv
from ..trainloop import GPU_CHECKPOINT_EVERY_S, TrainLoop, training_device
from . import register
from ._mapnorm import GoodPixelNorm, check_map_normalization
from ._maps import smooth_maps
from .base import AnomalyModel, ScoreBatchModule

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: Settings that may change between an interrupted fit and its resumption.
_RESUMABLE_CHANGES = {"epochs", "picture_every", "device"}
#: Settings read after training only, left out of the checkpoint's fingerprint (so
#: checkpoints written before the setting existed still resume).
_AFTER_TRAINING = {"map_normalization"}
SCORE_REDUCTIONS = ("max", "mean", "topk")
#: Training images shown in reconstructions.png.
N_PICTURE_IMAGES = 6


@dataclass
class AEConfig:
    #: Square input side; a multiple of 16, at least 32 (128 is the paper's table).
    image_size: int = 256
    latent_dim: int = 1024
    epochs: int = 300
    batch_size: int = 70
    lr: float = 1e-3
    weight_decay: float = 1e-5
    #: Batches per epoch; 0 = one pass over the training images (the seed's epoch).
    batches_per_epoch: int = 0
    #: Augmentation: random flips and 90-degree turns of training images. The seed flips
    #: horizontally; turn it off for parts whose mirror image is itself a defect.
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    #: Gaussian smoothing of the anomaly map, in pixels at ``image_size`` (0 = none).
    smooth_sigma: float = 2.0
    #: How a map becomes an image score: max, mean, or topk (mean of the hottest pixels).
    score_reduction: str = "max"
    #: Fraction of pixels averaged by ``score_reduction=topk``.
    score_topk: float = 0.01
    #: ``good_pixels``: standardize the (smoothed) map per pixel by the mean and standard
    #: deviation of the good training images' maps, computed after training
    #: (:mod:`flawscope.models._mapnorm`); ``none``: the raw map (the paper).
    map_normalization: str = "none"
    #: Train under bfloat16 autocast. Off: slower on CPUs without bf16 units.
    bf16: bool = False
    #: Where training runs: ``auto`` (a CUDA GPU when PyTorch sees one, else the CPU),
    #: ``cpu`` or ``cuda``; scoring and the saved model are on the CPU either way.
    device: str = "auto"
    #: Write reconstructions.png every this many epochs (and at the last); 0 = only at the end.
    picture_every: int = 0
    seed: int = 0


@dataclass
class SSIMAEConfig(AEConfig):
    #: SSIM is already a windowed statistic; no extra smoothing by default.
    smooth_sigma: float = 0.0


# ---------------------------------------------------------------------------- network
def _layout(image_size: int) -> tuple[int, int]:
    """(extra stride-2 layers beyond the paper's table, bottleneck kernel size)."""
    if image_size < 32 or image_size % 16:
        raise FlawscopeError(f"autoencoder: image_size={image_size} must be a multiple of 16 "
                             "and at least 32 (128 is the paper's size)")
    if image_size <= 128:
        return 0, image_size // 16
    m = math.log2(image_size / 128)
    if m != int(m):
        raise FlawscopeError(f"autoencoder: image_size={image_size} above 128 must be 128·2^k "
                             "(256, 512, ...)")
    return int(m), 8


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class ConvAutoencoder(nn.Module):
    """Bergmann et al. 2019's network (see the module docstring); input/output in [-1, 1]."""

    def __init__(self, image_size: int, latent_dim: int, channels: int = 3):
        super().__init__()
        extra, k = _layout(image_size)
        enc: list[nn.Module] = []
        ch = channels
        for _ in range(extra):
            enc += [nn.Conv2d(ch, 32, 4, 2, 1), _act()]
            ch = 32
        enc += [nn.Conv2d(ch, 32, 4, 2, 1), _act(),
                nn.Conv2d(32, 32, 4, 2, 1), _act(),
                nn.Conv2d(32, 32, 3, 1, 1), _act(),
                nn.Conv2d(32, 64, 4, 2, 1), _act(),
                nn.Conv2d(64, 64, 3, 1, 1), _act(),
                nn.Conv2d(64, 128, 4, 2, 1), _act(),
                nn.Conv2d(128, 64, 3, 1, 1), _act(),
                nn.Conv2d(64, 32, 3, 1, 1), _act(),
                nn.Conv2d(32, latent_dim, k, 1, 0)]
        dec: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, 32, k, 1, 0), _act(),
            nn.Conv2d(32, 64, 3, 1, 1), _act(),
            nn.Conv2d(64, 128, 3, 1, 1), _act(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), _act(),
            nn.Conv2d(64, 64, 3, 1, 1), _act(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), _act(),
            nn.Conv2d(32, 32, 3, 1, 1), _act(),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), _act()]
        for _ in range(extra):
            dec += [nn.ConvTranspose2d(32, 32, 4, 2, 1), _act()]
        dec += [nn.ConvTranspose2d(32, channels, 4, 2, 1)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def reduce_map(maps: torch.Tensor, reduction: str, topk: float) -> torch.Tensor:
    """Image scores ``(B,)`` from anomaly maps ``(B, h, w)`` (see the module docstring)."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.amax(1)
    if reduction == "mean":
        return flat.mean(1)
    if reduction == "topk":
        k = max(1, round(topk * int(flat.shape[1])))  # int(): a constant when traced
        return flat.topk(k, dim=1).values.mean(1)
    raise FlawscopeError(f"score_reduction={reduction!r}: choose one of "
                         f"{', '.join(SCORE_REDUCTIONS)}")


# ---------------------------------------------------------------------------- models
class _Autoencoder(AnomalyModel):
    """Everything both autoencoders share; subclasses define the loss and the map."""

    Config: ClassVar[type] = AEConfig
    default_preset = "fast"

    def __init__(self, config: AEConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.score_reduction not in SCORE_REDUCTIONS:
            raise FlawscopeError(f"score_reduction={c.score_reduction!r}: choose one of "
                                 f"{', '.join(SCORE_REDUCTIONS)}")
        if not 0 < c.score_topk <= 1:
            raise FlawscopeError(f"score_topk={c.score_topk}: must be in (0, 1]")
        check_map_normalization(c.map_normalization)
        for key in ("epochs", "batch_size", "latent_dim"):
            if int(getattr(c, key)) < 1:
                raise FlawscopeError(f"{key}={getattr(c, key)}: must be at least 1")
        # Initial weights depend on the seed only, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.net = ConvAutoencoder(c.image_size, c.latent_dim)
        self.net.eval()
        #: Per-pixel statistics of good maps (``map_normalization=good_pixels``), else None.
        self.map_norm = (GoodPixelNorm(c.image_size) if c.map_normalization == "good_pixels"
                         else None)
        #: Per-epoch mean training loss of the last fit: [{"epoch": 1, "loss": ...}, ...].
        self.history: list[dict[str, float]] = []

    #: Training loss of a network whose reconstruction no longer depends on its input
    #: (see ``TrainLoop``'s ``collapsed_at``); None where no such value is known.
    collapsed_loss: ClassVar[float | None] = None

    # ------------------------------------------------------------------ what differs
    @abstractmethod
    def loss(self, x01: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        """Training loss between images and reconstructions, both in [0, 1]."""

    @abstractmethod
    def raw_map(self, x01: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        """Unsmoothed anomaly map ``(B, S, S)`` of images and reconstructions in [0, 1]."""

    # ------------------------------------------------------------------ scoring
    def _reconstruct01(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1] scale (not clamped: the loss sees the raw output)."""
        return self.net(images * 2 - 1) * 0.5 + 0.5

    def anomaly_map(self, images: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        maps = self._smoothed_map(images, rec01)
        return self.map_norm(maps) if self.map_norm is not None else maps

    def _smoothed_map(self, images: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        """The raw map after the Gaussian smoothing, before any normalization."""
        return smooth_maps(self.raw_map(images, rec01), float(self.config.smooth_sigma))

    @torch.no_grad()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        x = images.float()
        maps = self.anomaly_map(x, self._reconstruct01(x))
        return reduce_map(maps, self.config.score_reduction, self.config.score_topk), maps

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's output in [0, 1]: what the part looks like "repaired"."""
        self.net.eval()
        return self._reconstruct01(images.float()).clamp(0, 1)

    def onnx_module(self) -> nn.Module:
        return ScoreBatchModule(self)  # registers self.net, so weights export as parameters

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.map_norm is not None:
            tensors.update(self.map_norm.state_tensors())
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net.eval()
        if self.map_norm is not None:
            self.map_norm.load_state_tensors(tensors)

    # ------------------------------------------------------------------ training
    def fit(self, images: torch.utils.data.Dataset, workdir: Path | None = None) -> None:
        data = self._load_images(images)
        workdir = Path(workdir) if workdir is not None else None
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        if self.map_norm is not None:  # training pictures show the raw map
            self.map_norm = GoodPixelNorm(self.image_size)
        try:
            self._train(data, workdir)
        finally:
            self.net.eval()
        if self.map_norm is not None:
            self.map_norm.fit(self._good_maps(data))
        if workdir is not None:
            self._pictures(data, workdir)

    @torch.no_grad()
    def _good_maps(self, data: torch.Tensor) -> torch.Tensor:
        """Smoothed, unnormalized maps ``(N, S, S)`` of the uint8 training images."""
        self.net.eval()
        maps = []
        for i in range(0, len(data), 32):
            x = data[i:i + 32].float() / 255
            maps.append(self._smoothed_map(x, self._reconstruct01(x)))
        return torch.cat(maps)

    def _load_images(self, images: torch.utils.data.Dataset) -> torch.Tensor:
        """All training images as one uint8 (N, 3, S, S) tensor, decoded once."""
        if len(images) == 0:
            raise FlawscopeError(f"{self.name}: no training images")
        size = self.image_size
        data = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
        loader = torch.utils.data.DataLoader(images, batch_size=32)
        n = 0
        for batch in loader:
            if tuple(batch.shape[1:]) != (3, size, size):
                raise FlawscopeError(f"{self.name}: expected images of shape (3, {size}, "
                                     f"{size}), got {tuple(batch.shape[1:])}")
            data[n:n + len(batch)] = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8)
            n += len(batch)
        return data

    def _fingerprint(self, data: torch.Tensor) -> str:
        """Settings + images, so a checkpoint is only resumed by the same fit."""
        settings = {k: v for k, v in dataclasses.asdict(self.config).items()
                    if k not in _RESUMABLE_CHANGES and k not in _AFTER_TRAINING}
        digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
        return f"{self.name} {json.dumps(settings, sort_keys=True)} data={digest}"

    def _n_batches(self, n: int) -> int:
        bpe = self.config.batches_per_epoch
        return bpe if bpe > 0 else math.ceil(n / self.config.batch_size)

    def _epoch_order(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Image indices of one epoch: shuffled passes, cut to whole batches if fixed size."""
        if self.config.batches_per_epoch <= 0:
            return torch.randperm(n, generator=gen)
        need = self.config.batches_per_epoch * self.config.batch_size
        return torch.cat([torch.randperm(n, generator=gen)
                          for _ in range(math.ceil(need / n))])[:need]

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.config
        b = len(x)
        if c.hflip:
            x = torch.where((torch.rand(b, generator=gen) < 0.5)[:, None, None, None],
                            x.flip(-1), x)
        if c.vflip:
            x = torch.where((torch.rand(b, generator=gen) < 0.5)[:, None, None, None],
                            x.flip(-2), x)
        if c.rot90:
            turns = torch.randint(0, 4, (b,), generator=gen)
            x = torch.stack([im.rot90(int(t), dims=(-2, -1)) for im, t in zip(x, turns,
                                                                               strict=True)])
        return x

    def _train(self, data: torch.Tensor, workdir: Path | None) -> None:
        """Adam on the loss, in the shared loop (resume, Ctrl-C, divergence, loss CSV)."""
        c = self.config
        device = training_device(c.device)
        gen = torch.Generator().manual_seed(c.seed)  # on the CPU, so a fit's draws are the
        self.net.to(device)                          # same on every device
        try:
            self._train_on(data, workdir, device, gen)
        finally:
            self.net.to("cpu")

    def _train_on(self, data: torch.Tensor, workdir: Path | None, device: torch.device,
                  gen: torch.Generator) -> None:
        c = self.config
        opt = torch.optim.Adam(self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay)

        def batch(order: torch.Tensor, b: int) -> torch.Tensor:
            idx = order[b * c.batch_size:(b + 1) * c.batch_size]
            return self._augment(data[idx], gen).to(device).float() / 255

        def step(x: torch.Tensor, n_step: int) -> dict[str, float]:
            self.net.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(c.bf16)):
                rec = self._reconstruct01(x)
            loss = self.loss(x, rec.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": float(loss.detach())}

        def pictures(epoch: int, history: list[dict[str, float]]) -> None:
            self.history = history
            self._pictures(data, workdir)

        loop = TrainLoop(
            f"training {self.name}", modules={"net": self.net}, optimizers={"net": opt},
            generator=gen, epochs=c.epochs, batches_per_epoch=self._n_batches(len(data)),
            epoch_order=lambda g: self._epoch_order(len(data), g), batch=batch, step=step,
            monitor="loss", checkpoint=workdir / CHECKPOINT if workdir else None,
            fingerprint=self._fingerprint(data),
            csv=workdir / "losses.csv" if workdir else None,
            pictures=pictures if workdir else None, picture_every=c.picture_every,
            upgrade=_upgrade_checkpoint, collapsed_at=self.collapsed_loss,
            checkpoint_every_s=GPU_CHECKPOINT_EVERY_S if device.type == "cuda" else 0.0)
        self.history = loop.run()

    def _pictures(self, data: torch.Tensor, workdir: Path) -> None:
        """Loss curve and original / reconstruction / anomaly map of a few train images."""
        self.net.eval()
        if self.history:
            write_csv(self.history, workdir / "losses.csv")
            fig = Figure(figsize=(6, 4))  # no pyplot: leaves the caller's backend alone
            ax = fig.subplots()
            ax.plot([r["epoch"] for r in self.history], [r["loss"] for r in self.history])
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"training loss ({self.loss_name})")
            ax.set_yscale("log")
            ax.set_title(self.name)
            fig.tight_layout()
            fig.savefig(workdir / "losses.png", dpi=100)
        step = max(1, len(data) // N_PICTURE_IMAGES)
        device = next(self.net.parameters()).device  # mid-training it may be a GPU
        x = data[::step][:N_PICTURE_IMAGES].to(device).float() / 255
        with torch.no_grad():
            rec = self._reconstruct01(x)
            maps = self.anomaly_map(x, rec)
        x, rec, maps = x.cpu(), rec.cpu(), maps.cpu()
        heat = colormaps["inferno"]((maps / maps.max().clamp_min(1e-6)).numpy())[..., :3]
        tile([to_uint8(x), to_uint8(rec), (heat * 255).round().astype(np.uint8)]
              ).save(workdir / "reconstructions.png")

    loss_name: ClassVar[str] = ""


#: ``ae_l2``'s fast preset. Image AUROC on the default ``flawscope synth`` synthetic_object
#: (128 px), data seeds 0-4 x training seeds 0-1 (benchmarks/fast_presets.py and the same
#: fits re-scored, AMD EPYC, 2 threads), mean / worst of the 10 runs:
#: - 128 px, 16 epochs of 16 batches, smoothing 2 px (the former preset): max 0.657 / 0.52,
#:   topk 0.691, mean 0.705 (fits of 1-3 min); 64 epochs, topk: 0.738;
#: - 32 px, 16 epochs of 15 batches, raw map: smoothing 2 px 0.647 / 0.469, none 0.598 / 0.439;
#: - the same fits, map standardized per pixel by the good training images
#:   (``map_normalization=good_pixels``), no smoothing: max 0.873 / 0.729, topk 1 % 0.830 /
#:   0.688; smoothing 1 px (at 32 px) 0.825 / 0.698: this preset, fits of 5 s.
#: The residual of good images is largest on the part's rim and marks, which the small
#: network never reproduces; per-pixel standardization discounts exactly those places.
L2_FAST = {"image_size": 32, "latent_dim": 100, "epochs": 16, "batch_size": 16,
           "batches_per_epoch": 15, "smooth_sigma": 0.0, "map_normalization": "good_pixels"}


@register
class L2Autoencoder(_Autoencoder):
    """Convolutional autoencoder trained with the per-pixel squared error."""

    name = "ae_l2"
    Config = AEConfig
    loss_name = "MSE"
    presets = {
        # The seed: 256 px, latent 1024, 300 epochs of batch 70, Adam 1e-3, horizontal flip.
        "paper": {},
        "fast": L2_FAST,
    }

    def loss(self, x01: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(rec01, x01)

    def raw_map(self, x01: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        return ((x01 - rec01) ** 2).mean(1)


#: ``ae_ssim``'s fast preset. Image AUROC on the default ``flawscope synth`` synthetic_object
#: (128 px), data seeds 0-4 x training seeds 0-1 (benchmarks/fast_presets.py, AMD EPYC,
#: 2 threads), mean / worst of the 10 runs:
#: - 128 px, 16 epochs of 16 batches (the preset it shared with ae_l2): 0.570 / 0.378 (on an
#:   H200; the rounding differs from a CPU's, the spread is the point);
#: - 64 px, 64 epochs: 0.698 / 0.615 (7 runs, H200);
#: - 32 px, 16 epochs of 15 batches: 0.869 / 0.778;
#: - 32 px, 32 epochs of 15 batches: 0.878 / 0.823 (fits of 25-29 s): this preset.
#: A likely reason (not measured): at 32 px an 11 px SSIM window spans a third of the part,
#: so SSIM compares its shape rather than fine texture the small network cannot reproduce.
SSIM_FAST = {"image_size": 32, "latent_dim": 100, "epochs": 32, "batch_size": 16,
             "batches_per_epoch": 15}

#: ``ae_ssim``'s preset for parts photographed in one fixed pose (a weld seam, a toothbrush in
#: its fixture): the fast preset at 64 px, no mirrored training images, and the SSIM map
#: standardized per pixel by the good training images. Image AUROC on real categories
#: (``--set`` overrides of the fast preset, AMD EPYC, 1 thread; training seed 0 unless said):
#: - welding (37 training images): fast 0.601 (an earlier run at 2 threads); + good_pixels
#:   0.848; + no flip 0.900; + 64 px with flips 0.897; 64 px without: 0.925 / 0.934 (training
#:   seeds 0 / 1; 2 threads: the same 0.925 / 0.934): this preset; 64 epochs 0.937 /
#:   0.918; 128 px 0.914; latent 256 0.895, latent 32 0.903 (64 epochs); smoothing 2 px 0.920,
#:   1 px 0.924 / 0.928; top 0.3% of the map 0.924 / 0.932; learning rate 5e-4 0.927 / 0.930;
#:   the per-pixel ``gaussian`` baseline scores 0.957. Its welding defects are changes of
#:   local brightness, which SSIM hardly weighs: the baseline on blurred images keeps 0.957,
#:   on the images minus their blur it drops to 0.72 (benchmarks/brightness_or_structure.py;
#:   toothbrush the other way round, 0.74 and 0.96);
#: - toothbrush (48): 0.986 (fast 0.514, ``gaussian`` 0.886);
#: - through ``flawscope benchmark`` (4-5 images held out for the threshold): welding 0.942
#:   (``gaussian`` 0.953), toothbrush 0.983 (0.881);
#: - the default synthetic_object, which is not in one pose (10 runs as for the fast
#:   preset): 0.728 / worst 0.632, below the fast preset's 0.878.
#: A likely reason (not measured further): a mirrored seam or brush is not a normal view of
#: it, and a network taught to reconstruct both reconstructs more of what is not normal.
SSIM_ALIGNED = {**SSIM_FAST, "image_size": 64, "hflip": False,
                "map_normalization": "good_pixels"}


@register
class SSIMAutoencoder(_Autoencoder):
    """Convolutional autoencoder trained with the SSIM loss (Bergmann et al. 2019)."""

    name = "ae_ssim"
    Config = SSIMAEConfig
    loss_name = "1 - SSIM"
    presets = {"paper": {}, "fast": SSIM_FAST, "aligned": SSIM_ALIGNED}
    #: SSIM of 0.01 or less over a whole epoch: no structure of the input left in the
    #: reconstruction (a constant output scores 1 - SSIM = 1.0 on textured images).
    collapsed_loss = 0.99

    def loss(self, x01: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        return 1 - ssim_map(x01, rec01).mean()

    def raw_map(self, x01: torch.Tensor, rec01: torch.Tensor) -> torch.Tensor:
        return 1 - ssim_map(x01, rec01).mean(1)


def _upgrade_checkpoint(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of the autoencoders' own loop (before the shared one) in today's layout."""
    if "net" not in saved:
        return saved
    batch = saved["batch"]
    return {**saved, "modules": {"net": saved["net"]}, "optimizers": {"net": saved["optimizer"]},
            "sums": {"loss": [saved["loss_sum"], batch]} if batch else {},
            "n_step": 0}  # the autoencoders' step does not read it


# ---------------------------------------------------------------------------- files


