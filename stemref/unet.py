"""The SD1.x denoising UNet, with diffusers' module names so checkpoints load with strict=True.

    latent ─conv_in─► down_blocks (ResNet [+ Transformer2D] × 2, downsample) ─► mid_block ─►
    up_blocks (concat skip, ResNet [+ Transformer2D] × 3, upsample) ─conv_out─► ε

Every Transformer2DModel holds one BasicTransformerBlock: self-attention (attn1), cross-attention
to the prompt (attn2), feed-forward. All 32 attention layers are `Attention` modules whose core can be
swapped by name with `set_attention`; that is how every video method in stemref plugs in.

The skips: the down path pushes one tensor after conv_in, after every down ResNet(+transformer) and after
every downsampler; the up path pops them in reverse, one per up ResNet (3 per level, where the down path
has 2 + 1 downsample). `skip_channels` lists their widths in push order, so each up ResNet's input width
is plainly (running width + the width of the skip it pops).

Named additions to the plain SD forward, each off unless asked for, each marked `# + name` where it acts:
- FreeU (`freeu=` argument, freeu.py): re-weighs the backbone and skip features before each decoder ResNet.
- plug-and-play injection (`RunInfo.inject`): ResNets and attention layers it names take the source
  branch's features (resnet.py, and the processors of edit/tokenflow.py).
- video (`video=VideoConfig(...)`, temporal.py): the inflated UNet of Tune-A-Video and EI². Every
  transformer block gets a temporal module (norm_temp, attn_temp) over the frames of each location, and
  the ResNet GroupNorms and conv_norm_out pool their statistics over the frames of each video
  (`frame_group_norm`; the transformers' GroupNorm stays per frame; `resnet_norm="frame"` keeps the ResNets'
  per frame too). The temporal module sits in one of three slots (`VideoConfig.position`): before the
  cross-attention (EI²), after it, or after the feed-forward (Tune-A-Video). Without `video` none of this
  exists.
- gradient checkpointing (`RunInfo.checkpoint`): `checkpointed` recomputes each ResNet's and transformer's
  activations in the backward pass (tuning's memory saver; no effect on values).

Fidelity (kept as diffusers and the checkpoints have them, not as one might write them afresh):
- `FeedForward.net` keeps diffusers' dropout slot at index 1, so the second linear is `ff.net.2`.
- diffusers' `attention_head_dim` is, for SD1.x, the number of heads (config.py).
- The timestep embedding is computed in float32 whatever the model dtype, cos half first.
- An upsampler resizes to the next skip's grid, so odd latent sizes come back to the right shape.

Dimension legend:
  B  batch rows (for video: branches × frames, branch-major), F frames per branch (RunInfo.frames)
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
from torch.utils.checkpoint import checkpoint

from .attention import Attention, Processor, RunInfo, name_attention_layers, split_frames
from .config import UNetConfig
from .freeu import FreeU
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D, frame_group_norm
from .temporal import VideoConfig, temporal_modules


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

    In an inflated UNet the block also holds a temporal module (norm_temp, attn_temp: Tune-A-Video's
    temporal attention or EI²'s STAM, temporal.py) that runs before or after the cross-attention or after
    the feed-forward (`VideoConfig.position`) on each location's frames.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, video: VideoConfig | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.video = video
        if video is not None:
            self.norm_temp, self.attn_temp = temporal_modules(dim, heads, video)

    def forward(self, x: torch.Tensor, context: torch.Tensor, info: RunInfo) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), info=info)
        x = self.temporal(x, info, "before-cross")  # + video (EI²'s slot)
        x = x + self.attn2(self.norm2(x), context, info=info)
        x = self.temporal(x, info, "after-cross")
        x = x + self.ff(self.norm3(x))
        return self.temporal(x, info, "after-ff")  # + video (Tune-A-Video's slot)

    def temporal(self, x: torch.Tensor, info: RunInfo, slot: str) -> torch.Tensor:
        """x + attn_temp(norm_temp(x)) over the F frames of each location of each video, if the temporal module
        sits in `slot`; else x.

        attn_temp sees one sequence of F tokens per (video, location), so its processors get B·N rows.
        """
        if self.video is None or self.video.position != slot:
            return x
        BF, N, C = x.shape
        frames = info.frames
        h = split_frames(x, frames).transpose(1, 2).reshape(-1, frames, C)  # (B·N, F, C)
        h = h + self.attn_temp(self.norm_temp(h), info=info)
        return h.view(BF // frames, N, frames, C).transpose(1, 2).reshape(BF, N, C)  # (B·F, N, C)


class Transformer2DModel(nn.Module):
    """Spatial transformer: the image grid as a token sequence, with a residual around it."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, video: VideoConfig | None = None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # per frame, in a video UNet too
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, video)])
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


def checkpointed(module: nn.Module, x: torch.Tensor, cond: torch.Tensor, info: RunInfo) -> torch.Tensor:
    """module(x, cond, info) for a ResNet (cond = temb) or a transformer (cond = context).

    + gradient checkpointing: when the call asks for it (info.checkpoint) and gradients are on.
    """
    if info.checkpoint and torch.is_grad_enabled():
        return checkpoint(module, x, cond, info, use_reentrant=False)
    return module(x, cond, info)


class DownBlock(nn.Module):
    """One resolution level going down: diffusers' CrossAttnDownBlock2D (has_attn) or DownBlock2D."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, has_attn: bool, downsample: bool,
                 video: VideoConfig | None = None):
        super().__init__()
        E, groups, pool = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, video is not None and video.pools_frames
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, E, groups, cfg.norm_eps, pool) for j in range(cfg.layers_per_block)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, cfg.heads, cfg.cross_attention_dim, groups, video) for _ in range(cfg.layers_per_block)]
            if has_attn else [])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if downsample else [])

    def forward(self, x, temb, context, info) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = checkpointed(resnet, x, temb, info)
            if self.attentions:
                x = checkpointed(self.attentions[j], x, context, info)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: ResNet, Transformer2D, ResNet."""

    def __init__(self, ch: int, cfg: UNetConfig, video: VideoConfig | None = None):
        super().__init__()
        E, groups, pool = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, video is not None and video.pools_frames
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, E, groups, cfg.norm_eps, pool) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, cfg.heads, cfg.cross_attention_dim, groups, video)])

    def forward(self, x, temb, context, info) -> torch.Tensor:
        x = checkpointed(self.resnets[0], x, temb, info)
        x = checkpointed(self.attentions[0], x, context, info)
        return checkpointed(self.resnets[1], x, temb, info)


class UpBlock(nn.Module):
    """One resolution level going up: diffusers' CrossAttnUpBlock2D (has_attn) or UpBlock2D.

    ResNet j sees the running tensor (in_ch for the first, out_ch after) concatenated with the skip it pops,
    of width skip_widths[j] (see `skip_channels`).
    """

    def __init__(self, in_ch: int, out_ch: int, skip_widths: list[int], cfg: UNetConfig, has_attn: bool,
                 upsample: bool, video: VideoConfig | None = None):
        super().__init__()
        E, groups, pool = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, video is not None and video.pools_frames
        running = [in_ch] + [out_ch] * (len(skip_widths) - 1)
        self.resnets = nn.ModuleList([ResnetBlock2D(h + s, out_ch, E, groups, cfg.norm_eps, pool)
                                      for h, s in zip(running, skip_widths)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, cfg.heads, cfg.cross_attention_dim, groups, video) for _ in skip_widths]
            if has_attn else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x, skips: list[torch.Tensor], temb, context, info, freeu: FreeU | None = None,
                top_channels: int = 0) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if freeu is not None:  # + FreeU
                x, skip = freeu(x, skip, top_channels)
            x = checkpointed(resnet, torch.cat([x, skip], dim=1), temb, info)  # (B, C + C_skip, H, W) -> (B, C, H, W)
            if self.attentions:
                x = checkpointed(self.attentions[j], x, context, info)
        for up in self.upsamplers:
            x = up(x, size=skips[-1].shape[-2:])  # back to the next skip's grid, odd sizes included
        return x


def skip_channels(cfg: UNetConfig) -> list[int]:
    """The widths of the skips the down path pushes, in push order (the up path pops them from the end).

    SD1.5: [320 (conv_in), 320, 320, 320 (downsample), 640, 640, 640, 1280, 1280, 1280, 1280, 1280].
    """
    chans = cfg.block_out_channels
    widths = [chans[0]]  # conv_in
    for level, ch in enumerate(chans):
        widths += [ch] * cfg.layers_per_block  # each ResNet(+transformer)
        if level < len(chans) - 1:
            widths.append(ch)  # the downsampler
    return widths


class UNet2DConditionModel(nn.Module):
    """SD1.x's UNet; with `video` (temporal.py) the inflated video UNet of Tune-A-Video and EI²."""

    def __init__(self, cfg: UNetConfig = UNetConfig(), video: VideoConfig | None = None):
        super().__init__()
        self.config, self.video = cfg, video
        chans, levels = cfg.block_out_channels, cfg.attention_levels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], 4 * chans[0])
        running = [chans[0], *chans[:-1]]  # each level's input width: conv_in's, then the level above's
        self.down_blocks = nn.ModuleList([
            DownBlock(running[i], ch, cfg, levels[i], downsample=i < len(chans) - 1, video=video)
            for i, ch in enumerate(chans)])
        self.mid_block = MidBlock(chans[-1], cfg, video)
        skips = skip_channels(cfg)
        up_blocks, running = [], chans[-1]
        for level, out_ch in reversed(list(enumerate(chans))):  # the deepest level first
            popped = [skips.pop() for _ in range(cfg.layers_per_block + 1)]
            up_blocks.append(UpBlock(running, out_ch, popped, cfg, levels[level], upsample=level > 0, video=video))
            running = out_ch
        self.up_blocks = nn.ModuleList(up_blocks)
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
        skips = [x]  # pushed in the order skip_channels() lists, popped by the up blocks from the end
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, info)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context, info)
        for block in self.up_blocks:
            x = block(x, skips, temb, context, info, freeu, self.config.block_out_channels[-1])
        if self.video is not None and self.video.pools_frames:  # + video GroupNorm: statistics over the frames
            x = frame_group_norm(self.conv_norm_out, x, info.frames)
        else:
            x = self.conv_norm_out(x)
        return self.conv_out(F.silu(x))

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
