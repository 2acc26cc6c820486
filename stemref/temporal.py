"""Trainable temporal modules of an inflated (video) UNet: Tune-A-Video's temporal attention and EI²'s STAM.

Both sit in a slot of every `BasicTransformerBlock`, under Tune-A-Video's checkpoint names, and act on the
frames of each spatial location: the block's (B·F, N, C) rows become (B·N, F, C) sequences and

    x  ->  x + attn_temp(norm_temp(x))

- Tune-A-Video: norm_temp is a LayerNorm, attn_temp plain multi-head self-attention over the F frames (no
  positional encoding, so it is permutation-equivariant over frames). Its output weight starts at zero.
- EI² (STAM, paper Eq. 6–9): norm_temp is Instance Centering, IC(z) = z − (1/F) Σ_i z^i per location and
  channel, with no rescaling; attn_temp's value and output maps are spectrally normalised, W̄ = W / σ_max(W),
  so ‖W̄_v‖ = ‖W̄_L‖ = 1 (σ_max by Miyato's power method by default, by SVD as an option); the output bias
  starts at zero. A temporally constant input passes unchanged.

`VideoConfig` spans both, so that EI²'s ablations (paper Figures 4–6) are one field each: the temporal norm
(LayerNorm with or without affine, none, InstanceNorm over frames, Instance Centering), the spectral
normalisation (off, power, exact), the slot, the number of heads and whether the ResNet GroupNorms pool over
frames. Its defaults are Tune-A-Video's; each field says what the papers leave open.

Dimension legend: B videos (branches), F frames, N = H·W locations, C channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention

# norm_temp: Tune-A-Video's LayerNorm, the same without its learnable scale and shift, nothing, InstanceNorm
# over the frames (centred and rescaled to unit variance, no affine), EI²'s Instance Centering (Eq. 6)
NORMS = ("layernorm", "layernorm-no-affine", "none", "instancenorm", "centering")
SPECTRAL_NORM = ("off", "power", "exact")
# The slot in the block: before the cross-attention (EI²: FFAM → STAM → CA), after it (EI² Appendix B.1's
# alternative: FFAM → CA → STAM) or after the feed-forward (Tune-A-Video: SCA → CA → FF → TA)
POSITIONS = ("before-cross", "after-cross", "after-ff")
CENTRING = ("frames", "channels")
HEADS = ("multi", "single")
RESNET_NORMS = ("video", "frame")
OUT_BIAS = ("random", "zero")
POWER_WARMUP = 15  # power iterations when u is first drawn, as torch's spectral_norm does
INSTANCE_NORM_EPS = 1e-5  # torch's InstanceNorm default


@dataclass(frozen=True)
class VideoConfig:
    """What inflating a UNet adds to every transformer block, and how its ResNet GroupNorms see the frames."""

    norm: str = "layernorm"  # norm_temp (NORMS)
    # How the value and output maps are normalised: "off" (plain Linear layers, Tune-A-Video), "power" (the
    # method EI² cites, Miyato et al.'s spectral normalisation: a persistent estimate u of the top left singular
    # vector, refined by one power iteration per training step, σ ≈ uᵀ W v) or "exact" (the largest singular
    # value by SVD at every forward: ‖W̄‖ = 1 exactly, ~32 SVDs of up to 1280² per UNet call, a noticeable
    # cost in tuning).
    spectral_norm: str = "off"
    position: str = "after-ff"  # the slot in the block (POSITIONS)
    # Instance Centering's axis (norm="centering" only): "frames" subtracts each location's mean over the
    # frames (Eq. 6, the paper's IC); "channels" subtracts each token's mean over its channels, i.e. only the
    # centring step of a per-token LayerNorm (no rescaling, no affine), which does not centre over time.
    centring: str = "frames"
    # "multi": the block's heads (8 in SD1.x, as Tune-A-Video); "single": one head of the full width, the
    # attention EI²'s variance analysis (Eq. 7, Appendix A.5) is written for
    heads: str = "multi"
    # The ResNet GroupNorms and conv_norm_out: "video" pools their statistics over the frames of each video
    # (Tune-A-Video's code: 5-D tensors), "frame" normalises each frame alone ("processed like a batch of
    # images", EI² Sec. 4.1). The transformers' GroupNorm is per frame either way.
    resnet_norm: str = "video"
    # The output bias at init: "random" (PyTorch's default Linear init, as Tune-A-Video's code leaves it: the
    # branch adds a small constant at init) or "zero" (EI² Sec. 4.3). The output weight starts at zero unless
    # it is spectrally normalised (a zero matrix has no spectral norm), then it keeps its random init.
    out_bias: str = "random"

    def __post_init__(self):
        for field, choices in (("norm", NORMS), ("spectral_norm", SPECTRAL_NORM), ("position", POSITIONS),
                               ("centring", CENTRING), ("heads", HEADS), ("resnet_norm", RESNET_NORMS),
                               ("out_bias", OUT_BIAS)):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {', '.join(choices)}; got {getattr(self, field)!r}")
        if self.centring != "frames" and self.norm != "centering":
            raise ValueError(f"centring={self.centring!r} is Instance Centering's axis; it needs norm='centering', "
                             f"not {self.norm!r}")

    @property
    def pools_frames(self) -> bool:
        """Whether the ResNet GroupNorms pool their statistics over the frames of each video."""
        return self.resnet_norm == "video"


class InstanceCentering(nn.Module):
    """EI²'s IC (Eq. 6): subtract the mean over frames (or over channels), no rescaling, no parameters."""

    def __init__(self, axis: str = "frames"):
        super().__init__()
        self.dim = 1 if axis == "frames" else -1  # x is (B·N, F, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=self.dim, keepdim=True)


class FrameInstanceNorm(nn.Module):
    """InstanceNorm over the frames of each location and channel, no affine: IC followed by rescaling to unit
    variance (the operator EI² Sec. 4.3 (a) leaves out, and Figure 4 compares)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x is (B·N, F, C)
        work = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 under fp16/bf16 (eps 1e-5)
        var, mean = torch.var_mean(work, dim=1, unbiased=False, keepdim=True)
        return ((work - mean) * torch.rsqrt(var + INSTANCE_NORM_EPS)).to(x.dtype)


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
    """(norm_temp, attn_temp) for one transformer block of width `dim` with `heads` heads."""
    heads = heads if video.heads == "multi" else 1
    attn = Attention(dim, heads, dim // heads)
    if video.spectral_norm != "off":
        inner = attn.to_v.out_features
        attn.to_v = SpectralLinear(dim, inner, bias=False, method=video.spectral_norm)
        attn.to_out[0] = SpectralLinear(inner, dim, method=video.spectral_norm)
    norm = {"layernorm": lambda: nn.LayerNorm(dim),
            "layernorm-no-affine": lambda: nn.LayerNorm(dim, elementwise_affine=False),
            "none": nn.Identity,
            "instancenorm": FrameInstanceNorm,
            "centering": lambda: InstanceCentering(video.centring)}[video.norm]()
    return norm, attn


@torch.no_grad()
def init_temporal_(norm: nn.Module, attn: Attention, video: VideoConfig, generator: torch.Generator) -> None:
    """Fresh weights for a block's temporal modules, drawn from `generator` on the CPU (the same on every device).

    Linear layers get PyTorch's default init (Kaiming-uniform weight, uniform bias), a LayerNorm scale 1 and
    shift 0. Then, as Tune-A-Video's code does, the output weight is zeroed, unless it is spectrally normalised
    (a zero matrix has no spectral norm: STAM keeps the random weight); the output bias is zeroed with
    out_bias="zero" (STAM's, EI² Sec. 4.3).
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
    if video.spectral_norm == "off":
        out.weight.zero_()
    if video.out_bias == "zero":
        out.bias.zero_()
    if isinstance(norm, nn.LayerNorm):
        norm.reset_parameters()


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
