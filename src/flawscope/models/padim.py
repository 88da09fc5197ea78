"""``padim``: a Gaussian per patch position over pretrained features, Mahalanobis distance.

After Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization" (ICPR 2020):

1. Feature maps of three block groups of an ImageNet backbone (:mod:`flawscope.backbones`)
   are brought to the finest one's resolution and concatenated; a fixed random subset of
   ``n_features`` channels (drawn with ``seed``) is kept. The paper shows a random subset works
   as well as PCA and costs nothing.
2. At every patch position the good images' feature vectors get a mean and a covariance, plus
   ``eps * I`` so that it is invertible with few images. The inverse is computed once, when
   fitting, in float64, and stored.
3. The map is the Mahalanobis distance of each patch to its position's Gaussian, upsampled to
   the image and smoothed; the image score is the map's maximum.

Fitting streams: it accumulates sums (shifted by the first batch's mean, which keeps float32
sums accurate) instead of holding every training embedding, so memory does not grow with the
number of images. Unlike PatchCore it assumes parts are photographed in roughly the same pose,
since each position has its own model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbones import EnsembleExtractor, FeatureExtractor, create_extractor, feature_channels
from ..errors import FlawscopeError
from . import register
from ._maps import upsample_and_smooth
from .base import AnomalyModel, ScoreBatchModule

#: Positions whose covariance is inverted together (bounds the float64 temporaries).
_POSITIONS_PER_STEP = 256


@dataclass
class PadimConfig:
    #: 256 as for patchcore: stride 4 of the first group gives 64 x 64 positions.
    image_size: int = 256
    #: A key of flawscope.backbones.BACKBONES (efficientnet_lite0, _lite1, _lite2), or
    #: several joined by "+" (an ensemble: each patch's features from every backbone,
    #: concatenated; flawscope.backbones.EnsembleExtractor).
    backbone: str = "efficientnet_lite0"
    #: Block groups (strides 4, 8, 16 for EfficientNet-Lite: 24 + 40 + 112 channels).
    stages: tuple[int, ...] = (1, 2, 4)
    #: Channels kept from the concatenated features (the paper's d = 100 for ResNet-18).
    n_features: int = 100
    #: Added to the covariance diagonal (the paper's 0.01).
    eps: float = 0.01
    sigma: float = 4.0
    batch_size: int = 16
    #: Channels-last activations in the backbone: measured 1.8x faster on an AVX2 CPU.
    channels_last: bool = True
    seed: int = 0


@register
class PadimModel(AnomalyModel):
    name = "padim"
    Config = PadimConfig
    presets = {
        "default": {},
        # Stride-8 positions and fewer channels: about 4x less memory and time.
        "fast": {"image_size": 224, "stages": (2, 4), "n_features": 64},
    }
    default_preset = "default"

    def __init__(self, config: PadimConfig | None = None):
        super().__init__(config)
        # an ensemble's maps hold every member's channels
        total = sum(feature_channels(self.config.backbone, tuple(self.config.stages)))
        if not 1 <= self.config.n_features <= total:
            raise FlawscopeError(f"n_features={self.config.n_features}: the chosen stages have "
                                 f"{total} channels; choose 1..{total}")
        generator = torch.Generator().manual_seed(int(self.config.seed))
        self.channels = torch.randperm(total, generator=generator)[:self.config.n_features]
        self.channels = self.channels.sort().values
        self._extractor: FeatureExtractor | EnsembleExtractor | None = None
        self.mean: torch.Tensor | None = None          # (P, d)
        self.inv_cov: torch.Tensor | None = None       # (P, d, d)
        self.grid: tuple[int, int] | None = None
        #: (n, mean, inverse of M2 / (n - 2) + eps I), float64, kept from the last fit for
        #: leave-one-out (not saved).
        self._loo: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def extractor(self) -> FeatureExtractor | EnsembleExtractor:
        if self._extractor is None:
            self._extractor = create_extractor(self.config.backbone, tuple(self.config.stages),
                                               channels_last=self.config.channels_last)
            # the channel subset was drawn from feature_channels: it must be the real count
            assert sum(self._extractor.channels) == sum(
                feature_channels(self.config.backbone, tuple(self.config.stages)))
        return self._extractor

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, P, d)`` selected features per patch position."""
        features = self.extractor(images)
        size = features[0].shape[-2:]
        features = [f if f.shape[-2:] == size else
                    F.interpolate(f, size=size, mode="nearest") for f in features]
        emb = torch.cat(features, 1)[:, self.channels]
        self.grid = (int(size[0]), int(size[1]))
        return emb.flatten(2).transpose(1, 2).contiguous()

    def fit(self, images: torch.utils.data.Dataset, workdir: Path | None = None) -> None:
        if len(images) < 2:
            raise FlawscopeError("padim needs at least two training images")
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.batch_size)
        shift = total = outer = None
        n = 0
        for batch in tqdm(loader, desc="features", leave=False, disable=None):
            x = self.embed(batch)                                   # (B, P, d)
            if shift is None:
                shift = x.mean(0)
                total = torch.zeros_like(shift)
                outer = torch.zeros(shift.shape[0], shift.shape[1], shift.shape[1])
            x = x - shift
            total += x.sum(0)
            # sum over the batch of x x^T, per position: (P, d, B) @ (P, B, d)
            xt = x.permute(1, 2, 0)
            outer.baddbmm_(xt, xt.transpose(1, 2))
            n += x.shape[0]
        mean_c = total.double() / n
        eye = self.config.eps * torch.eye(outer.shape[-1], dtype=torch.float64)
        # Covariance and inverse in float64 but a slice of positions at a time, written into
        # float32 in place: the peak stays near one float32 copy of the covariances.
        inv_cov = outer
        # float64: the leave-one-out distance divides by 1 - c^2 q (below), which is near 0
        # for an image that dominates a direction; with a float32 inverse, 12 images of 20
        # features were measured 1.3% off a refit, with float64 1e-8.
        loo_inv = torch.empty(outer.shape, dtype=torch.float64) if n > 2 else None
        for start in range(0, len(outer), _POSITIONS_PER_STEP):
            part = slice(start, start + _POSITIONS_PER_STEP)
            m = mean_c[part]
            m2 = outer[part].double() - n * m[:, :, None] * m[:, None, :]  # sum of squares
            inv_cov[part] = torch.linalg.inv(m2 / (n - 1) + eye).float()
            if loo_inv is not None:
                loo_inv[part] = torch.linalg.inv(m2 / (n - 2) + eye)
        self.inv_cov = inv_cov
        self.mean = (mean_c + shift.double()).float()
        self._loo = None if loo_inv is None else (n, mean_c + shift.double(), loo_inv)

    supports_leave_one_out = True

    @torch.inference_mode()
    def leave_one_out_scores(self, images: torch.utils.data.Dataset
                             ) -> tuple[np.ndarray, np.ndarray] | None:
        """Each training image's Mahalanobis map under the Gaussians fitted without it.

        Closed form, per position, with ``d = x_i - mean`` and ``M2`` the sum of squared
        deviations of all ``n`` images: without image ``i`` the mean is
        ``mean - d / (n - 1)``, so ``x_i`` lies ``n / (n - 1) * d`` from it, and the sum of
        squares is down-dated by rank one, ``M2 - n / (n - 1) * d d^T`` (Welford). The
        covariance without ``i`` is ``B - c^2 d d^T`` with ``B = M2 / (n - 2) + eps I`` and
        ``c^2 = n / ((n - 1)(n - 2))``; by Sherman-Morrison, with ``q = d^T B^-1 d``, the
        squared distance is ``(n / (n - 1))^2 * q / (1 - c^2 q)``. ``B^-1`` is computed once
        while fitting, so this costs one scoring pass over the training images and equals a
        refit without the image (up to float rounding).
        """
        if self._loo is None or self.mean is None:
            return None
        n, mean, inv_b = self._loo
        if len(images) != n:
            raise FlawscopeError(f"leave-one-out needs the {n} images padim was fitted on, "
                                 f"got {len(images)}")
        c2 = n / ((n - 1) * (n - 2))
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.batch_size)
        scores, maps = [], []
        for batch in tqdm(loader, desc="leave-one-out", leave=False, disable=None):
            delta = (self.embed(batch).double() - mean).transpose(0, 1)   # (P, B, d)
            q = (torch.bmm(delta, inv_b) * delta).sum(-1)                 # (P, B)
            # 1 - c^2 q > 0 exactly (the down-dated covariance is positive definite).
            dist2 = (n / (n - 1)) ** 2 * q / (1 - c2 * q).clamp_min(1e-12)
            h, w = self.grid
            m = dist2.clamp_min(0).sqrt().float().T.reshape(-1, h, w)
            m = upsample_and_smooth(m, self.image_size, self.config.sigma)
            scores.append(m.flatten(1).amax(1))
            maps.append(m)
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def onnx_module(self) -> torch.nn.Module:
        """Scoring is a fixed torch graph: exported as is (see ``flawscope export``)."""
        return ScoreBatchModule(self)

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None:
            raise FlawscopeError("padim model is not fitted")
        x = self.embed(images)
        if x.shape[1] != self.mean.shape[0]:
            raise FlawscopeError(f"padim was fitted for {self.mean.shape[0]} positions, got "
                                 f"{x.shape[1]}: images must be {self.image_size} px")
        delta = (x - self.mean).transpose(0, 1)                     # (P, B, d)
        dist2 = (torch.bmm(delta, self.inv_cov) * delta).sum(-1)    # (P, B)
        b = x.shape[0]
        h, w = self.grid
        maps = dist2.clamp_min(0).sqrt().T.reshape(b, h, w)
        maps = upsample_and_smooth(maps, self.image_size, self.config.sigma)
        return maps.flatten(1).amax(1), maps

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise FlawscopeError("padim model is not fitted")
        return {"mean": self.mean, "inv_cov": self.inv_cov, "channels": self.channels,
                "grid": torch.tensor(self.grid)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"mean", "inv_cov", "channels", "grid"} - set(tensors)
        if missing:
            raise FlawscopeError(f"padim model file lacks {', '.join(sorted(missing))}")
        self.mean, self.inv_cov = tensors["mean"], tensors["inv_cov"]
        self.channels = tensors["channels"].long()
        self.grid = tuple(int(v) for v in tensors["grid"])
