"""Temporal consistency and UNet feature extraction against independent references.

`temporal_consistency` is checked against a numpy reference written here with explicit loops: bilinear
sampling by hand (four corners and their weights), the in-frame mask, per-position cosines, the mean over
positions then over pairs. `unet_features` is checked against diffusers' own UNet with a forward hook on
the same module, fed by diffusers' VAE and transformers' text encoder.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stemref.metrics import LAST_DECODER_SELF_ATTENTION, temporal_consistency, unet_features


def reference_consistency(features: np.ndarray, flow: np.ndarray | None) -> float:
    """Loops over pairs and positions; flow (F - 1, 2, h, w) already on the feature grid."""
    n_frames, _, h, w = features.shape
    per_pair = []
    for i in range(n_frames - 1):
        cosines = []
        for y in range(h):
            for x in range(w):
                current = features[i + 1, :, y, x]
                if flow is None:
                    previous = features[i, :, y, x]
                else:
                    sx, sy = x + flow[i, 0, y, x], y + flow[i, 1, y, x]
                    if not (0 <= sx <= w - 1 and 0 <= sy <= h - 1):
                        continue  # the scene point was outside the previous frame
                    x0, y0 = int(math.floor(sx)), int(math.floor(sy))
                    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
                    fx, fy = sx - x0, sy - y0
                    f = features[i]
                    previous = ((1 - fx) * (1 - fy) * f[:, y0, x0] + fx * (1 - fy) * f[:, y0, x1]
                                + (1 - fx) * fy * f[:, y1, x0] + fx * fy * f[:, y1, x1])
                cosines.append(previous @ current / (np.linalg.norm(previous) * np.linalg.norm(current)))
        per_pair.append(np.mean(cosines))
    return float(np.mean(per_pair))


def random_features(frames=3, channels=5, h=6, w=7, seed=0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(frames, channels, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_identical_frames_score_one():
    frame = random_features(1, dtype=torch.float32)
    assert temporal_consistency(frame.expand(4, -1, -1, -1)) == pytest.approx(1.0, abs=1e-6)


def test_matches_reference_without_flow():
    features = random_features()
    assert temporal_consistency(features) == pytest.approx(reference_consistency(features.numpy(), None), abs=1e-12)


def test_matches_reference_with_flow():
    features = random_features(seed=1)
    # displacements up to ±2.5 px on a 6x7 grid: fractional sources, and some outside the frame (left out)
    flow = (torch.rand(2, 2, 6, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5) * 5
    expected = reference_consistency(features.numpy(), flow.numpy())
    assert temporal_consistency(features, flow) == pytest.approx(expected, abs=1e-12)


def test_half_precision_is_computed_in_float32():
    features = random_features(seed=3)
    expected = reference_consistency(features.half().double().numpy(), None)
    assert temporal_consistency(features.half()) == pytest.approx(expected, abs=1e-6)


def test_zero_flow_equals_no_flow():
    features = random_features(seed=4)
    zero = torch.zeros(2, 2, 12, 14, dtype=torch.float64)  # at twice the feature resolution
    assert temporal_consistency(features, zero) == pytest.approx(temporal_consistency(features), abs=1e-12)


def test_translation_with_matching_flow_scores_one():
    """Smooth features moving right by 2.5 feature pixels per frame; the flow is given at twice the resolution."""
    h, w, shift = 12, 16, 2.5
    g = torch.Generator().manual_seed(5)
    freq = (torch.rand(6, 2, generator=g, dtype=torch.float64) - 0.5) * 0.5  # rad/pixel, |k| ≤ 0.25: smooth
    phase = torch.rand(6, generator=g, dtype=torch.float64) * 2 * math.pi
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    features = torch.stack([torch.cos(freq[:, 0, None, None] * (xs - i * shift) + freq[:, 1, None, None] * ys
                                      + phase[:, None, None]) for i in range(4)])  # (4, 6, h, w)
    # frame i + 1 at x shows frame i at x - shift: the backward flow is -shift, i.e. -2 * shift image pixels
    flow = torch.zeros(3, 2, 2 * h, 2 * w, dtype=torch.float64)
    flow[:, 0] = -2 * shift
    assert temporal_consistency(features) < 0.97  # motion alone lowers the score
    assert temporal_consistency(features, flow) > 0.9999  # left: bilinear interpolation error of smooth waves
    wrong_way = -flow
    assert temporal_consistency(features, wrong_way) < temporal_consistency(features)


@pytest.mark.parametrize("features, flow, match", [
    (torch.zeros(3, 4, 5), None, r"\(F, C, h, w\)"),
    (torch.zeros(1, 4, 5, 5), None, "at least 2 frames"),
    (torch.zeros(3, 4, 5, 5, dtype=torch.long), None, "floating point"),
    (torch.full((3, 4, 5, 5), math.nan), None, "finite"),
    (torch.zeros(3, 4, 5, 5), torch.zeros(3, 2, 5, 5), r"\(2, 2, H', W'\)"),
    (torch.zeros(3, 4, 5, 5), torch.zeros(2, 3, 5, 5), r"\(2, 2, H', W'\)"),
    (torch.zeros(3, 4, 5, 5), torch.zeros(2, 2, 5), r"\(2, 2, H', W'\)"),
    (torch.zeros(3, 4, 5, 5), torch.full((2, 2, 5, 5), math.inf), "finite"),
    (torch.zeros(3, 4, 5, 5), torch.full((2, 2, 5, 5), 100.0), "outside frame"),
])
def test_bad_inputs_raise(features, flow, match):
    with pytest.raises(ValueError, match=match):
        temporal_consistency(features, flow)


def test_unet_features_match_diffusers_hook(tiny_loaded, tiny_reference, tiny_root):
    from transformers import CLIPTokenizer

    unet, vae, text = tiny_reference
    frames = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    prompt = "a mallard swimming"
    tokenizer = CLIPTokenizer.from_pretrained(tiny_root / "tokenizer", model_max_length=77)
    ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    captured = []
    handle = unet.get_submodule(LAST_DECODER_SELF_ATTENTION).register_forward_hook(
        lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            latents = vae.encode(frames * 2 - 1).latent_dist.mean * 0.18215
            cond = text(ids).last_hidden_state.expand(3, -1, -1)
            unet(latents, 1, encoder_hidden_states=cond)
    finally:
        handle.remove()
    expected = captured[0].reshape(3, 8, 6, -1).permute(0, 3, 1, 2)  # top decoder level: the 8x6 latent grid

    ours = unet_features(tiny_loaded, frames, prompt, batch=2)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    assert not tiny_loaded.unet.get_submodule(LAST_DECODER_SELF_ATTENTION)._forward_hooks  # the hook was removed


def test_unet_features_on_a_coarser_level(tiny_sd):
    frames = torch.rand(2, 3, 72, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # latent grid 9x5 -> 5x3 -> 3x2 -> 2x1: the second decoder level runs on 3x2
    features = unet_features(tiny_sd, frames, "", layer="up_blocks.1.attentions.0.transformer_blocks.0.attn1")
    assert features.shape == (2, 64, 3, 2)


def test_unet_features_errors_remove_the_hook(tiny_sd):
    frames = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="no module"):
        unet_features(tiny_sd, frames, "", layer="up_blocks.9.attn1")
    with pytest.raises(ValueError, match="not tokens"):
        unet_features(tiny_sd, frames, "", layer="time_embedding")  # (B, E) vectors, not a feature map
    assert not tiny_sd.unet.time_embedding._forward_hooks
