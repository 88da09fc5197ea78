"""Anomaly-map helpers shared by the models (private: not a model module)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..ssim import blur_operator, gaussian_window, separable_blur


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian of radius ``int(4 sigma + 0.5)`` (the usual truncation)."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smooth_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(B, h, w)`` maps blurred by a Gaussian of ``sigma`` pixels, radius ``int(4 sigma +
    0.5)`` (the reconstruction models' map smoothing); unchanged for ``sigma <= 0``."""
    if sigma <= 0:
        return maps
    size = 2 * int(4 * sigma + 0.5) + 1
    return separable_blur(maps[:, None], gaussian_window(size, sigma))[:, 0]


def upsample_and_smooth(maps: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """``(B, h, w)`` patch scores -> ``(B, size, size)``: bilinear upsampling, then a Gaussian
    blur of ``sigma`` pixels at that resolution (reflect padding).

    Both steps are linear and separable, so along each axis they are one ``(size, n)`` matrix
    and the whole map is ``A_h @ maps @ A_w.T``: two small matrix products per image instead
    of an upsampling and two 33-tap convolutions over 256 x 256 pixels. Same result up to
    float rounding; measured 3.7 ms -> 0.04 ms per image (16 maps of 32 x 32 to 256 x 256).
    """
    x = maps.float()
    h, w = x.shape[-2:]
    if (h, w) == (size, size) and sigma <= 0:
        return x
    return _axis_operator(h, size, sigma) @ x @ _axis_operator(w, size, sigma).T


@functools.lru_cache(maxsize=32)
def _axis_operator(n: int, size: int, sigma: float) -> torch.Tensor:
    """The ``(size, n)`` matrix of "linear upsampling n -> size, then the Gaussian blur", built
    by passing the n unit vectors through the upsampling (the blur's matrix is built the same
    way by :func:`~flawscope.ssim.blur_operator`)."""
    x = torch.eye(n)[:, None, :]  # n signals of length n
    if n != size:
        x = F.interpolate(x, size=size, mode="linear", align_corners=False)
    upsample = x[:, 0].T.contiguous()
    if sigma <= 0:
        return upsample
    return blur_operator(size, gaussian_kernel1d(sigma)) @ upsample
