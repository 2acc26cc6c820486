"""The SD1.x denoising UNet, with diffusers' module names so checkpoints load with strict=True.

    latent ─conv_in─► down_blocks (ResNet [+ Transformer2D] × 2, downsample) ─► mid_block ─►
    up_blocks (concat skip, ResNet [+ Transformer2D] × 3, upsample) ─conv_out─► ε

Every Transformer2DModel holds one BasicTransformerBlock: self-attention (attn1), cross-attention
to the prompt (attn2), feed-forward. All 32 attention layers are `Attention` modules whose core can be
swapped by name with `set_attention`; that is how every video method in stemref plugs in. Two more
named extensions take part in a forward: `RunInfo.inject` (plug-and-play injection from the source branch,
in the ResNets and attention layers it names) and the `freeu` argument (FreeU re-weighting of the
decoder's backbone and skip features, freeu.py).

Dimension legend:
  B  batch rows (for video: branches × frames, branch-major)
  C  channels, H × W latent grid, N = H·W tokens
  L  text tokens (77), D text width (768), E time-embedding width (4 × base channels)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, Processor, RunInfo, name_attention_layers
from .config import UNetConfig
from .freeu import FreeU
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the timestep, cos half first (flip_sin_to_cos=True, shift 0).

    Computed in float32 whatever the model dtype: that is the embedding SD was trained with.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """Gated GELU: half of the projection gates the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is diffusers' dropout slot (p=0 in SD); keeping it makes the second linear ff.net.2.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual.

    Trainable temporal modules (Tune-A-Video's temporal attention, EI²'s STAM) belong here, as
    extra submodules with their own checkpoint keys that run after attn1 on (B·N, F, C) tokens.
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, info: RunInfo) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), info=info)
        x = x + self.attn2(self.norm2(x), context, info=info)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: the image grid as a token sequence, with a residual around it."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, info: RunInfo) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C)
        info = replace(info, hw=(H, W))
        for block in self.transformer_blocks:
            h = block(h, context, info)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return self.proj_out(h.contiguous()) + x


class DownBlock(nn.Module):
    """One resolution level going down: diffusers' CrossAttnDownBlock2D (has_attn) or DownBlock2D."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, has_attn: bool, downsample: bool):
        super().__init__()
        E, groups = 4 * cfg.block_out_channels[0], cfg.norm_num_groups
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, E, groups, cfg.norm_eps) for j in range(cfg.layers_per_block)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, cfg.heads, cfg.cross_attention_dim, groups) for _ in range(cfg.layers_per_block)]
            if has_attn else [])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if downsample else [])

    def forward(self, x, temb, context, info) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb, info)
            if self.attentions:
                x = self.attentions[j](x, context, info)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: ResNet, Transformer2D, ResNet."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        E, groups = 4 * cfg.block_out_channels[0], cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, E, groups, cfg.norm_eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, cfg.heads, cfg.cross_attention_dim, groups)])

    def forward(self, x, temb, context, info) -> torch.Tensor:
        x = self.resnets[0](x, temb, info)
        x = self.attentions[0](x, context, info)
        return self.resnets[1](x, temb, info)


class UpBlock(nn.Module):
    """One resolution level going up: diffusers' CrossAttnUpBlock2D (has_attn) or UpBlock2D.

    Resnet j sees the running tensor concatenated with one skip from the matching down level; the
    last resnet's skip comes from the level below (the down level's input), hence `skip_in_ch`.
    """

    def __init__(self, in_ch: int, out_ch: int, skip_in_ch: int, cfg: UNetConfig, has_attn: bool, upsample: bool):
        super().__init__()
        E, groups, n = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.layers_per_block + 1
        self.resnets = nn.ModuleList([
            ResnetBlock2D((in_ch if j == 0 else out_ch) + (skip_in_ch if j == n - 1 else out_ch), out_ch, E, groups, cfg.norm_eps)
            for j in range(n)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, cfg.heads, cfg.cross_attention_dim, groups) for _ in range(n)] if has_attn else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x, skips: list[torch.Tensor], temb, context, info, freeu: FreeU | None = None,
                top_channels: int = 0) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if freeu is not None:
                x, skip = freeu(x, skip, top_channels)
            x = resnet(torch.cat([x, skip], dim=1), temb, info)  # (B, C + C_skip, H, W) -> (B, C, H, W)
            if self.attentions:
                x = self.attentions[j](x, context, info)
        for up in self.upsamplers:
            x = up(x, size=skips[-1].shape[-2:])  # back to the next skip's grid, odd sizes included
        return x


class UNet2DConditionModel(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        chans, levels = cfg.block_out_channels, cfg.attention_levels
        n, E = len(chans), 4 * chans[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], E)
        self.down_blocks = nn.ModuleList([
            DownBlock(chans[max(i - 1, 0)], chans[i], cfg, levels[i], downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(chans[-1], cfg)
        up_chans, up_levels = chans[::-1], levels[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(up_chans[max(i - 1, 0)], up_chans[i], up_chans[min(i + 1, n - 1)], cfg, up_levels[i], upsample=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)
        self.attention_layers = name_attention_layers(self)
        for name, m in self.named_modules():
            if isinstance(m, ResnetBlock2D):
                m.name = name

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor,
                info: RunInfo = RunInfo(), freeu: FreeU | None = None) -> torch.Tensor:
        """Predict the noise ε in `x` (B, 4, H, W) at timestep `t`, conditioned on `context` (B, L, D).

        `freeu` re-weighs the decoder's features (freeu.py); None runs the plain UNet.
        """
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype))  # (B, E)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, info)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context, info)
        for block in self.up_blocks:
            x = block(x, skips, temb, context, info, freeu, self.config.block_out_channels[-1])
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def set_attention(self, choose: Callable[[str], Processor | None]) -> dict[str, Processor]:
        """Install processors by layer name; `choose(name)` returns a processor or None to keep the current one.

        Returns the processors that were in place, so `unet.set_attention(previous.get)` restores them.
        """
        previous = {name: layer.processor for name, layer in self.attention_layers.items()}
        for name, layer in self.attention_layers.items():
            processor = choose(name)
            if processor is not None:
                layer.processor = processor
        return previous

    @contextmanager
    def attention(self, choose: Callable[[str], Processor | None]) -> Iterator["UNet2DConditionModel"]:
        """`with unet.attention(choose): ...` installs processors for the block and restores them after."""
        previous = self.set_attention(choose)
        try:
            yield self
        finally:
            self.set_attention(previous.get)
