"""PSNR and SSIM against hand-computed values and a direct numpy implementation of Wang et al. 2004."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoencoder.metrics import psnr, ssim
from common.errors import InputError


def random_images(seed: int, shape=(2, 3, 24, 20)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one (C, H, W) pair written out window by window (Wang et al. 2004, eq. 13-16):
    Gaussian-weighted means, population variances and covariance at every position where the
    window fits inside the image, averaged over positions and channels. This is what skimage's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False) computes
    (its gaussian_filter with truncate=3.5 has radius 5, i.e. an 11x11 window)."""
    offsets = np.arange(window) - window // 2
    w1 = np.exp(-offsets**2 / (2 * sigma**2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for a, b in zip(x, y):
        for i in range(a.shape[0] - window + 1):
            for j in range(a.shape[1] - window + 1):
                pa, pb = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
                mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
                var_a, var_b = (w * (pa - mu_a) ** 2).sum(), (w * (pb - mu_b) ** 2).sum()
                cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
                values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                              / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_psnr_identical_is_inf():
    x = random_images(0)
    assert torch.all(torch.isinf(psnr(x, x)))


def test_psnr_constant_offset():
    x = torch.zeros(2, 3, 8, 8)
    y = x + torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)
    # MSE = offset^2, range 2: 10*log10(4 / 0.01) = 26.0206 dB and 10*log10(4 / 0.25) = 12.0412 dB
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.25)])
    torch.testing.assert_close(psnr(x, y), expected)
    torch.testing.assert_close(psnr(x, y, data_range=1.0), expected - 10 * math.log10(4))


def test_ssim_identical_is_one():
    x = random_images(1).float()
    torch.testing.assert_close(ssim(x, x), torch.ones(2))


def test_ssim_decreases_with_noise():
    x = random_images(2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scores = [ssim(x, (x + s * noise).clamp(-1, 1)) for s in (0.02, 0.1, 0.5)]
    assert torch.all(scores[0] > scores[1]) and torch.all(scores[1] > scores[2])
    assert torch.all(scores[0] < 1)


@pytest.mark.parametrize("data_range", [2.0, 1.0])
def test_ssim_matches_direct_numpy(data_range):
    x = random_images(4)
    y = (x + 0.3 * random_images(5)).clamp(-1, 1)
    expected = torch.tensor([reference_ssim(a, b, data_range) for a, b in zip(x.numpy(), y.numpy())],
                            dtype=torch.float64)
    torch.testing.assert_close(ssim(x, y, data_range=data_range), expected, rtol=1e-10, atol=1e-10)
    # float32 input, the usual case: same value to float32 accuracy
    torch.testing.assert_close(ssim(x.float(), y.float(), data_range=data_range), expected.float(),
                               rtol=1e-4, atol=1e-4)


def test_ssim_small_images_shrink_window():
    # 8 px is below the 11 px window: the largest odd window that fits, 7x7, is used (same sigma)
    x = random_images(6, shape=(1, 3, 8, 9))
    y = (x + 0.2 * random_images(7, shape=(1, 3, 8, 9))).clamp(-1, 1)
    expected = reference_ssim(x[0].numpy(), y[0].numpy(), 2.0, window=7)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-10)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(InputError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))
    with pytest.raises(InputError, match="data_range must be > 0"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), data_range=0)
