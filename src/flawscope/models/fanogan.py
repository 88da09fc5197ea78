"""``fanogan``: f-AnoGAN, a WGAN-GP generator and an izi_f encoder (Schlegl et al. 2019).

Schlegl et al., "f-AnoGAN: Fast unsupervised anomaly detection with generative adversarial
networks", Medical Image Analysis 2019.

Training has two stages, both on good images only:

1. **Adversarial training.** A generator G (latent ``z`` -> image) and a critic D are trained
   as a Wasserstein GAN with gradient penalty (Gulrajani et al. 2017): the critic is updated
   on every batch, the generator on every ``n_critic``-th batch. G learns what normal parts
   can look like.
2. **Encoder training (izi_f).** With G and D frozen, an encoder E (image -> ``z``) learns to
   map an image to the latent code whose generated image matches it, minimising
   ``mean((x - G(E(x)))²) + kappa · mean((f(x) - f(G(E(x))))²)`` where ``f`` is the critic's
   last feature layer. Because G only knows normal parts, a defect cannot be reproduced.

Scoring reuses the same two terms: ``A(x) = A_R(x) + kappa · A_D(x)``; the anomaly map is the
residual ``|x - G(E(x))|`` averaged over channels, at the model's resolution.
``score_reduction`` other than ``izi_f`` scores an image by reducing the map instead (``max``,
``mean``, ``topk``, as in the autoencoders), and ``map_normalization="good_pixels"``
standardizes the map per pixel by the maps of the good training images, computed after
training (:mod:`flawscope.models._mapnorm`). The ``fast`` preset does both (measurements at
the preset); ``paper`` keeps the paper's score and residual.

Choices the paper leaves open or that follow its reference code: DCGAN-style convolutional
networks whose width is a setting (``width``), no normalisation in the critic (batch norm would
break the per-sample gradient penalty) nor in the encoder, batch norm in G; ``z`` uniform in
[-1, 1] with a tanh at the end of E so that E can only reach codes G was trained on; images
normalised to [-1, 1] (the seed's Normalize(0.5, 0.5)), G ends in tanh; Adam with the
WGAN-GP betas (0, 0.9). ``batches_per_epoch`` (0 = one pass over the data, as in the paper)
lets the ``fast`` preset spend the same compute on a 37-image category as on a 700-image one.

All randomness of training (data order, flips, ``z``, gradient-penalty mixing) comes from one
seeded generator, so a fit is reproducible for a seed (with the same thread count). Both
stages run in the shared loop of :mod:`flawscope.trainloop`: with a ``workdir`` each stage
checkpoints after every epoch and on Ctrl-C (which takes effect at the end of the optimizer
step in progress, the generator's included), and a new ``fit`` with the same settings and
images resumes where it stopped, bit for bit. A non-finite loss or weight, or in stage 2 an
epoch whose encoder loss is over twice its recent low, sends the stage back to its best epoch
at half the learning rate (at most three times, then a clear error). A fit that only changes
``kappa`` or ``encoder_lr`` reuses the finished stage 1 and retrains the encoder alone. The
workdir also receives the pictures of training: generated samples, reconstructions, and loss
curves (PNG and CSV).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from ..errors import FlawscopeError
from ..trainfiles import tile, to_uint8
from ..trainloop import GPU_CHECKPOINT_EVERY_S, TrainLoop, training_device
from . import register
from ._mapnorm import GoodPixelNorm, check_map_normalization
from ._maps import smooth_maps
from .autoencoder import SCORE_REDUCTIONS, reduce_map
from .base import AnomalyModel, ScoreBatchModule

log = logging.getLogger(__name__)


@dataclass
class FAnoGANConfig:
    #: Side of the square input; must be 4·2^k (32, 64, 128, ...). The paper uses 64.
    image_size: int = 64
    latent_dim: int = 100
    #: Channels of the critic's first layer (and of G's last hidden layer), doubled at every
    #: halving of the resolution: 64 is the DCGAN size, smaller is faster and coarser.
    width: int = 64
    batch_size: int = 32
    lr: float = 2e-4
    adam_beta1: float = 0.0
    adam_beta2: float = 0.9
    #: Gradient-penalty weight (lambda of WGAN-GP).
    gp_weight: float = 10.0
    #: The generator is updated on every n_critic-th batch, the critic on every batch.
    n_critic: int = 5
    #: Weight of the critic-feature term, in the encoder loss and in the anomaly score.
    kappa: float = 1.0
    #: Learning rate of the encoder (stage 2); 0 = ``lr``. Stage 2 is plain regression onto a
    #: fixed G, not a two-player game, so a short run can afford a larger step.
    encoder_lr: float = 0.0
    #: Image score: ``izi_f`` (the paper's ``A_R + kappa·A_D``), or a reduction of the
    #: anomaly map as in the autoencoders: ``max``, ``mean`` or ``topk``. ``izi_f`` averages
    #: the residual over the whole image, which dilutes small defects: the ``paper`` preset
    #: on the synthetic part (seed 0, 60 images, 1,500 + 200 epochs) scores pixel AUROC 0.997
    #: but image AUROC 0.628 with ``izi_f``, and 0.735 / 0.807 / 0.643 with ``max`` /
    #: ``topk`` / ``mean`` of the same maps.
    score_reduction: str = "izi_f"
    #: Fraction of pixels averaged by ``score_reduction=topk``.
    score_topk: float = 0.01
    #: Gaussian smoothing of the anomaly map, in pixels at ``image_size`` (0 = none).
    smooth_sigma: float = 0.0
    #: ``good_pixels``: standardize the map per pixel by the good training images' maps
    #: (:mod:`flawscope.models._mapnorm`); ``none``: the residual itself (the paper).
    map_normalization: str = "none"
    stage1_epochs: int = 1500
    stage2_epochs: int = 200
    #: Batches per epoch; 0 = one pass over the training images (the paper's epoch).
    batches_per_epoch: int = 0
    #: Random horizontal flips of training images (the seed's augmentation). Turn off for
    #: parts whose mirror image is itself a defect.
    hflip: bool = True
    #: Training pictures every this many epochs (and at the first and last epoch); 0 = never.
    picture_every_stage1: int = 100
    picture_every_stage2: int = 20
    #: Where training runs: ``auto`` (a CUDA GPU when PyTorch sees one, else the CPU),
    #: ``cpu`` or ``cuda``; scoring and the saved model are on the CPU either way.
    device: str = "auto"
    seed: int = 0


#: Files that must match the settings and images for a fit to resume from them.
STAGE1_CHECKPOINT = "fanogan_stage1.pt"
STAGE2_CHECKPOINT = "fanogan_stage2.pt"
#: Settings that may change between an interrupted fit and its resumption.
_RESUMABLE_CHANGES = {"stage1_epochs", "stage2_epochs", "picture_every_stage1",
                      "picture_every_stage2", "device"}
#: Settings that only stage 2 and scoring read: changing them keeps a finished stage 1, so
#: trying another kappa or encoder schedule costs minutes of stage 2, not hours of stage 1.
_STAGE2_ONLY = {"kappa", "encoder_lr"}
#: Settings that only change scoring (the map statistics are recomputed at the end of a fit).
_SCORING_ONLY = {"score_reduction", "score_topk", "smooth_sigma", "map_normalization"}


# ---------------------------------------------------------------------------- networks
def _n_halvings(image_size: int) -> int:
    """Number of stride-2 layers between ``image_size`` and the 4x4 bottleneck."""
    k = math.log2(image_size / 4) if image_size >= 8 else 0
    if k < 1 or k != int(k):
        raise FlawscopeError(f"fanogan: image_size={image_size} must be 4·2^k, "
                             "e.g. 32, 64 or 128")
    return int(k)


class Generator(nn.Module):
    """``z`` (B, latent) -> image (B, 3, S, S) in [-1, 1] (DCGAN generator)."""

    def __init__(self, image_size: int, latent_dim: int, width: int):
        super().__init__()
        n = _n_halvings(image_size)
        ch = width * 2 ** (n - 1)
        self.channels = ch
        self.project = nn.Linear(latent_dim, ch * 16, bias=False)
        self.start = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(True))
        layers: list[nn.Module] = []
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, 3, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, self.channels, 4, 4)
        return self.body(self.start(x))


def _conv_stack(image_size: int, width: int) -> tuple[nn.Sequential, int]:
    """Stride-2 convolutions from (3, S, S) down to (C, 4, 4); returns (stack, C·16)."""
    n = _n_halvings(image_size)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    ch = width
    for _ in range(n - 1):
        layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch *= 2
    return nn.Sequential(*layers, nn.Flatten()), ch * 16


class Critic(nn.Module):
    """Image -> Wasserstein critic value; :meth:`features` is the ``f`` of izi_f."""

    def __init__(self, image_size: int, width: int):
        super().__init__()
        self.body, n_features = _conv_stack(image_size, width)
        self.head = nn.Linear(n_features, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(1)


class Encoder(nn.Module):
    """Image -> ``z`` in [-1, 1], the support of G's prior."""

    def __init__(self, image_size: int, latent_dim: int, width: int):
        super().__init__()
        self.body, n_features = _conv_stack(image_size, width)
        self.head = nn.Sequential(nn.Linear(n_features, latent_dim), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, mix: torch.Tensor, weight: float) -> torch.Tensor:
    """WGAN-GP term ``weight · mean((||∇D(x̂)||₂ - 1)²)`` at ``x̂ = mix·real + (1-mix)·fake``.

    ``mix`` has shape (B, 1, 1, 1). The graph is kept so the penalty trains the critic.
    """
    mixed = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return weight * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


# ---------------------------------------------------------------------------- the model
@register
class FAnoGANModel(AnomalyModel):
    name = "fanogan"
    Config = FAnoGANConfig
    presets = {
        # The seed's numbers. Hours to days on a CPU; see the notes for measured epoch times.
        "paper": {},
        # Under two minutes on a CPU core: 32x32 images, quarter-width networks and a fixed
        # number of batches, so that small and large categories cost the same. At 64x64 such
        # a budget left G producing noise.
        # - 1000 critic and 1000 generator updates (n_critic 1): with the paper's 5, G got 200
        #   updates and reproduced too little of the part.
        # - 800 encoder updates at lr 1e-3: stage 2 is regression onto a fixed G, not a
        #   two-player game, and takes the larger step.
        # Against n_critic 5 and 400 encoder updates at 2e-4, this raised pixel AUROC on all
        # four real categories of the notes and image AUROC on three (screw fell).
        # kappa 0.1: after so short a stage 1 the critic's features are large (its Wasserstein
        # estimate still climbs), and with kappa 1 the feature term trapped the encoder on
        # battery_weld (residual stuck at 1.56 vs 0.16 with kappa 0.1, same G and D).
        # Scored by the max of the residual map standardized per pixel by the good training
        # images. Image AUROC on the default `flawscope synth` synthetic_object, data seeds
        # 0-4 x training seeds 0-1 (AMD EPYC, 2 threads, fits of 50-71 s), mean / worst:
        # - izi_f score A_R + kappa·A_D (the paper's): 0.693 / 0.486;
        # - max of the raw residual map 0.714 / 0.559, top 1 % 0.744 / 0.601, smoothed 1 px
        #   0.785 / 0.688;
        # - max of the standardized map 0.935 / 0.861 (eps 0.01 or 1.0 of the mean std:
        #   0.930 / 0.861, 0.927 / 0.851; squared residual 0.944 / 0.868): this preset.
        "fast": {"image_size": 32, "width": 16, "kappa": 0.1, "n_critic": 1,
                 "encoder_lr": 1e-3, "stage1_epochs": 40, "stage2_epochs": 32,
                 "batches_per_epoch": 25, "picture_every_stage1": 10,
                 "picture_every_stage2": 8, "score_reduction": "max",
                 "map_normalization": "good_pixels"},
    }
    default_preset = "fast"

    def __init__(self, config: FAnoGANConfig | None = None):
        super().__init__(config)
        c = self.config
        # Initial weights depend on the seed only, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.generator = Generator(c.image_size, c.latent_dim, c.width)
            self.critic = Critic(c.image_size, c.width)
            self.encoder = Encoder(c.image_size, c.latent_dim, c.width)
        self._nets = {"G": self.generator, "D": self.critic, "E": self.encoder}
        if c.score_reduction not in ("izi_f", *SCORE_REDUCTIONS):
            raise FlawscopeError(f"score_reduction={c.score_reduction!r}: choose one of "
                                 f"izi_f, {', '.join(SCORE_REDUCTIONS)}")
        check_map_normalization(c.map_normalization)
        #: Per-pixel statistics of good maps (``map_normalization=good_pixels``), else None.
        self.map_norm = (GoodPixelNorm(c.image_size) if c.map_normalization == "good_pixels"
                         else None)
        #: Where the networks are: the CPU, except while a fit trains on a GPU.
        self._device = torch.device("cpu")
        self._eval()
        #: Per-epoch mean losses of the last fit, {"stage1": [...], "stage2": [...]}.
        self.history: dict[str, list[dict[str, float]]] = {"stage1": [], "stage2": []}

    def _eval(self) -> None:
        for net in self._nets.values():
            net.eval()

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def _to_model(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [-1, 1], the seed's Normalize(mean=0.5, std=0.5)."""
        return images * 2 - 1

    def onnx_module(self) -> torch.nn.Module:
        """Scoring is a fixed torch graph: exported as is (see ``flawscope export``)."""
        return ScoreBatchModule(self)

    @torch.no_grad()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._eval()
        c = self.config
        x = self._to_model(images.float())
        rec = self.generator(self.encoder(x))
        maps = self._residual_map(x, rec)
        if self.map_norm is not None:
            maps = self.map_norm(maps)
        if c.score_reduction != "izi_f":
            return reduce_map(maps, c.score_reduction, c.score_topk), maps
        a_r = ((x - rec) ** 2).flatten(1).mean(1)
        a_d = ((self.critic.features(x) - self.critic.features(rec)) ** 2).mean(1)
        return a_r + c.kappa * a_d, maps

    def _residual_map(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """|x - G(E(x))| in [0, 1] intensity units, channel mean, smoothed if asked."""
        return smooth_maps((x - rec).abs().mean(1) / 2, float(self.config.smooth_sigma))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """G(E(x)) in [0, 1]: the closest normal-looking image the model can produce."""
        self._eval()
        rec = self.generator(self.encoder(self._to_model(images.float())))
        return ((rec + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` generated images (n, 3, S, S) in [0, 1], the same for the same seed."""
        self._eval()
        z = self._latent(n, torch.Generator().manual_seed(seed))
        return ((self.generator(z) + 1) / 2).clamp(0, 1)

    def _latent(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Uniform codes in [-1, 1], drawn on the CPU (the same draws on every device)."""
        return (torch.rand(n, self.config.latent_dim, generator=gen) * 2 - 1).to(self._device)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{key}.{name}": t for key, net in self._nets.items()
                   for name, t in net.state_dict().items()}
        if self.map_norm is not None:
            tensors.update(self.map_norm.state_tensors())
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, net in self._nets.items():
            prefix = f"{key}."
            net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                 if k.startswith(prefix)})
        if self.map_norm is not None:
            self.map_norm.load_state_tensors(tensors)
        self._eval()

    # ------------------------------------------------------------------ training
    def fit(self, images: torch.utils.data.Dataset, workdir: Path | None = None) -> None:
        data = self._load_images(images)
        workdir = Path(workdir) if workdir is not None else None
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(self.config.seed)
        digest = hashlib.sha256((data * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
        self._to_device(training_device(self.config.device))
        try:
            self._train_stage1(data, gen, workdir, self._fingerprint(digest, stage=1))
            self._train_stage2(data, gen, workdir, self._fingerprint(digest, stage=2))
        finally:
            self._to_device(torch.device("cpu"))
        self._eval()
        if self.map_norm is not None:
            self.map_norm.fit(self._good_maps(data))
        if workdir is not None:
            self._plot_losses(workdir)

    @torch.no_grad()
    def _good_maps(self, data: torch.Tensor) -> torch.Tensor:
        """Unnormalized residual maps ``(N, S, S)`` of the training images in [0, 1]."""
        self._eval()
        maps = []
        for i in range(0, len(data), 32):
            x = self._to_model(data[i:i + 32])
            maps.append(self._residual_map(x, self.generator(self.encoder(x))))
        return torch.cat(maps)

    def _to_device(self, device: torch.device) -> None:
        for net in self._nets.values():
            net.to(device)
        self._device = device

    def _load_images(self, images: torch.utils.data.Dataset) -> torch.Tensor:
        """All training images as one (N, 3, S, S) tensor: decoded once, not every epoch."""
        if len(images) == 0:
            raise FlawscopeError("fanogan: no training images")
        loader = torch.utils.data.DataLoader(images, batch_size=64)
        data = torch.cat([batch.float() for batch in loader])
        size = self.image_size
        if tuple(data.shape[1:]) != (3, size, size):
            raise FlawscopeError(f"fanogan: expected images of shape (3, {size}, {size}), "
                                 f"got {tuple(data.shape[1:])}")
        return data

    def _fingerprint(self, data_digest: str, stage: int) -> str:
        """Identifies what a stage's result depends on: settings and images (their digest).

        A checkpoint is only resumed by a fit with the same fingerprint. Stage 2 continues
        from stage 1's end, so its fingerprint adds ``stage1_epochs`` and its own settings.
        """
        config = dataclasses.asdict(self.config)
        settings = {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES
                    and k not in _STAGE2_ONLY and k not in _SCORING_ONLY}
        if stage == 2:
            settings.update({k: config[k] for k in [*_STAGE2_ONLY, "stage1_epochs"]})
        return json.dumps(settings, sort_keys=True) + f" data={data_digest}"

    def _batches(self, n: int) -> int:
        bpe = self.config.batches_per_epoch
        return bpe if bpe > 0 else math.ceil(n / self.config.batch_size)

    def _epoch_order(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Image indices of one epoch: shuffled passes, cut to whole batches if fixed size."""
        bpe = self.config.batches_per_epoch
        if bpe <= 0:
            return torch.randperm(n, generator=gen)
        need = bpe * self.config.batch_size
        perms = [torch.randperm(n, generator=gen) for _ in range(math.ceil(need / n))]
        return torch.cat(perms)[:need]

    def _batch(self, data: torch.Tensor, order: torch.Tensor, b: int,
               gen: torch.Generator) -> torch.Tensor:
        bs = self.config.batch_size
        x = data[order[b * bs:(b + 1) * bs]]
        if self.config.hflip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self._to_model(x.to(self._device))

    def _train_stage1(self, data: torch.Tensor, gen: torch.Generator, workdir: Path | None,
                      fingerprint: str) -> None:
        c = self.config
        G, D = self.generator, self.critic
        opt_g = torch.optim.Adam(G.parameters(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2))
        opt_d = torch.optim.Adam(D.parameters(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2))
        # Fixed latent codes so the sample grids of different epochs are comparable.
        z_show = self._latent(64, torch.Generator().manual_seed(c.seed + 1))

        def step(x: torch.Tensor, n_step: int) -> dict[str, float]:
            G.train()
            D.train()
            b = len(x)
            with torch.no_grad():
                fake = G(self._latent(b, gen))
            mix = torch.rand(b, 1, 1, 1, generator=gen).to(self._device)
            d_real, d_fake = D(x).mean(), D(fake).mean()
            gp = gradient_penalty(D, x, fake, mix, c.gp_weight)
            d_loss = d_fake - d_real + gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            losses = {"critic_loss": d_loss.item(), "wasserstein": (d_real - d_fake).item(),
                      "gradient_penalty": gp.item()}
            if n_step % c.n_critic == 0:
                D.requires_grad_(False)  # the generator step must not touch the critic
                g_loss = -D(G(self._latent(b, gen))).mean()
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                D.requires_grad_(True)
                losses["generator_loss"] = g_loss.item()
            return losses

        def pictures(epoch: int) -> None:
            self._eval()
            with torch.no_grad():
                samples = ((G(z_show) + 1) / 2).cpu()
            _save_grid(samples, 8, workdir / f"stage1_samples_epoch{epoch:05d}.png")

        # No monitor: the critic's loss and the Wasserstein estimate may be negative and swing
        # by design, so only non-finite losses and weights count as divergence here.
        self._run_stage(
            "stage1", "f-AnoGAN stage 1 (WGAN-GP)", data, gen, workdir, fingerprint,
            epochs=c.stage1_epochs, modules={"G": G, "D": D},
            optimizers={"G": opt_g, "D": opt_d}, step=step, pictures=pictures,
            picture_every=c.picture_every_stage1, monitor=None)

    def _train_stage2(self, data: torch.Tensor, gen: torch.Generator, workdir: Path | None,
                      fingerprint: str) -> None:
        c = self.config
        G, D, E = self.generator, self.critic, self.encoder
        # Frozen: no gradients, and eval mode so that batch-norm statistics stay put too.
        G.requires_grad_(False)
        D.requires_grad_(False)
        opt_e = torch.optim.Adam(E.parameters(), lr=c.encoder_lr or c.lr,
                                 betas=(c.adam_beta1, c.adam_beta2))
        x_show = self._to_model(data[:8].to(self._device))

        def step(x: torch.Tensor, n_step: int) -> dict[str, float]:
            G.eval()
            D.eval()
            E.train()
            rec = G(E(x))
            residual = ((x - rec) ** 2).mean()
            with torch.no_grad():
                f_real = D.features(x)
            feature = ((f_real - D.features(rec)) ** 2).mean()
            loss = residual + c.kappa * feature
            opt_e.zero_grad(set_to_none=True)
            loss.backward()
            opt_e.step()
            return {"encoder_loss": loss.item(), "residual": residual.item(),
                    "feature": feature.item()}

        def pictures(epoch: int) -> None:
            self._eval()
            with torch.no_grad():
                rec = G(E(x_show))
            _save_chain(x_show.cpu(), rec.cpu(),
                        workdir / f"stage2_reconstructions_epoch{epoch:05d}.png")

        try:
            self._run_stage(
                "stage2", "f-AnoGAN stage 2 (encoder)", data, gen, workdir,
                fingerprint, epochs=c.stage2_epochs, modules={"E": E},
                optimizers={"E": opt_e}, step=step, pictures=pictures,
                picture_every=c.picture_every_stage2, monitor="encoder_loss")
        finally:
            G.requires_grad_(True)
            D.requires_grad_(True)

    def _run_stage(self, stage: str, desc: str, data: torch.Tensor, gen: torch.Generator,
                   workdir: Path | None, fingerprint: str, epochs: int,
                   modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   step: Callable[[torch.Tensor, int], dict[str, float]],
                   pictures: Callable[[int], None], picture_every: int,
                   monitor: str | None) -> None:
        """One stage in the shared loop (:mod:`flawscope.trainloop`): position, RNG,
        checkpoints, Ctrl-C at the end of a step, divergence checks, loss CSV and pictures."""
        checkpoint = STAGE1_CHECKPOINT if stage == "stage1" else STAGE2_CHECKPOINT

        def draw(epoch: int, history: list[dict[str, float]]) -> None:
            pictures(epoch)
            self.history[stage] = history
            self._plot_losses(workdir)

        loop = TrainLoop(
            desc, modules=modules, optimizers=optimizers, generator=gen, epochs=epochs,
            batches_per_epoch=self._batches(len(data)),
            epoch_order=lambda g: self._epoch_order(len(data), g),
            batch=lambda order, b: self._batch(data, order, b, gen), step=step,
            monitor=monitor, checkpoint=workdir / checkpoint if workdir else None,
            fingerprint=fingerprint, csv=workdir / f"losses_{stage}.csv" if workdir else None,
            pictures=draw if workdir else None, picture_every=picture_every,
            what="this training stage", checkpoint_every_s=GPU_CHECKPOINT_EVERY_S
            if self._device.type == "cuda" else 0.0)
        self.history[stage] = loop.run()

    def _plot_losses(self, workdir: Path) -> None:
        """Loss curves of both stages side by side (what was trained so far)."""
        fig = Figure(figsize=(11, 4))  # no pyplot: leaves the caller's backend alone
        axes = fig.subplots(1, 2)
        for ax, stage, title in zip(axes, ("stage1", "stage2"),
                                    ("stage 1: WGAN-GP", "stage 2: encoder (izi_f)"),
                                    strict=True):
            rows = self.history[stage]
            for key in (rows[0] if rows else {}):
                if key != "epoch":
                    ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=key)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if rows:
                ax.legend()
            if stage == "stage2" and rows:
                ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(workdir / "losses.png", dpi=100)


# ---------------------------------------------------------------------------- files


def _save_grid(images: torch.Tensor, per_row: int, path: Path) -> None:
    arr = to_uint8(images)
    tile([arr[i:i + per_row] for i in range(0, len(arr), per_row)]).save(path)


def _save_chain(x: torch.Tensor, rec: torch.Tensor, path: Path) -> None:
    """Rows: real images, G(E(x)), and the residual |x - G(E(x))| as a heat map.

    The heat map's scale is the largest residual in the picture, so the picture shows where
    the reconstruction fails, not how much compared with other epochs (the CSV does that).
    """
    real, recon = (x + 1) / 2, (rec + 1) / 2
    residual = (real - recon).abs().mean(1)
    heat = colormaps["inferno"]((residual / residual.max().clamp_min(1e-6)).numpy())[..., :3]
    heat = (heat * 255).round().astype(np.uint8)
    tile([to_uint8(real), to_uint8(recon), heat]).save(path)
