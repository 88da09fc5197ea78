"""SSIM: identity, agreement with scikit-image, and gradients fit for training."""

import numpy as np
import pytest
import torch

from flawscope.ssim import gaussian_window, separable_blur, ssim, ssim_loss, ssim_map


def images(seed: int, shape=(2, 3, 40, 48)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_ssim_of_an_image_with_itself_is_one_everywhere():
    x = images(0)
    smap = ssim_map(x, x)
    assert smap.shape == x.shape  # same size as the input: borders are padded
    torch.testing.assert_close(smap, torch.ones_like(smap), rtol=0, atol=1e-5)
    torch.testing.assert_close(ssim(x, x), torch.ones(2), rtol=0, atol=1e-5)
    flat = torch.full((1, 1, 20, 20), 0.3)  # no variance at all: C1, C2 keep it defined
    torch.testing.assert_close(ssim_map(flat, flat), torch.ones_like(flat))


def test_ssim_drops_where_images_differ_and_is_symmetric():
    x = images(1)
    y = x.clone()
    y[:, :, 10:20, 10:20] = 1 - y[:, :, 10:20, 10:20]
    smap = ssim_map(x, y)
    assert smap[:, :, 12:18, 12:18].max() < 0.5
    torch.testing.assert_close(smap[:, :, 30:, 30:], torch.ones_like(smap[:, :, 30:, 30:]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(smap, ssim_map(y, x))


def test_matches_scikit_image_away_from_the_border():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = images(2, (1, 1, 64, 64))[0, 0], images(3, (1, 1, 64, 64))[0, 0]
    y = 0.6 * x + 0.4 * y  # related images: SSIM well inside (0, 1)
    _, reference = metrics.structural_similarity(
        x.double().numpy(), y.double().numpy(), data_range=1.0, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, full=True)
    ours = ssim_map(x[None, None], y[None, None])[0, 0].numpy()
    inner = np.s_[5:-5, 5:-5]  # skimage's border handling differs from our reflect padding
    np.testing.assert_allclose(ours[inner], reference[inner], atol=1e-4)


def test_gaussian_window_is_the_papers():
    w = gaussian_window()
    assert len(w) == 11 and abs(float(w.sum()) - 1) < 1e-6
    assert int(w.argmax()) == 5
    with pytest.raises(ValueError):
        gaussian_window(10)


@pytest.mark.parametrize("same", [False, True])
def test_ssim_loss_gradients_are_finite(same):
    x = images(4)
    y = (x.clone() if same else images(5)).requires_grad_(True)
    loss = ssim_loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(y.grad).all()
    if same:
        assert float(loss.detach()) == pytest.approx(0, abs=1e-5)
    else:
        assert float(loss.detach()) > 0.5 and y.grad.abs().sum() > 0
    flat = torch.zeros(1, 3, 16, 16, requires_grad=True)  # zero variance: still finite
    ssim_loss(torch.zeros(1, 3, 16, 16), flat).backward()
    assert torch.isfinite(flat.grad).all()


@pytest.mark.parametrize("side", [24, 300])  # the matrix path and the convolution path
@pytest.mark.parametrize("pad_mode", ["reflect", "replicate", "constant"])
def test_blur_is_the_padded_depthwise_convolution_at_every_size(side, pad_mode):
    x = images(6, (2, 3, side, side + 8))
    w = gaussian_window()
    kernel = torch.outer(w, w).expand(3, 1, 11, 11)
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, [5] * 4, mode=pad_mode), kernel, groups=3)
    torch.testing.assert_close(separable_blur(x, w, pad_mode), expected, rtol=0, atol=1e-5)
