"""Convolutional pieces shared by the UNet and the VAE: the residual block and the resamplers.

Dimension legend: B batch (for video: branches × frames, branch-major), F frames per branch, C channels,
H × W spatial size, E time-embedding width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RunInfo, from_source, split_frames


def frame_group_norm(norm: nn.GroupNorm, x: torch.Tensor, frames: int) -> torch.Tensor:
    """GroupNorm whose statistics pool over the frames of each video: C/G × F × H × W values per group.

    This is what Tune-A-Video's ResNets compute on their 5-D (b, c, f, h, w) tensors, coupling the frames;
    with frames=1 it is `norm(x)`.
    """
    B, C, H, W = x.shape
    video = split_frames(x, frames).transpose(1, 2)  # (B/F, C, F, H, W)
    out = F.group_norm(video, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv, twice, with the time embedding added in between (UNet only).

    In the UNet, a ResNet named in `RunInfo.inject` takes its residual (after conv2, before the shortcut
    is added) from the source branch in every branch: plug-and-play feature injection (TokenFlow, PnP).
    With `pool_frames` (an inflated video UNet), both GroupNorms pool their statistics over the frames of
    each video (`frame_group_norm`, F = info.frames).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float,
                 pool_frames: bool = False):
        super().__init__()
        self.pool_frames = pool_frames
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.name = ""  # the checkpoint prefix, set once by the UNet that owns this block

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, info: RunInfo | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, info)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(F.silu(self._norm(self.norm2, h, info)))
        if info is not None and self.name in info.inject:  # + plug-and-play injection
            h = from_source(h, info.frames)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h

    def _norm(self, norm: nn.GroupNorm, x: torch.Tensor, info: RunInfo | None) -> torch.Tensor:
        if self.pool_frames:  # + video GroupNorm: statistics over the frames of each video
            return frame_group_norm(norm, x, info.frames)
        return norm(x)


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. The VAE pads right/bottom by one and convolves unpadded (asymmetric, as LDM trained it)."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3×3 conv.

    The UNet passes the size of the skip tensor it will be concatenated with, so odd latent sizes
    (854×480 video → 106×60 latent → 53×30 → 27×15 → 14×8) come back to the right shape.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return self.conv(x)
