"""Reconstruction metrics for images in [-1, 1]: PSNR and SSIM (Wang et al. 2004), one value per sample."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import InputError


def _check_pair(x: torch.Tensor, y: torch.Tensor, data_range: float) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise InputError(f"metrics need two image batches of the same shape (B, C, H, W); "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if data_range <= 0:
        raise InputError(f"metrics: data_range must be > 0 (2.0 for images in [-1, 1]), got {data_range}")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision loses too much in E[x^2] - E[x]^2); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample, shape (B,): 10 log10(data_range^2 / MSE).

    Identical images give +inf. The MSE is taken over all channels and pixels of each sample.
    """
    _check_pair(x, y, data_range)
    x, y = _to_float(x), _to_float(y)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    """1-D Gaussian weights of odd length `size`, summing to 1 (scipy's gaussian_filter with radius size//2)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-0.5 * (coords / sigma) ** 2)
    return weights / weights.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, *, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, eq. 13) per sample, shape (B,).

    Local statistics use a Gaussian window (11x11, sigma 1.5), population (not sample) covariance,
    and only windows fully inside the image ('valid'); the SSIM map is averaged over positions and
    then channels. This matches skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)` run on each channel and averaged.
    Images smaller than the window use the largest odd window that fits (same sigma), where
    skimage would refuse; e.g. 8 px images use a 7x7 window.
    """
    _check_pair(x, y, data_range)
    size = min(window_size, x.shape[2], x.shape[3])
    size -= 1 - size % 2  # keep it odd so the window has a centre pixel
    channels = x.shape[1]
    x, y = _to_float(x), _to_float(y)

    g = gaussian_window(size, sigma).to(device=x.device, dtype=x.dtype)
    kernel = torch.outer(g, g).expand(5 * channels, 1, size, size)
    # the five local moments of every channel in one grouped 'valid' convolution
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel, groups=5 * channels)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.chunk(5, dim=1)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))
