"""Trainable temporal modules of an inflated (video) UNet: Tune-A-Video's temporal attention and EI²'s STAM.

Both sit in the same slot of every `BasicTransformerBlock`, under Tune-A-Video's checkpoint names, and act on
the frames of each spatial location: the block's (B·F, N, C) rows become (B·N, F, C) sequences and

    x  ->  x + attn_temp(norm_temp(x))

- Tune-A-Video: norm_temp is a LayerNorm, attn_temp plain multi-head self-attention over the F frames (no
  positional encoding, so it is permutation-equivariant over frames). Its output weight starts at zero.
- EI² (STAM, paper Eq. 6–9): norm_temp is Instance Centering, IC(z) = z − (1/F) Σ_i z^i per location and
  channel, with no rescaling; attn_temp's value and output maps are spectrally normalised, W̄ = W / σ_max(W),
  so ‖W̄_v‖ = ‖W̄_L‖ = 1 (σ_max by Miyato's power method by default, by SVD as an option); the output bias
  starts at zero. A temporally constant input passes unchanged.

`VideoConfig` names every choice the papers leave open; its defaults are documented field by field.

Dimension legend: B videos (branches), F frames, N = H·W locations, C channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention

TEMPORAL = ("attention", "stam")
POSITIONS = ("after_ff", "before_cross")
CENTRING = ("frames", "channels")
SPECTRAL_NORM = ("exact", "power")
OUT_BIAS = ("random", "zero")
POWER_WARMUP = 15  # power iterations when u is first drawn, as torch's spectral_norm does


@dataclass(frozen=True)
class VideoConfig:
    """What inflating a UNet adds to every transformer block (the ResNet GroupNorms then pool over frames)."""

    temporal: str = "attention"  # "attention": Tune-A-Video's LayerNorm + attention; "stam": EI²'s STAM
    # Where the temporal module runs: "after_ff" (Tune-A-Video: attn1 → attn2 → ff → temporal) or
    # "before_cross" (EI² Appendix B.1: FFAM → STAM → cross-attention → ff).
    position: str = "after_ff"
    # STAM's Instance Centering axis: "frames" subtracts each location's mean over the frames (Eq. 6);
    # "channels" subtracts each token's mean over channels (a LayerNorm without scale, Remark 1's reading).
    centring: str = "frames"
    # How STAM finds σ_max: "power" (the method EI² cites, Miyato et al.'s spectral normalisation: a persistent
    # estimate u of the top left singular vector, refined by one power iteration per training step, σ ≈ uᵀ W v)
    # or "exact" (the largest singular value by SVD at every forward: ‖W̄‖ = 1 exactly, ~32 SVDs of up to
    # 1280² per UNet call, a noticeable cost in tuning).
    spectral_norm: str = "power"
    # The temporal attention's initial to_out bias: "random" (PyTorch's default Linear init, as Tune-A-Video's
    # code leaves it: the branch adds a small constant at init) or "zero" (the inflated UNet starts as the 2-D
    # one). STAM's bias always starts at zero (EI² Sec. 4.3).
    out_bias: str = "random"

    def __post_init__(self):
        for field, value, choices in (("temporal", self.temporal, TEMPORAL), ("position", self.position, POSITIONS),
                                      ("centring", self.centring, CENTRING),
                                      ("spectral_norm", self.spectral_norm, SPECTRAL_NORM),
                                      ("out_bias", self.out_bias, OUT_BIAS)):
            if value not in choices:
                raise ValueError(f"{field} must be one of {', '.join(choices)}; got {value!r}")


class InstanceCentering(nn.Module):
    """EI²'s IC (Eq. 6): subtract the mean over frames (or over channels), no rescaling, no parameters."""

    def __init__(self, axis: str = "frames"):
        super().__init__()
        self.dim = 1 if axis == "frames" else -1  # x is (B·N, F, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=self.dim, keepdim=True)


def spectral_normalise(weight: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """W / σ_max(W), σ computed in float32 at least (float64 stays float64), returned in W's dtype.

    With `u` (power method), σ ≈ uᵀ W v with v = normalise(Wᵀ u); gradients flow through W only.
    """
    work = weight.to(torch.promote_types(weight.dtype, torch.float32))
    if u is None:
        sigma = torch.linalg.matrix_norm(work, ord=2)
    else:
        v = F.normalize(work.detach().t() @ u.to(work.dtype), dim=0)
        sigma = u.to(work.dtype) @ work @ v
    return (work / sigma).to(weight.dtype)


class SpectralLinear(nn.Linear):
    """A Linear layer whose weight is used spectrally normalised (EI² Eq. 8); same checkpoint keys as nn.Linear.

    With method "power", the buffer `weight_u` holds Miyato's estimate of the top left singular vector. The
    forward only reads it; the trainer moves it with `power_iteration_` once per step, before the step's
    forward (Miyato's order), so a gradient-checkpointed forward, which runs twice, sees the same u.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, method: str = "power"):
        super().__init__(in_features, out_features, bias=bias)
        self.method = method
        if method == "power":
            self.register_buffer("weight_u", torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.weight_u if self.method == "power" else None
        return F.linear(x, spectral_normalise(self.weight, u), self.bias)

    @torch.no_grad()
    def power_iteration_(self, iters: int = 1) -> None:
        """Refine u by `iters` power iterations on the current weight (no-op for the exact method)."""
        if self.method == "power":
            self.weight_u.copy_(_power_iteration(self.weight, self.weight_u, iters))


def _power_iteration(weight: torch.Tensor, u: torch.Tensor, iters: int) -> torch.Tensor:
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    u = u.to(w.dtype)
    for _ in range(iters):
        u = F.normalize(w @ F.normalize(w.t() @ u, dim=0), dim=0)
    return u


def temporal_modules(dim: int, heads: int, video: VideoConfig) -> tuple[nn.Module, Attention]:
    """(norm_temp, attn_temp) for one transformer block of width `dim`."""
    attn = Attention(dim, heads, dim // heads)
    if video.temporal == "attention":
        return nn.LayerNorm(dim), attn
    inner = attn.to_v.out_features
    attn.to_v = SpectralLinear(dim, inner, bias=False, method=video.spectral_norm)
    attn.to_out[0] = SpectralLinear(inner, dim, method=video.spectral_norm)
    return InstanceCentering(video.centring), attn


@torch.no_grad()
def init_temporal_(norm: nn.Module, attn: Attention, video: VideoConfig, generator: torch.Generator) -> None:
    """Fresh weights for a block's temporal modules, drawn from `generator` on the CPU (the same on every device).

    Linear layers get PyTorch's default init (Kaiming-uniform weight, uniform bias). Tune-A-Video then zeroes
    the output weight (and, with out_bias="zero", the bias); STAM keeps the random output weight (a zero matrix
    has no spectral norm) and zeroes the bias.
    """
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
        fan_in = layer.in_features
        layer.weight.copy_(_uniform(layer.weight.shape, 1 / math.sqrt(fan_in), generator))  # kaiming_uniform_(a=√5)
        if layer.bias is not None:
            layer.bias.copy_(_uniform(layer.bias.shape, 1 / math.sqrt(fan_in), generator))
        if isinstance(layer, SpectralLinear) and layer.method == "power":
            layer.weight_u.copy_(F.normalize(torch.randn(layer.out_features, generator=generator), dim=0))
            layer.power_iteration_(POWER_WARMUP)
    out = attn.to_out[0]
    if video.temporal == "attention":
        out.weight.zero_()
        if video.out_bias == "zero":
            out.bias.zero_()
        norm.reset_parameters()
    else:
        out.bias.zero_()


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
