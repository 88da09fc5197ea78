"""Structural similarity (SSIM, Wang et al. 2004) as a differentiable torch function.

SSIM compares two images patch by patch through luminance (local means), contrast (local
standard deviations) and structure (local correlation)::

    SSIM(p, q) = (2 mu_p mu_q + C1) (2 sigma_pq + C2)
                 / ((mu_p² + mu_q² + C1) (sigma_p² + sigma_q² + C2))

The local statistics are weighted by a Gaussian window (11 x 11 taps, sigma 1.5) and
``C1 = (0.01 L)²``, ``C2 = (0.03 L)²`` with ``L`` the data range: Wang et al.'s values, and
the window size and constants of Bergmann et al. 2019 (their ``k = 11``, ``c1 = 0.01``,
``c2 = 0.03``, read as the usual K1, K2 of Wang et al.).

The map has the input's size: borders are reflect-padded by half a window, so every pixel
gets a value (a defect at the image edge must show in the anomaly map). Multi-channel
images get one SSIM map per channel; callers average over channels (as scikit-image does
for colour images). Everything here is plain torch, so it is differentiable (the SSIM
autoencoder's loss) and traceable (ONNX export of the anomaly map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Wang et al. 2004 / Bergmann et al. 2019.
WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
K1 = 0.01
K2 = 0.03


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian of ``size`` taps (the 2-D window is its outer product)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be odd and positive, got {size}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).float()


#: Sides up to this are blurred by two small matrix products (``A_h @ x @ A_w.T``) instead
#: of two depthwise convolutions; same result up to float rounding (2e-7). Forward +
#: backward over batches of 15 channels (SSIM's five statistics of RGB), one thread, Intel
#: Xeon, seconds for convolution -> matrices (``benchmarks/blur_speed.py``): default
#: (AVX-512) kernels 1.17 -> 0.42 at 32 px, 0.93 -> 0.48 at 128, 1.02 -> 0.65 at 256;
#: AVX2 kernels 1.15 -> 0.44, 0.77 -> 0.52, 0.83 -> 0.75, and at 512 px 0.89 -> 1.48: the
#: products' cost grows with the side, the convolution's does not.
MATRIX_BLUR_MAX_SIDE = 256


def separable_blur(x: torch.Tensor, window: torch.Tensor, pad_mode: str = "reflect"
                   ) -> torch.Tensor:
    """Filter every channel of ``(B, C, H, W)`` with the 2-D window ``outer(window, window)``.

    Same-size output: the border is padded by half the window (``pad_mode`` as in F.pad).
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])  # constants when traced: ONNX needs them static
    window = window.to(dtype=x.dtype, device=x.device)
    if max(h, w) <= MATRIX_BLUR_MAX_SIDE:
        # Built on every call: 1.3 ms at 256 px (one thread), against seconds for the
        # SSIM autoencoder's training step that calls it.
        rows = blur_operator(h, window, pad_mode)
        cols = rows if w == h else blur_operator(w, window, pad_mode)
        return rows @ x @ cols.T
    channels = int(x.shape[1])
    pad = len(window) // 2
    kv = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    kh = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    if pad:
        x = F.pad(x, [pad] * 4, mode=pad_mode)
    x = F.conv2d(x, kv, groups=channels)
    return F.conv2d(x, kh, groups=channels)


def blur_operator(n: int, window: torch.Tensor, pad_mode: str = "reflect") -> torch.Tensor:
    """The ``(n, n)`` matrix of "pad by half the window, then filter" along one axis of
    length ``n``, built by passing the ``n`` unit vectors through those very operations."""
    pad = len(window) // 2
    with torch.no_grad():
        e = torch.eye(n, dtype=window.dtype, device=window.device)[:, None, :]
        if pad:
            e = F.pad(e, (pad, pad), mode=pad_mode)
        return F.conv1d(e, window.view(1, 1, -1))[:, 0].T.contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
             window_size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA,
             k1: float = K1, k2: float = K2) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of ``(B, C, H, W)`` images: ``(B, C, H, W)``, 1 = same.

    Computed in float32 at least (half-precision variances lose the small differences SSIM
    is about).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim_map needs two (B, C, H, W) tensors of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    c = x.shape[1]
    window = gaussian_window(window_size, sigma)
    # Variances and the covariance do not change when x and y are shifted, but E[x²] - mu²
    # cancels in float32 where both are large and nearly equal (a flat bright background:
    # maps differed by 2.6e-4 of their maximum between two runtimes on MVTec screw). So the
    # second moments are taken of the images minus their own mean, which keeps them small.
    x0, y0 = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
    xs, ys = x - x0, y - y0
    # One grouped convolution for all five local statistics.
    stats = separable_blur(torch.cat([xs, ys, xs * xs, ys * ys, xs * ys], dim=1), window)
    mu_xs, mu_ys, xx, yy, xy = stats.split(c, dim=1)
    var_x, var_y, cov = xx - mu_xs * mu_xs, yy - mu_ys * mu_ys, xy - mu_xs * mu_ys
    mu_x, mu_y = mu_xs + x0, mu_ys + y0
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image, ``(B,)``."""
    return ssim_map(x, y, data_range).flatten(1).mean(1)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``1 - mean SSIM`` over the batch: 0 for a perfect reconstruction, differentiable."""
    return 1 - ssim_map(x, y, data_range).mean()
