"""The inflated (video) UNet of Tune-A-Video and EI², and its pieces, against references written here.

- The inflated UNet with the temporal output zeroed against diffusers' 2-D UNet on the same weights, given a
  naive sparse-causal processor and GroupNorms that pool over frames (both written out below).
- One frame, identical frames and the frame coupling that only the pooled GroupNorms create.
- STAM (Instance Centering, spectral normalisation, Eq. 6–9) and FFAM (Eq. 10) against naive versions.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from stemref.attention import AttnCall, RunInfo
from stemref.context import AllFrames, FineCoarse
from stemref.edit.tuning import inflate
from stemref.resnet import frame_group_norm
from stemref.temporal import (InstanceCentering, SpectralLinear, VideoConfig, init_temporal_, spectral_normalise,
                              temporal_modules)

EXACT = dict(rtol=0, atol=1e-12)
STAM = VideoConfig(norm="centering", spectral_norm="power", position="before-cross", out_bias="zero")  # EI²'s


def latents(rows: int, seed: int = 0, hw: tuple[int, int] = (16, 16)) -> torch.Tensor:
    return torch.randn(rows, 4, *hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def text(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 77, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- independent references (diffusers + naive parts)

class PooledGroupNorm(nn.Module):
    """GroupNorm with statistics over (C/G, F, H, W) of each video, written with explicit mean and variance."""

    def __init__(self, norm: nn.GroupNorm, frames: int):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        G = self.norm.num_groups
        xv = x.view(B // self.frames, self.frames, G, C // G, H, W)
        mean = xv.mean(dim=(1, 3, 4, 5), keepdim=True)
        var = ((xv - mean) ** 2).mean(dim=(1, 3, 4, 5), keepdim=True)
        y = ((xv - mean) / torch.sqrt(var + self.norm.eps)).reshape(B, C, H, W)
        return y * self.norm.weight[None, :, None, None] + self.norm.bias[None, :, None, None]


class NaiveSparseCausal:
    """A diffusers attention processor: row b (frame f of its video) attends to frames 0 and max(f − 1, 0)."""

    def __init__(self, frames: int):
        self.frames = frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None
        B, N, C = hidden_states.shape
        h = attn.heads
        heads = lambda x: x.view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        out = torch.empty_like(q)
        for b in range(B):
            f = b % self.frames
            first, previous = b - f, b - f + max(f - 1, 0)
            keys, values = torch.cat([k[first], k[previous]], 1), torch.cat([v[first], v[previous]], 1)  # (h, 2N, d)
            weights = torch.softmax(q[b] @ keys.transpose(1, 2) / math.sqrt(C // h), dim=-1)
            out[b] = weights @ values
        return attn.to_out[0](out.transpose(1, 2).reshape(B, N, C))


def reference_video_unet(diffusers_unet, frames: int):
    """Tune-A-Video's UNet with a silent temporal branch, built from diffusers' 2-D UNet."""
    unet = copy.deepcopy(diffusers_unet)
    processors = {name: NaiveSparseCausal(frames) if ".attn1." in name else proc
                  for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for resnet in block.resnets:
            resnet.norm1 = PooledGroupNorm(resnet.norm1, frames)
            resnet.norm2 = PooledGroupNorm(resnet.norm2, frames)
    unet.conv_norm_out = PooledGroupNorm(unet.conv_norm_out, frames)
    return unet


# ---------------------------------------------------------------- the inflated UNet

def test_group_norm_over_frames_matches_reference():
    norm = nn.GroupNorm(4, 8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(2))
        norm.bias.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(frame_group_norm(norm, x, 3), PooledGroupNorm(norm, 3)(x), **EXACT)
    torch.testing.assert_close(frame_group_norm(norm, x, 1), norm(x), **EXACT)


def test_inflated_unet_with_silent_temporal_attention_matches_reference(tiny_loaded, tiny_reference):
    """2 videos (e.g. guidance branches) of 3 frames: sparse-causal attention, frame-pooled ResNet GroupNorms."""
    frames = 3
    unet = inflate(tiny_loaded.unet, "tune-a-video", {"temporal_bias": "zero"})
    x, context = latents(2 * frames), text(2 * frames)
    with torch.no_grad():
        ours = unet(x, 500, context, RunInfo(frames=frames))
        theirs = reference_video_unet(tiny_reference[0], frames)(x, 500, context).sample
    torch.testing.assert_close(ours, theirs, **EXACT)


def test_inflated_unet_float32(tiny_root, tiny_reference):
    import stemref

    frames = 3
    unet = inflate(stemref.load(tiny_root).unet, "tune-a-video", {"temporal_bias": "zero"})
    x, context = latents(frames).float(), text(frames).float()
    with torch.no_grad():
        ours = unet(x, 250, context, RunInfo(frames=frames))
        theirs = reference_video_unet(tiny_reference[0], frames).float()(x, 250, context).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_temporal_modules_are_permutation_equivariant_over_frames():
    """No positional encoding: permuting the frames permutes the temporal modules' outputs."""
    x = torch.randn(5, 6, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    for video in (VideoConfig(), STAM):
        norm, attn = temporal_modules(16, 4, video)
        init_temporal_(norm, attn, video, torch.Generator().manual_seed(0))
        with torch.no_grad():
            attn.to_out[0].weight.normal_(generator=torch.Generator().manual_seed(1))  # TAV's starts at zero
        norm, attn = norm.double(), attn.double()
        with torch.no_grad():
            torch.testing.assert_close(attn(norm(x))[:, perm], attn(norm(x[:, perm])), **EXACT)


@pytest.mark.parametrize("method, options", [("tune-a-video", {"temporal_bias": "zero"}), ("ei2", {})])
def test_one_frame_is_the_2d_unet(tiny_sd, method, options):
    """EI²'s STAM centres a single frame to zero (and its bias starts at zero): no option needed."""
    unet = inflate(tiny_sd.unet, method, options)
    x, context = latents(2), text(2)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 300, context, RunInfo(frames=1)), tiny_sd.unet(x, 300, context), **EXACT)


@pytest.mark.parametrize("method, options", [("tune-a-video", {"temporal_bias": "zero"}), ("ei2", {"ffam_r": 1})])
def test_identical_frames_are_the_2d_unet_per_frame(tiny_sd, method, options):
    """Identical frames: pooled statistics = per-frame ones, duplicated keys leave softmax averages unchanged,
    STAM sees no temporal deviation. FFAM needs r = 1 for its coarse tokens to be duplicates."""
    unet = inflate(tiny_sd.unet, method, options)
    one = latents(1, hw=(8, 8))
    x, context = one.expand(4, -1, -1, -1), text(1).expand(4, -1, -1)
    with torch.no_grad():
        out = unet(x, 700, context, RunInfo(frames=4))
        plain = tiny_sd.unet(one, 700, context[:1])
    torch.testing.assert_close(out, plain.expand(4, -1, -1, -1), rtol=0, atol=1e-11)


def test_pooled_group_norm_couples_frames(tiny_sd):
    """Under sparse-causal attention frame 0 sees only itself, so only the pooled GroupNorms carry other frames."""
    unet = inflate(tiny_sd.unet, "tune-a-video", {"temporal_bias": "zero"})
    x, context = latents(3), text(1).expand(3, -1, -1)
    changed = x.clone()
    changed[2] += 1.0
    with torch.no_grad():
        a, b = unet(x, 400, context, RunInfo(frames=3)), unet(changed, 400, context, RunInfo(frames=3))
        per_frame = tiny_sd.unet  # the same weights, GroupNorms per frame, with the same sparse-causal context
        same_context = lambda name: unet.attention_layers[name].processor if name.endswith("attn1") else None
        with per_frame.attention(same_context):
            c, d = per_frame(x, 400, context, RunInfo(frames=3)), per_frame(changed, 400, context, RunInfo(frames=3))
    assert (a[0] - b[0]).abs().max() > 1e-3
    assert torch.equal(c[0], d[0])


def test_temporal_bias_option(tiny_sd):
    """Tune-A-Video's code zeroes the output weight but keeps a random bias (the default); "zero" zeroes both."""
    official = inflate(tiny_sd.unet, "tune-a-video")
    zero_state = inflate(tiny_sd.unet, "tune-a-video", {"temporal_bias": "zero"}).state_dict()
    for name, tensor in official.state_dict().items():
        if name.endswith("attn_temp.to_out.0.weight"):
            assert not tensor.any()
        if name.endswith("attn_temp.to_out.0.bias"):
            assert tensor.abs().min() > 0 and not zero_state[name].any()


def test_inflation_shares_frozen_weights_and_keeps_2d_blocks_plain(tiny_sd):
    unet = inflate(tiny_sd.unet, "ei2")
    base = tiny_sd.unet.state_dict()
    shared = unet.state_dict()
    assert all(shared[k].data_ptr() == v.data_ptr() for k, v in base.items())
    new = sorted(set(shared) - set(base))
    assert new and all(".attn_temp." in k for k in new)  # STAM's Instance Centering has no tensors
    assert not any(".attn_temp." in k or ".norm_temp." in k for k in base)


def test_tuned_tensor_count_at_sd15_size():
    """Tune-A-Video's official code trains 74,354,880 values for SD1.x: the query maps of self- and
    cross-attention (24.8 M) and all of the temporal attention (49.6 M)."""
    from stemref.config import UNetConfig
    from stemref.edit.tuning import TUNED, video_config
    from stemref.unet import UNet2DConditionModel

    with torch.device("meta"):
        for method in ("tune-a-video", "ei2"):
            unet = UNet2DConditionModel(UNetConfig(), video_config(method, {}))
            assert sum(p.numel() for n, p in unet.named_parameters() if TUNED[method].search(n)) == 74_354_880


# ---------------------------------------------------------------- STAM

def stam(dim: int = 16, heads: int = 4, seed: int = 0, **options):
    video = replace(STAM, **options)
    norm, attn = temporal_modules(dim, heads, video)
    init_temporal_(norm, attn, video, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a trained-looking bias so that the bias paths are tested too, except where zero matters
        attn.to_out[0].bias.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return norm.double(), attn.double()


def centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True)  # (L, F, C): Instance Centering over the frames


def naive_stam(x: torch.Tensor, attn, heads: int, norm=centre, spectral: bool = True) -> torch.Tensor:
    """Eq. 6–9 written out: x + (softmax(q kᵀ/√d) · IC(x) W̄_v) W̄_L + b, per location, per head; with another
    `norm` instead of IC, and W_v, W_L as they are unless `spectral` (W̄ = W / σ_max(W))."""
    xc = norm(x)  # (L, F, C)
    sigma = (lambda w: torch.linalg.svdvals(w)[0]) if spectral else (lambda w: 1.0)
    w_v = attn.to_v.weight / sigma(attn.to_v.weight)
    w_l = attn.to_out[0].weight / sigma(attn.to_out[0].weight)
    q, k, v = xc @ attn.to_q.weight.T, xc @ attn.to_k.weight.T, xc @ w_v.T  # (L, F, C)
    d = x.shape[-1] // heads
    out = torch.empty_like(v)
    for i in range(heads):
        s = slice(i * d, (i + 1) * d)
        out[..., s] = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1) @ v[..., s]
    return x + out @ w_l.T + attn.to_out[0].bias


def test_stam_matches_equations():
    norm, attn = stam(spectral_norm="exact")
    x = torch.randn(5, 6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(x + attn(norm(x)), naive_stam(x, attn, 4), **EXACT)


@pytest.mark.parametrize("options", [{}, {"spectral_norm": "exact"}])
def test_stam_passes_a_static_video_unchanged(options):
    norm, attn = stam(**options)
    with torch.no_grad():
        attn.to_out[0].bias.zero_()  # the paper's initial bias
    static = torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64).expand(5, 6, 16)
    torch.testing.assert_close(static + attn(norm(static)), static, **EXACT)


def test_instance_centering_removes_the_temporal_mean():
    x = torch.randn(5, 6, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 3
    ic = InstanceCentering("frames")
    torch.testing.assert_close(ic(x).mean(dim=1), torch.zeros(5, 16, dtype=torch.float64), **EXACT)
    torch.testing.assert_close(ic(ic(x)), ic(x), **EXACT)  # idempotent
    torch.testing.assert_close(ic(x + torch.randn(5, 1, 16, dtype=torch.float64)), ic(x), **EXACT)  # offset-invariant
    torch.testing.assert_close(ic(x).var(dim=1), x.var(dim=1), **EXACT)  # no rescaling
    torch.testing.assert_close(InstanceCentering("channels")(x).mean(dim=-1), torch.zeros(5, 6, dtype=torch.float64),
                               **EXACT)


def test_spectral_norm_of_normalised_maps_is_one():
    g = torch.Generator().manual_seed(6)
    for shape in [(16, 16), (24, 16), (16, 40)]:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        assert abs(torch.linalg.matrix_norm(spectral_normalise(w), ord=2).item() - 1) < 1e-12
    _, attn = stam(spectral_norm="exact")
    for layer in (attn.to_v, attn.to_out[0]):
        x = torch.eye(layer.in_features, dtype=torch.float64)
        mapping = layer(x) - (layer.bias if layer.bias is not None else 0)  # rows: the normalised map's rows
        assert abs(torch.linalg.matrix_norm(mapping, ord=2).item() - 1) < 1e-12


def test_power_method_estimates_sigma_and_only_moves_when_asked():
    _, attn = stam(spectral_norm="power")
    layer = attn.to_v
    assert isinstance(layer, SpectralLinear) and "weight_u" in dict(layer.named_buffers())
    u0 = layer.weight_u.clone()
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    layer.train()
    layer(x)
    assert torch.equal(layer.weight_u, u0)  # the forward only reads u
    layer.power_iteration_(200)
    assert not torch.equal(layer.weight_u, u0)
    sigma = torch.linalg.matrix_norm(spectral_normalise(layer.weight, layer.weight_u), ord=2)
    assert abs(sigma.item() - 1) < 1e-6


def test_stam_gradients_are_finite():
    norm, attn = stam()
    x = torch.randn(5, 6, 16, dtype=torch.float64)
    (x + attn(norm(x))).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attn.parameters())


# ---------------------------------------------------------------- FFAM

def ffam_inputs(frames: int, H: int = 4, W: int = 6, heads: int = 2, d: int = 8, branches: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (branches * frames, heads, H * W, d)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def call(frames: int, hw=(4, 6)) -> AttnCall:
    return AttnCall("mid_block.attentions.0.transformer_blocks.0.attn1", False, RunInfo(frames=frames, hw=hw))


def naive_ffam(q, k, v, frames, H, W, r):
    """Eq. 10: per frame, its own tokens and every other frame's tokens averaged over r×r cells."""
    out = torch.empty_like(q)
    pool = lambda x: x.view(x.shape[0], H // r, r, W // r, r, -1).mean(dim=(2, 4)).reshape(x.shape[0], -1, x.shape[-1])
    for b in range(q.shape[0]):
        video, f = b - b % frames, b % frames
        keys = [k[b]] + [pool(k[video + j]) for j in range(frames) if j != f]
        values = [v[b]] + [pool(v[video + j]) for j in range(frames) if j != f]
        keys, values = torch.cat(keys, 1), torch.cat(values, 1)
        out[b] = torch.softmax(q[b] @ keys.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ values
    return out


@pytest.mark.parametrize("r", [1, 2])
def test_ffam_matches_naive_reference(r):
    q, k, v = ffam_inputs(frames=3)
    torch.testing.assert_close(FineCoarse(r)(q, k, v, call(3)), naive_ffam(q, k, v, 3, 4, 6, r), **EXACT)


def test_ffam_with_one_frame_is_self_attention():
    q, k, v = ffam_inputs(frames=1)
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(FineCoarse(2)(q, k, v, call(1)), plain, **EXACT)


@pytest.mark.parametrize("frames, r, downsample", [(3, 2, "avg"), (4, 2, "stride"), (5, 1, "avg"), (2, 4, "avg")])
def test_ffam_key_count(frames, r, downsample):
    """With q = 0 every key gets the same weight; values of 1 on the query's own frame and 0 elsewhere then
    give N / (number of keys): the count must be N + (F − 1)·N/r²."""
    H, W = 8, 4
    N = H * W
    q = torch.zeros(frames, 1, N, 2, dtype=torch.float64)
    k = torch.randn(frames, 1, N, 2, dtype=torch.float64)
    for i in range(frames):
        v = torch.zeros(frames, 1, N, 1, dtype=torch.float64)
        v[i] = 1
        out = FineCoarse(r, downsample)(q, k, v, call(frames, (H, W)))
        keys = N / out[i]
        torch.testing.assert_close(keys, torch.full_like(keys, N + (frames - 1) * N / r**2), **EXACT)


def test_ffam_with_r1_is_all_frame_attention():
    q, k, v = ffam_inputs(frames=3)
    torch.testing.assert_close(FineCoarse(1)(q, k, v, call(3)), AllFrames()(q, k, v, call(3)), **EXACT)


def test_ffam_ignores_detail_below_the_cell_size_of_other_frames():
    """Adding to frame 1 a pattern with zero mean in every 2×2 cell leaves frame 0's output unchanged."""
    q, k, v = ffam_inputs(frames=3, branches=1)
    cell = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(2, 3).reshape(1, 24, 1)
    k2, v2 = k.clone(), v.clone()
    k2[1] += cell
    v2[1] += 2 * cell
    a, b = FineCoarse(2)(q, k, v, call(3)), FineCoarse(2)(q, k2, v2, call(3))
    torch.testing.assert_close(a[0], b[0], **EXACT)
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_ffam_bad_options():
    with pytest.raises(ValueError, match="r must be"):
        FineCoarse(0)
    with pytest.raises(ValueError, match="downsample"):
        FineCoarse(2, "max")


def test_inflating_a_video_unet_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="already a video UNet"):
        inflate(inflate(tiny_sd.unet, "ei2"), "tune-a-video")
