"""EI²'s ablation options (paper Figures 4–6), each against a naive reference written here.

- temporal_norm × spectral_norm × stam_heads: the temporal module x + Linear(Attention(norm(x))) written out
  per head (test_video_unet.naive_stam) with explicit norms (LayerNorm with and without affine, none,
  InstanceNorm over frames, IC).
- stam_position: one transformer block's forward redone in the three orders, the temporal module looped over
  locations by hand.
- frame_attention="sparse-causal" with resnet_norm "video" or "frame": the whole UNet against diffusers' with a
  naive sparse-causal processor and pooled or per-frame GroupNorms.
- The tuned-weights file records every option and rebuilds the same architecture; files that do not are refused.
"""
from __future__ import annotations

import copy

import pytest
import torch

from stemref.attention import RunInfo
from stemref.context import SparseCausal
from stemref.edit.tuning import METHODS, Tuned, inflate, method_options, tune, video_config
from stemref.temporal import SpectralLinear, init_temporal_, temporal_modules
from stemref.unet import BasicTransformerBlock
from test_video_unet import EXACT, NaiveSparseCausal, latents, naive_stam, reference_video_unet, text

NORMS = ("layernorm", "layernorm-no-affine", "none", "instancenorm", "centering")
# Tune-A-Video's model expressed with EI²'s options
TAV_LIKE = {"temporal_norm": "layernorm", "spectral_norm": "off", "frame_attention": "sparse-causal",
            "stam_position": "after-ff"}


# ---------------------------------------------------------------- the temporal module

def naive_norm(x: torch.Tensor, kind: str, weight=None, bias=None) -> torch.Tensor:
    """x (L, F, C): each norm with its statistics computed by hand."""
    if kind in ("layernorm", "layernorm-no-affine"):  # per token, over the channels
        mean = x.sum(-1, keepdim=True) / x.shape[-1]
        var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
        y = (x - mean) / torch.sqrt(var + 1e-5)
        return y * weight + bias if kind == "layernorm" else y
    if kind == "none":
        return x
    mean = x.sum(1, keepdim=True) / x.shape[1]  # per location and channel, over the frames
    if kind == "centering":
        return x - mean
    var = ((x - mean) ** 2).sum(1, keepdim=True) / x.shape[1]
    return (x - mean) / torch.sqrt(var + 1e-5)


def naive_temporal(x, norm_kind, norm, attn, heads: int, spectral: bool) -> torch.Tensor:
    """naive_stam (Eq. 6–9 per head) with the naive norm of that kind and W_v, W_L spectrally normalised or not."""
    affine = (norm.weight, norm.bias) if norm_kind == "layernorm" else ()
    return naive_stam(x, attn, heads, lambda h: naive_norm(h, norm_kind, *affine), spectral)


def module(options: dict, dim: int = 16, heads: int = 4):
    video = video_config("ei2", options)
    norm, attn = temporal_modules(dim, heads, video)
    init_temporal_(norm, attn, video, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking values, so that every path (zero-initialised ones too) is tested
        for p in [*norm.parameters(), attn.to_out[0].weight, attn.to_out[0].bias]:
            p.add_(torch.randn(p.shape, generator=g))
    return norm.double(), attn.double()


@pytest.mark.parametrize("heads", ["multi", "single"])
@pytest.mark.parametrize("spectral_norm", ["off", "exact"])
@pytest.mark.parametrize("norm_kind", NORMS)
def test_temporal_module_matches_naive_reference(norm_kind, spectral_norm, heads):
    norm, attn = module({"temporal_norm": norm_kind, "spectral_norm": spectral_norm, "stam_heads": heads})
    assert attn.heads == (4 if heads == "multi" else 1)
    assert isinstance(attn.to_v, SpectralLinear) == (spectral_norm != "off")
    assert bool(list(norm.parameters())) == (norm_kind == "layernorm")
    x = torch.randn(5, 6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        ours = x + attn(norm(x))
    torch.testing.assert_close(ours, naive_temporal(x, norm_kind, norm, attn, attn.heads, spectral_norm != "off"),
                               **EXACT)


def test_heads_and_norms_change_the_output():
    """The references above would also pass if an option were ignored; these pairs must differ."""
    x = torch.randn(5, 6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    outputs = {}
    for kind in NORMS:
        for heads in ("multi", "single"):
            norm, attn = module({"temporal_norm": kind, "spectral_norm": "off", "stam_heads": heads})
            with torch.no_grad():
                outputs[kind, heads] = attn(norm(x))
    values = list(outputs.values())
    assert all((a - b).abs().max() > 1e-6 for i, a in enumerate(values) for b in values[i + 1:])


def test_initial_output_map():
    """Spectral normalisation off: the output weight starts at zero (Tune-A-Video's code); on: random (σ(0) does not
    exist). EI²'s output bias starts at zero either way."""
    for spectral_norm in ("off", "power", "exact"):
        video = video_config("ei2", {"spectral_norm": spectral_norm})
        norm, attn = temporal_modules(16, 4, video)
        init_temporal_(norm, attn, video, torch.Generator().manual_seed(0))
        assert not attn.to_out[0].bias.any()
        assert bool(attn.to_out[0].weight.any()) == (spectral_norm != "off")


# ---------------------------------------------------------------- where STAM runs

def naive_block(block: BasicTransformerBlock, x, context, info: RunInfo, position: str) -> torch.Tensor:
    def temporal(h):  # each location's F frames, one at a time
        out = h.clone()
        F = info.frames
        for video in range(h.shape[0] // F):
            for n in range(h.shape[1]):
                seq = h[video * F:(video + 1) * F, n]  # (F, C)
                out[video * F:(video + 1) * F, n] = seq + block.attn_temp(block.norm_temp(seq[None]))[0]
        return out

    x = x + block.attn1(block.norm1(x), info=info)
    if position == "before-cross":  # FFAM → STAM → CA → FF
        x = temporal(x)
    x = x + block.attn2(block.norm2(x), context)
    if position == "after-cross":  # FFAM → CA → STAM → FF
        x = temporal(x)
    x = x + block.ff(block.norm3(x))
    if position == "after-ff":  # FFAM → CA → FF → STAM (Tune-A-Video's slot)
        x = temporal(x)
    return x


def test_stam_position_orders_the_block(tiny_sd):
    frames, hw = 3, (4, 4)
    x = torch.randn(2 * frames, 16, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    context = text(2 * frames)
    info = RunInfo(frames=frames, hw=hw)
    outputs = []
    for position in ("before-cross", "after-cross", "after-ff"):
        unet = inflate(tiny_sd.unet, "ei2", {"stam_position": position})
        block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
        with torch.no_grad():
            ours = block(x, context, info)
            torch.testing.assert_close(ours, naive_block(block, x, context, info, position), **EXACT)
        outputs.append(ours)
    assert all((a - b).abs().max() > 1e-6 for i, a in enumerate(outputs) for b in outputs[i + 1:])


# ---------------------------------------------------------------- frame attention and ResNet norms

@pytest.mark.parametrize("resnet_norm", ["video", "frame"])
def test_sparse_causal_variant_matches_reference(tiny_loaded, tiny_reference, resnet_norm):
    """With Tune-A-Video's norm, slot and sparse-causal attention and no spectral normalisation, EI²'s initial UNet
    is Tune-A-Video's with a zero temporal bias (silent temporal branch): diffusers' UNet with a naive
    sparse-causal processor, and GroupNorms pooled over frames ("video") or per frame ("frame")."""
    frames = 3
    unet = inflate(tiny_loaded.unet, "ei2", {**TAV_LIKE, "resnet_norm": resnet_norm})
    assert all(isinstance(layer.processor, SparseCausal)
               for name, layer in unet.attention_layers.items() if name.endswith("attn1"))
    if resnet_norm == "video":
        reference = reference_video_unet(tiny_reference[0], frames)
    else:
        reference = copy.deepcopy(tiny_reference[0])
        reference.set_attn_processor({name: NaiveSparseCausal(frames) if ".attn1." in name else proc
                                      for name, proc in reference.attn_processors.items()})
    x, context = latents(2 * frames), text(2 * frames)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 500, context, RunInfo(frames=frames)), reference(x, 500, context).sample,
                                   **EXACT)
    tav = inflate(tiny_loaded.unet, "tune-a-video", {"temporal_bias": "zero"}).state_dict()
    assert all(torch.equal(tav[k], v) for k, v in unet.state_dict().items())  # the same initial tensors


# ---------------------------------------------------------------- options, the tuned file

@pytest.mark.parametrize("options, message", [
    ({"temporal_norm": "batchnorm"}, "temporal_norm must be one of layernorm, layernorm-no-affine"),
    ({"stam_position": "before_cross"}, "stam_position must be one of before-cross, after-cross, after-ff"),
    ({"frame_attention": "full"}, "frame_attention must be one of ffam, sparse-causal"),
    ({"resnet_norm": "batch"}, "resnet_norm must be one of video, frame"),
    ({"stam_heads": "two"}, "stam_heads must be one of multi, single"),
    ({"spectral_norm": "none"}, "spectral_norm must be one of off, power, exact"),
    ({"temporal_norm": "none", "stam_centring": "channels"}, "it needs norm='centering'"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        method_options("ei2", options)


def test_tuned_file_records_the_architecture(tiny_sd, tmp_path):
    """A non-default variant is rebuilt from its file alone; EI² tunes the LayerNorm's affine (all of STAM)."""
    frames = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = {"temporal_norm": "layernorm", "stam_position": "after-cross", "stam_heads": "single",
               "frame_attention": "sparse-causal", "resnet_norm": "frame", "spectral_norm": "off"}
    result = tune(tiny_sd, frames, "a clip", "ei2", steps=1, lr=1e-3, **options)
    assert any(k.endswith("norm_temp.weight") for k in result.tensors)
    back = Tuned.load(result.save(tmp_path / "t.safetensors"))
    assert back.options == {**METHODS["ei2"], **options}
    a, b = result.unet(tiny_sd), back.unet(tiny_sd)
    assert b.video == a.video == video_config("ei2", options)
    x, context = latents(3, hw=(8, 8)), text(3)
    with torch.no_grad():
        assert torch.equal(a(x, 200, context, RunInfo(frames=3)), b(x, 200, context, RunInfo(frames=3)))


def test_tuned_file_without_every_option_is_refused(tiny_sd, tmp_path):
    import json

    from safetensors.torch import save_file

    frames = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = tune(tiny_sd, frames, "a clip", "ei2", steps=1)
    path = result.save(tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["stemref"])
    del meta["options"]["resnet_norm"]  # as a file from before the option existed
    save_file({k: v.contiguous() for k, v in result.tensors.items()}, path, metadata={"stemref": json.dumps(meta)})
    with pytest.raises(ValueError, match="does not record the ei2 option.*resnet_norm"):
        Tuned.load(path)
