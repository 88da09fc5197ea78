"""The anomaly-map resampling of the feature models against SciPy's Gaussian filter."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from flawscope.models._maps import upsample_and_smooth


def test_upsample_and_smooth_equals_bilinear_then_scipy_gaussian():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 12, 9, generator=g) * 5
    maps[1, 4, 4] = 40.0  # one hot patch: the blur must spread it symmetrically
    ours = upsample_and_smooth(maps, 64, sigma=4.0)
    up = F.interpolate(maps[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    # torch's "reflect" padding is SciPy's "mirror"; radius int(4 sigma + 0.5) is truncate=4.
    expected = np.stack([gaussian_filter(m, 4.0, mode="mirror", truncate=4.0)
                         for m in up.double().numpy()])
    assert ours.shape == (3, 64, 64)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_upsample_and_smooth_without_blur_is_plain_bilinear_and_keeps_full_size_maps():
    maps = torch.rand(2, 8, 8)
    up = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(upsample_and_smooth(maps, 32, sigma=0), up)
    full = torch.rand(2, 32, 32)
    assert torch.equal(upsample_and_smooth(full, 32, sigma=0), full)
