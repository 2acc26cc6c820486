"""PSNR and SSIM against an independent numpy reference and closed forms.

The reference SSIM below follows Wang et al. 2004 literally: an explicit 11x11 Gaussian window, every
'valid' window position cut out with sliding_window_view, weighted means, and the weighted central
moments E[(x - mu)^2] (the code under test uses separable convolutions and E[x^2] - mu^2 instead).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from stemref.metrics import psnr, ssim

C1 = 0.01**2
C2 = 0.03**2


def reference_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of 10 log10(1 / MSE) for (F, 3, H, W) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    per_frame = [10 * math.log10(1 / np.mean((x - y) ** 2)) for x, y in zip(a, b)]
    return float(np.mean(per_frame))


def reference_window() -> np.ndarray:
    offsets = np.arange(11) - 5
    squared_distance = offsets[:, None] ** 2 + offsets[None, :] ** 2
    window = np.exp(-squared_distance / (2 * 1.5**2))
    return window / window.sum()  # (11, 11)


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the mean over channels of the SSIM map on valid 11x11 windows."""
    w = reference_window()
    per_frame = []
    for x_frame, y_frame in zip(a.astype(np.float64), b.astype(np.float64)):
        per_channel = []
        for x, y in zip(x_frame, y_frame):
            px = sliding_window_view(x, (11, 11))  # (H', W', 11, 11)
            py = sliding_window_view(y, (11, 11))
            mu_x = (w * px).sum(axis=(-2, -1))
            mu_y = (w * py).sum(axis=(-2, -1))
            dx = px - mu_x[..., None, None]
            dy = py - mu_y[..., None, None]
            var_x = (w * dx * dx).sum(axis=(-2, -1))
            var_y = (w * dy * dy).sum(axis=(-2, -1))
            cov = (w * dx * dy).sum(axis=(-2, -1))
            ssim_map = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
            per_channel.append(ssim_map.mean())
        per_frame.append(np.mean(per_channel))
    return float(np.mean(per_frame))


def pair(seed: int = 0, noise: float = 0.05, shape=(3, 3, 24, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth-plus-texture video and a noisy copy of it, both in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    frames, _, height, width = shape
    yy = torch.linspace(0, 1, height).view(1, 1, height, 1)
    xx = torch.linspace(0, 1, width).view(1, 1, 1, width)
    phase = torch.arange(frames * 3, dtype=torch.float32).view(frames, 3, 1, 1)
    a = 0.5 + 0.3 * torch.sin(6 * xx + 4 * yy + phase) + 0.1 * torch.rand(shape, generator=generator)
    b = a + noise * torch.randn(shape, generator=generator)
    return a.clamp(0, 1), b.clamp(0, 1)


@pytest.mark.parametrize("seed, noise", [(0, 0.02), (1, 0.1), (2, 0.3)])
def test_psnr_matches_numpy_reference(seed, noise):
    a, b = pair(seed, noise)
    assert psnr(a, b) == pytest.approx(reference_psnr(a.numpy(), b.numpy()), rel=1e-12)


@pytest.mark.parametrize("seed, noise", [(0, 0.02), (1, 0.1), (2, 0.3)])
def test_ssim_matches_numpy_reference(seed, noise):
    a, b = pair(seed, noise)
    expected = reference_ssim(a.numpy(), b.numpy())
    assert ssim(a, b) == pytest.approx(expected, rel=1e-10)


def test_ssim_reference_on_unrelated_images_and_odd_sizes():
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 17, 29, generator=generator)
    b = torch.rand(2, 3, 17, 29, generator=generator)
    assert ssim(a, b) == pytest.approx(reference_ssim(a.numpy(), b.numpy()), rel=1e-10)


def test_identical_inputs():
    a, _ = pair()
    assert psnr(a, a.clone()) == math.inf
    assert ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-15)


def test_psnr_constant_offset_closed_form():
    # multiples of 1/256 and an offset of 1/8 are exact in binary, so b - a is exactly c everywhere
    a = torch.randint(0, 192, (2, 3, 16, 16), generator=torch.Generator().manual_seed(4)).double() / 256
    c = 0.125
    assert psnr(a, a + c) == pytest.approx(-10 * math.log10(c**2), rel=1e-12)


def test_psnr_is_mean_of_per_frame_psnr_not_pooled():
    a = torch.full((2, 3, 8, 8), 0.25, dtype=torch.float64)
    b = a.clone()
    b[0] += 0.125
    b[1] += 0.5
    per_frame_mean = (-10 * math.log10(0.125**2) - 10 * math.log10(0.5**2)) / 2
    pooled = -10 * math.log10((0.125**2 + 0.5**2) / 2)
    assert psnr(a, b) == pytest.approx(per_frame_mean, rel=1e-12)
    assert abs(psnr(a, b) - pooled) > 1.0


@pytest.mark.parametrize("alpha, beta", [(0.2, 0.7), (0.5, 0.5), (0.0, 1.0), (0.9, 0.85)])
def test_ssim_of_constant_frames_closed_form(alpha, beta):
    # no variance: the contrast-structure term is C2 / C2 = 1, leaving the luminance term
    a = torch.full((2, 3, 12, 15), alpha)
    b = torch.full((2, 3, 12, 15), beta)
    # the inputs are float32, so take alpha, beta as the float32 values they became
    x, y = a[0, 0, 0, 0].item(), b[0, 0, 0, 0].item()
    assert ssim(a, b) == pytest.approx((2 * x * y + C1) / (x * x + y * y + C1), rel=1e-12)


def test_symmetric():
    a, b = pair(5, 0.1)
    assert psnr(a, b) == psnr(b, a)
    assert ssim(a, b) == pytest.approx(ssim(b, a), rel=1e-14)


def test_half_precision_inputs_use_full_precision_arithmetic():
    a, b = pair(6, 0.002)
    a16, b16 = a.half(), b.half()
    # the squared errors (~4e-6) are below fp16's normal range; a half-precision PSNR would be off or inf
    assert psnr(a16, b16) == pytest.approx(reference_psnr(a16.double().numpy(), b16.double().numpy()), rel=1e-12)
    assert ssim(a16, b16) == pytest.approx(reference_ssim(a16.double().numpy(), b16.double().numpy()), rel=1e-10)
    assert ssim(a.bfloat16(), b.bfloat16()) == pytest.approx(
        reference_ssim(a.bfloat16().double().numpy(), b.bfloat16().double().numpy()), rel=1e-10
    )


def test_mixed_dtypes_are_compared_in_float64():
    a, b = pair(7, 0.05)
    assert psnr(a, b.double()) == pytest.approx(reference_psnr(a.numpy(), b.numpy()), rel=1e-12)


def test_returns_python_floats():
    a, b = pair()
    assert type(psnr(a, b)) is float
    assert type(ssim(a, b)) is float


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), r"\(F, 3, H, W\)"),
        (torch.rand(2, 16, 16, 3), torch.rand(2, 16, 16, 3), r"permute"),
        (torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16), "same shape"),
        (torch.rand(0, 3, 16, 16), torch.rand(0, 3, 16, 16), "F, H, W >= 1"),
        (torch.full((1, 3, 16, 16), float("nan")), torch.rand(1, 3, 16, 16), "NaN"),
        (torch.rand(1, 3, 16, 16) * 255, torch.rand(1, 3, 16, 16), r"\[0, 1\]"),
        (torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16), r"\(x \+ 1\) / 2"),
        (torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8), torch.rand(1, 3, 16, 16), "floating point"),
        (np.zeros((1, 3, 16, 16)), torch.rand(1, 3, 16, 16), "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("metric", [psnr, ssim])
def test_bad_inputs_raise_clear_errors(metric, a, b, match):
    with pytest.raises(ValueError, match=match):
        metric(a, b)
    with pytest.raises(ValueError, match=match):
        metric(b, a)


def test_ssim_needs_a_full_window():
    a = torch.rand(1, 3, 10, 40)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a)
    assert psnr(a, a) == math.inf  # PSNR has no window
