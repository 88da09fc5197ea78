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

In a tiled geometry (:mod:`flawscope.geometry`) ``tile_statistics`` says what a position is:

- ``"shared"`` (the default): a patch position inside a tile. Its Gaussian pools that position
  of every tile of every image, so it models "what any part of the surface looks like" and
  suits unaligned parts and textures; but a pattern normal in one place of the image is
  normal everywhere.
- ``"per_position"``: a patch position inside a tile *and* the tile's place in the image's
  grid. Each tile position gets its own Gaussians, fitted on that tile of every training
  image, as PaDiM models a whole aligned image: for parts photographed in the same pose and
  framing, where something normal in one tile (a bright label, a hole) is a defect in
  another. Every image must then have the training images' tile grid (the same working
  size; otherwise :class:`~flawscope.errors.TileGridError`), the model is as many times
  larger as there are tiles, each Gaussian is fitted on as many samples as there are
  images (not images x tiles), and it cannot be exported to ONNX (the exported graph scores
  tiles without knowing where they lie). On unaligned parts it is the wrong choice: a tile
  position sees a different piece of the part in each image, so its Gaussians widen (less
  sensitive) and a pose outside the training poses scores as a defect. In ``resize``
  geometry (one "tile", the whole image) both settings are the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbones import (
    EnsembleExtractor,
    FeatureExtractor,
    check_intensity,
    create_extractor,
    feature_channels,
)
from ..errors import FlawscopeError, ModelFileError, TileGridError
from ..geometry import TileDataset, TileGrid, grid_mismatch
from . import register
from ._maps import upsample_and_smooth
from .base import AnomalyModel, ScoreBatchModule

#: Positions whose covariance is inverted together (bounds the float64 temporaries).
_POSITIONS_PER_STEP = 256
TILE_STATISTICS = ("shared", "per_position")


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
    #: "raw", "standardized", "matched" or "highpass": as patchcore's ``intensity``.
    intensity: str = "raw"
    #: Channels kept from the concatenated features (the paper's d = 100 for ResNet-18).
    n_features: int = 100
    #: Added to the covariance diagonal (the paper's 0.01).
    eps: float = 0.01
    sigma: float = 4.0
    batch_size: int = 16
    #: Channels-last activations in the backbone: measured 1.8x faster on an AVX2 CPU.
    channels_last: bool = True
    seed: int = 0
    #: Tiled geometries only: "shared" (one set of Gaussians for the patch positions of a
    #: tile, pooled over every tile: parts in any pose, textures) or "per_position" (a set
    #: per tile position of the grid: aligned parts in the same pose and framing; every
    #: image must have the training images' size; model size x the number of tiles; no
    #: ONNX export). See the module docstring.
    tile_statistics: str = "shared"


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
        check_intensity(self.config.intensity)
        # an ensemble's maps hold every member's channels
        total = sum(feature_channels(self.config.backbone, tuple(self.config.stages)))
        if not 1 <= self.config.n_features <= total:
            raise FlawscopeError(f"n_features={self.config.n_features}: the chosen stages have "
                                 f"{total} channels; choose 1..{total}")
        generator = torch.Generator().manual_seed(int(self.config.seed))
        self.channels = torch.randperm(total, generator=generator)[:self.config.n_features]
        self.channels = self.channels.sort().values
        if self.config.tile_statistics not in TILE_STATISTICS:
            raise FlawscopeError(f"tile_statistics={self.config.tile_statistics!r}: choose "
                                 f"one of {', '.join(TILE_STATISTICS)}")
        self._extractor: FeatureExtractor | EnsembleExtractor | None = None
        self.mean: torch.Tensor | None = None          # (P, d); (T * P, d) per tile position
        self.inv_cov: torch.Tensor | None = None       # (P, d, d); (T * P, d, d)
        self.grid: tuple[int, int] | None = None
        #: The tile grid of the training images, when statistics are kept per tile position
        #: (mean and inv_cov hold its T tiles' blocks of P positions, in order); else None.
        self.tile_grid: TileGrid | None = None
        #: (n, mean, inverse of M2 / (n - 2) + eps I), float64, kept from the last fit for
        #: leave-one-out (not saved).
        self._loo: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def extractor(self) -> FeatureExtractor | EnsembleExtractor:
        if self._extractor is None:
            self._extractor = create_extractor(self.config.backbone, tuple(self.config.stages),
                                               channels_last=self.config.channels_last,
                                               intensity=self.config.intensity)
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
        self.extractor.fit_intensity(images)
        if self.config.tile_statistics == "per_position" and isinstance(images, TileDataset):
            self._fit_per_tile_position(images)
            return
        self.tile_grid = None
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
        self._set_gaussians(shift, total, outer, n, leave_one_out=True)

    def _fit_per_tile_position(self, tiles: TileDataset) -> None:
        """Gaussians per (tile position, patch position): the same streamed sums as
        :meth:`fit`, accumulated separately for each tile position of the common grid."""
        grid = tiles.common_grid()  # TileGridError naming the first image that differs
        n_images, n_tiles = len(tiles.grids), len(grid.starts)
        if n_images < 2:
            raise FlawscopeError("padim with tile_statistics='per_position' needs at least two "
                                 "training images (each tile position is fitted on one tile "
                                 "per image)")
        positions = torch.tensor(tiles.positions)
        loader = torch.utils.data.DataLoader(tiles, batch_size=self.config.batch_size)
        shift = total = outer = None
        fitted = torch.zeros(n_tiles, dtype=torch.bool)
        seen = 0
        for batch in tqdm(loader, desc="features", leave=False, disable=None):
            x = self.embed(batch)                                   # (B, P, d)
            where = positions[seen:seen + len(x)]
            seen += len(x)
            if shift is None:
                shift = torch.zeros(n_tiles, *x.shape[1:])
                total = torch.zeros_like(shift)
                outer = torch.zeros(n_tiles, x.shape[1], x.shape[2], x.shape[2])
            for t in where.unique().tolist():
                xt = x[where == t]
                if not fitted[t]:  # shift each tile position by its first tiles' mean
                    shift[t] = xt.mean(0)
                    fitted[t] = True
                xt = xt - shift[t]
                total[t] += xt.sum(0)
                xt = xt.permute(1, 2, 0)
                outer[t].baddbmm_(xt, xt.transpose(1, 2))
        d = shift.shape[-1]
        # Every image has every tile position once, so each position has n_images samples.
        self._set_gaussians(shift.reshape(-1, d), total.reshape(-1, d),
                            outer.reshape(-1, d, d), n_images, leave_one_out=False)
        self.tile_grid = grid

    def _set_gaussians(self, shift: torch.Tensor, total: torch.Tensor, outer: torch.Tensor,
                       n: int, leave_one_out: bool) -> None:
        """Means and inverse covariances from ``n`` samples per position: ``total`` and
        ``outer`` (overwritten) are the sums of ``x - shift`` and of its outer products."""
        mean_c = total.double() / n
        eye = self.config.eps * torch.eye(outer.shape[-1], dtype=torch.float64)
        # Covariance and inverse in float64 but a slice of positions at a time, written into
        # float32 in place: the peak stays near one float32 copy of the covariances.
        inv_cov = outer
        # float64: the leave-one-out distance divides by 1 - c^2 q (below), which is near 0
        # for an image that dominates a direction; with a float32 inverse, 12 images of 20
        # features were measured 1.3% off a refit, with float64 1e-8.
        loo_inv = (torch.empty(outer.shape, dtype=torch.float64) if leave_one_out and n > 2
                   else None)
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
        if self.tile_grid is not None:
            raise FlawscopeError(
                "padim with tile_statistics='per_position' cannot be exported to ONNX: the "
                "exported graph scores tiles without knowing where in the image they lie; "
                "score it with flawscope itself (--engine torch), or refit with the default "
                "tile_statistics=shared to export")
        return ScoreBatchModule(self)

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None:
            raise FlawscopeError("padim model is not fitted")
        if self.tile_grid is not None:
            raise FlawscopeError(
                "this padim keeps statistics per tile position (tile_statistics="
                "'per_position'): score whole images through flawscope.geometry "
                "(Detector, score_images), which says where each tile lies")
        x = self.embed(images)
        if x.shape[1] != self.mean.shape[0]:
            raise FlawscopeError(f"padim was fitted for {self.mean.shape[0]} positions, got "
                                 f"{x.shape[1]}: images must be {self.image_size} px")
        delta = (x - self.mean).transpose(0, 1)                     # (P, B, d)
        dist2 = (torch.bmm(delta, self.inv_cov) * delta).sum(-1)    # (P, B)
        return self._maps(dist2)

    def _maps(self, dist2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances ``(P, B)`` -> image scores ``(B,)`` and maps ``(B, S, S)``."""
        b = dist2.shape[1]
        h, w = self.grid
        maps = dist2.clamp_min(0).sqrt().T.reshape(b, h, w)
        maps = upsample_and_smooth(maps, self.image_size, self.config.sigma)
        return maps.flatten(1).amax(1), maps

    @torch.inference_mode()
    def score_tiles(self, tiles: torch.Tensor, grid: TileGrid, positions: torch.Tensor,
                    engine=None) -> tuple[torch.Tensor, torch.Tensor]:
        """With statistics per tile position, each tile against its own position's
        Gaussians; otherwise as every model (see :meth:`AnomalyModel.score_tiles`)."""
        if self.tile_grid is None:
            return super().score_tiles(tiles, grid, positions, engine)
        if grid != self.tile_grid:
            raise TileGridError(f"an image: {grid_mismatch(grid, self.tile_grid)} "
                                "(padim tile_statistics=shared)")
        if engine is not None and getattr(engine, "model", None) is not self:
            # Only PyTorch on this very model can be given the positions (export is refused).
            raise FlawscopeError("padim with tile_statistics='per_position' scores in PyTorch "
                                 "only (--engine torch)")
        return self.score_tensor(tiles, lambda t: self._score_at(t, positions))

    def _score_at(self, tiles: torch.Tensor, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tiles)                                        # (B, P, d)
        n_tiles, (p, d) = len(self.tile_grid.starts), x.shape[1:]
        mean = self.mean.view(n_tiles, p, d)
        inv_cov = self.inv_cov.view(n_tiles, p, d, d)
        dist2 = torch.empty(p, len(x))
        for b, t in enumerate(positions.tolist()):
            delta = (x[b] - mean[t])[:, None]                        # (P, 1, d)
            dist2[:, b] = (torch.bmm(delta, inv_cov[t]) * delta).sum(-1)[:, 0]
        return self._maps(dist2)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise FlawscopeError("padim model is not fitted")
        return {"mean": self.mean, "inv_cov": self.inv_cov, "channels": self.channels,
                "grid": torch.tensor(self.grid),
                **self.extractor.intensity_state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"mean", "inv_cov", "channels", "grid"} - set(tensors)
        if missing:
            raise FlawscopeError(f"padim model file lacks {', '.join(sorted(missing))}")
        self.mean, self.inv_cov = tensors["mean"], tensors["inv_cov"]
        self.channels = tensors["channels"].long()
        self.grid = tuple(int(v) for v in tensors["grid"])
        self.extractor.load_intensity_state(tensors, self.name)

    def extra_state(self) -> dict:
        """The tile grid of per-position statistics (nothing otherwise, as before it
        existed)."""
        return {} if self.tile_grid is None else {"tile_grid": self.tile_grid.to_dict()}

    def load_extra_state(self, state: dict) -> None:
        record = state.get("tile_grid")
        self.tile_grid = None if record is None else TileGrid.from_dict(record)
        if self.tile_grid is not None and self.mean is not None:
            expected = len(self.tile_grid.starts) * self.grid[0] * self.grid[1]
            if self.mean.shape[0] != expected:
                raise ModelFileError(f"padim model file: {self.mean.shape[0]} positions, but "
                                     f"{self.tile_grid.describe()} needs {expected}")
