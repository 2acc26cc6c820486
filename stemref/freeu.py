"""FreeU (Si et al., CVPR 2024): re-weigh the decoder's backbone and skip features, at no training cost.

Before each decoder ResNet, the running (backbone) features h and the skip features s from the encoder
are concatenated. FreeU scales the first half of h's channels by b (strengthening the backbone's
denoising) and damps the low frequencies of s by s-scale (the skips carry high-frequency detail; their
low frequencies fight the backbone):

    h[:, :C/2] *= b        s = IFFT( FFT(s) · mask ),   mask = scale on the centred 2·t × 2·t box, 1 elsewhere

Which ResNets get which pair follows the STEM editing code, keyed by the *channel count of h* rather than by
the up-block index as diffusers' `enable_freeu` does: h with the UNet's top width (1280 in SD1.5) gets
(b1, s1), h with half of it (640) gets (b2, s2), anything else is untouched. In SD1.5 that is every ResNet
of up_blocks 0 and 1 and the first of up_blocks 2 for (b1, s1); the last two of up_blocks 2 and the first
of up_blocks 3 for (b2, s2). The settings STEM edits with are the defaults here.

Dimension legend: B batch rows, C channels, H × W feature grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FreeU:
    b1: float = 1.2  # backbone scale where h has the top width
    b2: float = 1.4  # backbone scale where h has half of it
    s1: float = 0.9  # skip low-frequency scale where h has the top width
    s2: float = 0.2  # skip low-frequency scale where h has half of it
    threshold: int = 1  # half-side of the low-frequency box, in frequency bins

    def __call__(self, h: torch.Tensor, skip: torch.Tensor, top_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, skip) for a decoder ResNet of a UNet whose widest level has `top_channels` channels."""
        C = h.shape[1]
        if C == top_channels:
            b, s = self.b1, self.s1
        elif C == top_channels // 2:
            b, s = self.b2, self.s2
        else:
            return h, skip
        if b != 1:
            h = torch.cat([h[:, :C // 2] * b, h[:, C // 2:]], dim=1)  # (B, C, H, W)
        return h, fourier_filter(skip, self.threshold, s)


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the centred low-frequency box of x's 2-D spectrum (B, C, H, W) by `scale`; scale 1 is exactly x.

    The FFT runs in float32 at least (float64 for float64 input): torch has no half-precision FFT for
    arbitrary sizes, and the filter must not add fp16 rounding to the skip features.
    """
    if scale == 1:
        return x
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    H, W = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(work), dim=(-2, -1))  # zero frequency at (H//2, W//2)
    mask = torch.ones((H, W), dtype=work.dtype, device=x.device)
    # the box spans rows H//2 − t … H//2 + t − 1; Python slicing as the reference code does (a 1-pixel map
    # gives the slice -1:1, which is that one pixel, so the box covers the whole spectrum of 1×1 and 2×2 maps)
    rows, cols = slice(H // 2 - threshold, H // 2 + threshold), slice(W // 2 - threshold, W // 2 + threshold)
    mask[rows, cols] = scale
    filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))).real
    return filtered.to(x.dtype)
