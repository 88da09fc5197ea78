"""``gaussian``: a per-pixel Gaussian model of the good images, the honest baseline.

Each pixel (and channel) of the resized good images gets a mean and a standard deviation;
the anomaly map of a new image is the absolute z-score averaged over channels and smoothed
with a Gaussian filter, and the image score is the map's maximum. There is no alignment, so
it only works where parts are photographed in the same pose: it is here to prove the
pipeline and to show what the learned models must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FlawscopeError
from . import register
from .base import AnomalyModel, resize_maps


@dataclass
class GaussianConfig:
    image_size: int = 128
    #: Smoothing of the z-score map, in pixels at ``image_size``.
    sigma: float = 2.0
    #: Floor on the per-pixel standard deviation, in [0, 1] intensity units, so that pixels
    #: that never vary in training do not give infinite z-scores.
    min_std: float = 0.02
    batch_size: int = 32
    seed: int = 0


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian, 2*round(4 sigma)+1 taps (as torchvision's gaussian_blur)."""
    size = 2 * int(4 * sigma + 0.5) + 1
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).float()


class GaussianScorer(torch.nn.Module):
    """The scoring graph: z-score, channel mean, separable Gaussian blur (reflect padding),
    max. A module of plain torch operations, so the same code scores in PyTorch and is
    exported to ONNX."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, sigma: float):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel_v", kernel.view(1, 1, -1, 1))
        self.register_buffer("kernel_h", kernel.view(1, 1, 1, -1))
        self.pad = len(kernel) // 2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = ((images - self.mean) / self.std).abs().mean(1, keepdim=True)
        if self.pad:
            z = F.pad(z, [self.pad] * 4, mode="reflect")
            z = F.conv2d(F.conv2d(z, self.kernel_v), self.kernel_h)
        maps = z[:, 0]
        return maps.flatten(1).amax(1), maps


@register
class GaussianModel(AnomalyModel):
    name = "gaussian"
    Config = GaussianConfig
    presets = {"fast": {}, "paper": {}}

    def __init__(self, config: GaussianConfig | None = None):
        super().__init__(config)
        size = self.config.image_size
        self.mean = torch.zeros(3, size, size)
        self.std = torch.ones(3, size, size)

    def fit(self, images: torch.utils.data.Dataset, workdir: Path | None = None) -> None:
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.batch_size)
        total = torch.zeros_like(self.mean, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        count = 0
        for batch in loader:
            batch = batch.double()
            total += batch.sum(0)
            total_sq += (batch * batch).sum(0)
            count += batch.shape[0]
        self.mean, self.std = self._mean_std(total, total_sq, count)
        self._sums = (total, total_sq, count)

    def _mean_std(self, total: torch.Tensor, total_sq: torch.Tensor,
                  count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel mean and floored standard deviation (ddof 0) from float64 sums."""
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float().clamp_min(self.config.min_std)

    supports_leave_one_out = True
    _sums: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @torch.no_grad()
    def leave_one_out_scores(self, images: torch.utils.data.Dataset
                             ) -> tuple[np.ndarray, np.ndarray] | None:
        """Each training image scored by the per-pixel mean and deviation of the others:
        its own pixels subtracted from the fitted sums (exactly a refit without it)."""
        if self._sums is None or self._sums[2] < 2:
            return None
        total, total_sq, count = self._sums
        if len(images) != count:
            raise FlawscopeError(f"leave-one-out needs the {count} images gaussian was fitted "
                                 f"on, got {len(images)}")
        loader = torch.utils.data.DataLoader(images, batch_size=self.config.batch_size)
        scores, maps = [], []
        for batch in loader:
            x = batch.double()
            mean, std = self._mean_std(total - x, total_sq - x * x, count - 1)
            s, m = GaussianScorer(mean, std, float(self.config.sigma))(batch)
            scores.append(s)
            maps.append(resize_maps(m, batch.shape[-2:]))
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.onnx_module()(images)

    def onnx_module(self) -> GaussianScorer:
        return GaussianScorer(self.mean, self.std, float(self.config.sigma))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean, self.std = tensors["mean"], tensors["std"]
