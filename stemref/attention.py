"""Attention with one extension point: the processor.

Every method in stemref changes *how* projected queries attend to keys and values, never the
projections themselves. So an `Attention` module owns the checkpoint weights (to_q, to_k, to_v,
to_out.0), splits heads, and hands the core to a processor:

    processor(q, k, v, call) -> out        q (B, h, N, d), k/v (B, h, M, d) -> (B, h, N, dv)

`call` is an `AttnCall`: the layer's checkpoint name, whether it is cross-attention, and the
per-forward facts (`RunInfo`) that the UNet's caller passes explicitly. Processors never read state
set on modules; a processor that keeps state (an attention store) keys it by `call.name` and
`call.info.step`, never by counting calls.

How each method plugs in (all through `UNet2DConditionModel.set_attention`):
- STEM inversion: `EMAttention` regroups k, v of the F frames of each branch to (h, F·N, d), estimates
  K bases by EM, and lets every frame's queries attend to the bases.
- 1-frame / 2-frame / all-frame DDIM inversion: processors that rebuild k, v from the frame itself,
  from the first and previous frames, or from every frame, using `call.info.frames`.
- TokenFlow: keyframe extended attention is a processor (per-frame for the source branch, all-frame
  across the keyframes for the edited branches); plug-and-play injection copies the source branch's
  q, k over the edited branches' in the layers named by `RunInfo.inject`; token propagation is a
  processor that computes no attention at all: it matches the layer's input tokens (`AttnCall.x`)
  to the keyframes' and gathers their attention outputs.
- FateZero: a processor that computes probabilities explicitly, stores them under (name, step)
  during inversion and fuses them during editing; `call.info.hw` reshapes maps to the latent grid.
- EI²'s FFAM (`context.FineCoarse`): a processor on self-attention whose keys and values are the frame's own
  tokens plus the other frames' tokens pooled r×r.
- Several processes (distributed.py): each holds a contiguous shard of the frames; `RunInfo.shard` says which,
  and the frame-context processors fetch the few other frames' tokens (or reduce the EM's sums) through it.
- Explanations (stemref/explain/): an optional `Recorder` in `RunInfo.recorder`. When it is there, the
  attention layer offers it q, k and the output of every call, and processors offer what only they
  compute (STEM's bases, TokenFlow's matches); the recorder keeps what it wants. With no recorder (the
  default) nothing is offered and nothing is computed.
- Trainable temporal modules (EI²'s STAM, Tune-A-Video's temporal attention) are not processors but
  real submodules with their own checkpoint keys, inserted into `BasicTransformerBlock`; their inner
  attention is again an `Attention`, so processors can reach them by name.

Dimension legend:
  B  batch rows; for video, branch-major frames: row = branch * F + frame
  F  frames per branch (RunInfo.frames)
  N  query tokens (H·W at this level), M key tokens (N, or 77 text tokens for cross-attention)
  C  channels, h heads, d = C / h
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Shard


class Recorder(Protocol):
    """Collects what a run computes, for pictures (stemref.explain.Recorder). Callers ask `wants` first and only
    then compute and `add` what is offered, so a recorder that wants nothing costs a method call."""

    def wants(self, what: str, name: str, step: int | None) -> bool: ...

    def add(self, what: str, name: str, step: int | None, **values: Any) -> None: ...


@dataclass(frozen=True)
class RunInfo:
    """Facts about one UNet forward, passed down explicitly to every processor."""

    frames: int = 1  # frames per branch: the batch holds B = branches * frames rows
    step: int | None = None  # index into the sampler's timesteps (0 = first call of the loop)
    hw: tuple[int, int] | None = None  # latent grid at this layer, filled in by Transformer2DModel
    # Plug-and-play injection: layers (ResNets, by checkpoint name: their residual; attention layers: their
    # q and k) in which branch 0, the source video, hands its features to every other branch in this call.
    inject: frozenset[str] = frozenset()
    # Gradient checkpointing: when gradients are on, the UNet recomputes each ResNet's and transformer's
    # activations in the backward pass instead of keeping them (tuning's memory saver; no effect on values).
    checkpoint: bool = False
    # Frame sharding across processes (distributed.py): this call holds only this rank's `frames` of the
    # video's shard.total; processors whose frames see other frames fetch those through the shard's group.
    # None: the call holds the whole video.
    shard: Shard | None = None
    # Explanations: what the run hands out for pictures (see Recorder); None records nothing.
    recorder: Recorder | None = None


@dataclass(frozen=True)
class AttnCall:
    """Everything a processor may know about the call it serves."""

    name: str  # checkpoint prefix, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    is_cross: bool
    info: RunInfo
    x: torch.Tensor | None = None  # the layer's input tokens (B, N, C) before the projections


class Processor(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
    """The default processor: plain scaled dot-product attention."""
    return F.scaled_dot_product_attention(q, k, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)  # (B, h, N, d)


def split_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B·F, ...) rows laid out branch-major -> (B, F, ...), e.g. (B·F, h, N, d) -> (B, F, h, N, d)."""
    if x.shape[0] % frames:
        raise ValueError(f"batch of {x.shape[0]} rows is not a whole number of {frames}-frame videos")
    return x.view(x.shape[0] // frames, frames, *x.shape[1:])  # (B, F, ...)


def from_source(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Plug-and-play injection: every branch's rows replaced by branch 0's (the source video's).

    (branches·F, ...) branch-major rows -> the same shape, each branch a copy of branch 0.
    """
    xf = split_frames(x, frames)  # (branches, F, ...)
    return xf[:1].expand_as(xf).reshape(x.shape)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)  # (B, N, C)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # diffusers' key is to_out.0
        self.processor: Processor = sdpa
        self.name = ""  # the checkpoint prefix, set once by the model that owns this layer

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, info: RunInfo = RunInfo()) -> torch.Tensor:
        source = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)  # (B, h, N, d)
        k = split_heads(self.to_k(source), self.heads)  # (B, h, M, d)
        v = split_heads(self.to_v(source), self.heads)  # (B, h, M, d)
        call = AttnCall(self.name, context is not None, info, x)
        out = self.to_out[0](merge_heads(self.processor(q, k, v, call)))  # (B, N, C)
        if info.recorder is not None and info.recorder.wants("attention", self.name, info.step):
            info.recorder.add("attention", self.name, info.step, call=call, q=q, k=k, out=out)
        return out


def name_attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Give every Attention in `model` its checkpoint name; return them by name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    for name, layer in layers.items():
        layer.name = name
    return layers
