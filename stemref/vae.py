"""The SD1.x variational autoencoder (KL-regularised), with diffusers' module names.

    image (B, 3, H, W) ─Encoder─► moments (B, 8, H/8, W/8) ─quant_conv─► mean, log-variance
    latent (B, 4, H/8, W/8) ─post_quant_conv─► Decoder ─► image

Pixels are in [-1, 1] here; the [0, 1] conversions and the 0.18215 latent scale live in the pipeline.

Dimension legend: B batch, C channels, H × W spatial size, N = H·W tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, name_attention_layers
from .config import VAEConfig
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6  # every VAE GroupNorm


class VAEAttention(Attention):
    """Single-head self-attention over the pixels of the bottleneck, with its own GroupNorm and residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, N, C)
        return super().forward(h).transpose(1, 2).reshape(B, C, H, W) + x  # (B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, cfg.norm_num_groups, EPS)
                                      for j in range(cfg.layers_per_block)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, asymmetric_pad=True)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, cfg.norm_num_groups, EPS)
                                      for j in range(cfg.layers_per_block + 1)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, n, groups = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([EncoderBlock(chans[max(i - 1, 0)], chans[i], cfg, i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, n, groups = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], groups)
        self.up_blocks = nn.ModuleList([DecoderBlock(chans[max(i - 1, 0)], chans[i], cfg, i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, std²) per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 4, h, w) each
        self.std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        name_attention_layers(self)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Pixels in [-1, 1] (B, 3, H, W) -> posterior over unscaled latents (B, 4, H/8, W/8)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> pixels in about [-1, 1] (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z))
