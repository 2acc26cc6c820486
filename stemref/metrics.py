"""Reconstruction metrics between two videos: PSNR and SSIM.

Dimension legend:
  F  frames, C = 3 RGB channels, H x W frame size
  Inputs a, b: (F, 3, H, W) floating point, values in [0, 1] (data range 1).

Both metrics are computed per frame and then averaged over frames, as video-editing papers report them
(STEM's Tables A1-A3, FateZero, TokenFlow): a video's PSNR is the mean of its frames' PSNRs, not the PSNR
of the pooled error. All arithmetic is float64 whatever the input dtype: fp16 cannot even hold the squared
error of a good reconstruction (1e-5 is below its normal range), and SSIM subtracts nearly equal moments.

SSIM follows Wang et al. 2004 with the usual constants, and matches
skimage.metrics.structural_similarity(a, b, data_range=1, channel_axis=..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False):
  - local statistics under an 11x11 Gaussian window, sigma 1.5, normalised to sum 1 (applied as two 1-D
    passes, which is the same window because the Gaussian is separable);
  - 'valid' windows only (no padding): the SSIM map is (H - 10) x (W - 10);
  - population (biased) variances and covariance: E[x^2] - E[x]^2;
  - C1 = (0.01 * 1)^2, C2 = (0.03 * 1)^2;
  - a frame's SSIM is the mean of the map over positions and over the three channels.
"""
from __future__ import annotations

import torch
from torch.nn.functional import conv2d

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


@torch.no_grad()
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of the per-frame PSNR (dB, data range 1) between videos a and b (F, 3, H, W).

    A frame with zero error has infinite PSNR, so identical videos (or any identical frame) give inf.
    """
    _check_pair(a, b, "psnr")
    per_frame = []
    for x, y in zip(a, b):  # frame by frame: a float64 copy of one frame at a time
        mse = (x.double() - y.double()).square().mean()
        per_frame.append(-10 * torch.log10(mse))  # 10 log10(1² / mse); mse = 0 gives +inf
    return torch.stack(per_frame).mean().item()


@torch.no_grad()
def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of the per-frame SSIM (Gaussian 11x11 window, sigma 1.5, valid region, RGB averaged)."""
    _check_pair(a, b, "ssim")
    if min(a.shape[2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim: frames must be at least {SSIM_WINDOW}x{SSIM_WINDOW} (one full window), got {tuple(a.shape[2:])}"
        )
    window = _gaussian_window(a.device)
    per_frame = [_ssim_frame(x.double(), y.double(), window) for x, y in zip(a, b)]
    return torch.stack(per_frame).mean().item()


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian (SSIM_WINDOW,) in float64; its outer product is the 2-D window."""
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    weights = torch.exp(-offsets.square() / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()


def _local_mean(maps: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted mean over every full window: (N, 1, H, W) -> (N, 1, H - 10, W - 10)."""
    maps = conv2d(maps, window.view(1, 1, 1, -1))  # (N, 1, H, W - 10)
    return conv2d(maps, window.view(1, 1, -1, 1))  # (N, 1, H - 10, W - 10)


def _ssim_frame(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """SSIM of one frame pair x, y (3, H, W) float64: mean of the SSIM map over channels and positions."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    channels = x.shape[0]
    # one convolution call for the five local moments of every channel
    stacked = torch.cat([x, y, x * x, y * y, x * y]).unsqueeze(1)  # (5·3, 1, H, W)
    local = _local_mean(stacked, window)  # (5·3, 1, H', W'), H' = H - 10, W' = W - 10
    moments = local.view(5, channels, *local.shape[2:])  # (5, 3, H', W')
    mu_x, mu_y, e_xx, e_yy, e_xy = moments
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).mean()


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    for label, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor (F, 3, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape) == 0:
            raise ValueError(
                f"{name}: {label} must have shape (F, 3, H, W) with F, H, W >= 1, got {tuple(x.shape)};"
                " add a frame axis with x[None] or move channels first with x.permute(0, 3, 1, 2)"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name}: {label} must be floating point in [0, 1], got {x.dtype}; use x.float() / 255")
    if a.shape != b.shape:
        raise ValueError(f"{name}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name}: a is on {a.device} but b is on {b.device}; move both to one device")
    for label, x in (("a", a), ("b", b)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: {label} contains NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(
                f"{name}: {label} has values in [{x.min().item():.4g}, {x.max().item():.4g}], but the data range is"
                " [0, 1]; map [-1, 1] outputs with (x + 1) / 2 and clamp with x.clamp(0, 1)"
            )
