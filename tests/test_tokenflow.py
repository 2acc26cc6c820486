"""TokenFlow editing (stemref.edit.tokenflow) and FreeU (stemref.freeu): invariants that follow from the method
(identical frames edit to the plain reconstruction, a single keyframe with the source prompt is a plain UNet
call, the negative prompt is inert at guidance 1) and an independent reference written here on diffusers' UNet.

The reference re-implements the official editing step with diffusers' attention-processor API: explicit
softmax attention, keyframe outputs cached *after* to_out (as the official code does; stemref caches them
before and relies on to_out being affine with blend weights summing to 1), a full cosine-similarity
matrix for the nearest neighbours, a forward hook on conv2 for the conv injection, and diffusers'
DDIMScheduler. Everything runs in float64 on the tiny random-weight SD1.x model.

Dimension legend: F frames, B frames per batch, K keyframes, N tokens, C channels, h heads, d head dim.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM

import stemref
from stemref.attention import AttnCall, RunInfo
from stemref.edit import tokenflow
from stemref.edit.tokenflow import KeyframeAttention, KeyframeFeatures
from stemref.freeu import FreeU, fourier_filter

PROMPT = "a mallard floats on the pond"
TARGET = "a white swan floats on the pond"
STEM = {"num_bases": 4}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def inversion(tiny_sd):
    """5 textured frames of 64×64 (8×8 latents), 4 steps of STEM inversion."""
    return stemref.invert(tiny_sd, rand(5, 3, 64, 64, seed=0), PROMPT, steps=4, context="stem", **STEM)


# ---------------------------------------------------------------------------------------------------------
# Pieces


def test_blend_weights_are_the_official_table():
    # sigmoid(d_prev / (d_own + d_prev)) with distances to batch centres, batch 8: the values the official
    # code computes (printed from inside a run of it), to 4 decimals
    official = [0.6225, 0.6514, 0.6792, 0.7058, 0.7311, 0.7109, 0.6971, 0.6869]
    for index in (1, 2, 5):
        w = tokenflow.blend_weights(index, range(index * 8, index * 8 + 8), 8)
        assert w.tolist() == pytest.approx(official, abs=5e-5)
    assert tokenflow.blend_weights(0, range(0, 8), 8) is None


def test_keyframe_blend_variant_is_linear_between_the_keyframes():
    w = tokenflow.blend_weights(1, range(8, 16), 8, "keyframes", keyframes=[5, 10])
    # distance to keyframe 10 (own) and 5 (previous): s = 10 gets 1, s = 8 gets 3/5, s = 15 gets 10/15
    assert w.tolist() == pytest.approx([3 / 5, 4 / 5, 1.0, 6 / 7, 7 / 9, 8 / 11, 9 / 13, 10 / 15], abs=1e-15)


def test_injection_step_counts():
    def counts(steps, attn, conv):
        layers = [tokenflow.injected_layers(i, steps, attn, conv) for i in range(steps)]
        n_conv = sum(tokenflow.PNP_CONV_LAYER in s for s in layers)
        n_attn = [sum(name in s for s in layers) for name in tokenflow.PNP_ATTENTION_LAYERS]
        assert len(set(n_attn)) == 1  # every injected attention layer on the same steps
        # injection is on the first (noisiest) steps only
        assert all(tokenflow.PNP_CONV_LAYER in layers[i] for i in range(n_conv))
        return n_conv, n_attn[0]

    assert counts(50, 0.5, 0.8) == (40, 25)
    assert counts(6, 0.5, 0.8) == (4, 3)  # int(6 · 0.8) from a float product, as the official code
    assert counts(50, 0.0, 0.0) == (0, 0)
    assert len(tokenflow.PNP_ATTENTION_LAYERS) == 8


def test_injected_attention_layers_exist(tiny_sd):
    assert set(tokenflow.PNP_ATTENTION_LAYERS) <= set(tiny_sd.unet.attention_layers)
    names = {name for name, _ in tiny_sd.unet.named_modules()}
    assert tokenflow.PNP_CONV_LAYER in names


def test_keyframes_drawn_in_their_batches():
    ranges = tokenflow.batch_ranges(21, 8)
    assert [(r.start, r.stop) for r in ranges] == [(0, 8), (8, 16), (16, 21)]
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        key = tokenflow.draw_keyframes(g, ranges, 8)
        assert all(k in r for k, r in zip(key, ranges))
    # whole batches: the official draw, randint(B, (batches,)) + arange(0, F, B)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    expected = (torch.randint(8, (3,), generator=g2) + torch.arange(0, 24, 8)).tolist()
    assert tokenflow.draw_keyframes(g1, tokenflow.batch_ranges(24, 8), 8) == expected


def test_extended_attention_one_keyframe_is_self_attention_and_order_free():
    h, N, d, K = 2, 6, 4, 3
    q, k, v = (rand(3 * K, h, N, d, seed=s) for s in (1, 2, 3))
    x = rand(3 * K, N, 8, seed=4)
    call = AttnCall("down_blocks.0.attentions.0.transformer_blocks.0.attn1", False, RunInfo(frames=K), x)
    out = KeyframeAttention({})(q, k, v, call)

    def reference(rows):  # explicit softmax over the keyframes' tokens of the same branch
        keys, values = k[rows].transpose(0, 1).reshape(h, -1, d), v[rows].transpose(0, 1).reshape(h, -1, d)
        p = torch.softmax(q[rows] @ keys.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (K, h, N, K·N)
        return p @ values

    for branch in (1, 2):
        rows = list(range(branch * K, branch * K + K))
        torch.testing.assert_close(out[rows], reference(rows), rtol=0, atol=1e-12)
    for f in range(K):  # the source branch stays per frame
        p = torch.softmax(q[f] @ k[f].transpose(-1, -2) / math.sqrt(d), dim=-1)
        torch.testing.assert_close(out[f], p @ v[f], rtol=0, atol=1e-12)
    # order of the keyframes does not matter to any keyframe's output
    perm = [2, 0, 1]
    rows = [b * K + p for b in range(3) for p in perm]
    permuted = KeyframeAttention({})(q[rows], k[rows], v[rows], AttnCall(call.name, False, RunInfo(frames=K), x[rows]))
    torch.testing.assert_close(permuted, out[rows], rtol=0, atol=1e-12)
    # one keyframe: extended attention is plain self-attention
    one = [0, K, 2 * K]
    single = KeyframeAttention({})(q[one], k[one], v[one], AttnCall(call.name, False, RunInfo(frames=1), x[one]))
    for row, r in enumerate(one):
        p = torch.softmax(q[r] @ k[r].transpose(-1, -2) / math.sqrt(d), dim=-1)
        torch.testing.assert_close(single[row], p @ v[r], rtol=0, atol=1e-12)


def test_propagation_picks_nearest_keyframe_tokens():
    """A frame made of a keyframe's tokens, shuffled, gets that keyframe's outputs shuffled the same way."""
    h, N, C, d = 2, 5, 6, 3
    keyframe_inputs = rand(2, N, C, seed=5) - 0.5  # (K, N, C)
    outputs = rand(3, 2, h, N, d, seed=6)
    cache = {"a.attn1": KeyframeFeatures(keyframe_inputs, outputs)}
    perm = torch.tensor([3, 1, 4, 0, 2])
    x = torch.cat([keyframe_inputs[1][perm][None] * 2.0, torch.zeros(2, N, C, dtype=torch.float64)])  # (3·1, N, C)
    q = torch.zeros(3, h, N, d, dtype=torch.float64)
    call = AttnCall("a.attn1", False, RunInfo(frames=1), x)
    out = tokenflow.Propagation(cache, 1, torch.tensor([0.7], dtype=torch.float64))(q, q, q, call)  # batch 1: keyframes 1 and 0
    nearest_in_0 = (torch.nn.functional.normalize(x[0], dim=-1)
                    @ torch.nn.functional.normalize(keyframe_inputs[0], dim=-1).T).argmax(-1)
    expected = 0.7 * outputs[:, 1][:, :, perm] + 0.3 * outputs[:, 0][:, :, nearest_in_0]  # (3, h, N, d)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# FreeU


def freeu_reference(h: np.ndarray, skip: np.ndarray, b: float, s: float) -> tuple[np.ndarray, np.ndarray]:
    """FreeU written with numpy: first half of h's channels × b; skip's spectrum × s on the centred 2×2 box."""
    h = h.copy()
    h[:, : h.shape[1] // 2] *= b
    H, W = skip.shape[-2:]
    spectrum = np.fft.fftshift(np.fft.fft2(skip), axes=(-2, -1))
    mask = np.ones((H, W))
    mask[H // 2 - 1: H // 2 + 1, W // 2 - 1: W // 2 + 1] = s  # the official slice (on a 1-pixel side: -1:1)
    return h, np.fft.ifft2(np.fft.ifftshift(spectrum * mask, axes=(-2, -1))).real


@pytest.mark.parametrize("hw", [(8, 8), (5, 7), (2, 2), (1, 1)])
def test_fourier_filter_against_numpy(hw):
    x = rand(2, 3, *hw, seed=7)
    _, expected = freeu_reference(x.numpy()[:, :2], x.numpy(), 1.0, 0.3)
    torch.testing.assert_close(fourier_filter(x, 1, 0.3), torch.from_numpy(expected), rtol=0, atol=1e-12)
    assert fourier_filter(x, 1, 1.0) is x


def test_freeu_identity_is_the_plain_unet(tiny_sd):
    x, context = rand(2, 4, 8, 8, seed=8), rand(2, 77, 32, seed=9)
    plain = tiny_sd.unet(x, 500, context)
    assert torch.equal(tiny_sd.unet(x, 500, context, freeu=FreeU(1, 1, 1, 1)), plain)
    assert not torch.allclose(tiny_sd.unet(x, 500, context, freeu=FreeU()), plain)


def test_freeu_unet_against_diffusers_with_hooks(tiny_loaded, tiny_reference):
    """STEM's channel rule on diffusers' UNet through pre-hooks on the decoder ResNets: h with the top width
    gets (b1, s1), h with half of it gets (b2, s2)."""
    unet = tiny_reference[0]
    top = unet.config.block_out_channels[-1]
    freeu = FreeU(1.2, 1.4, 0.9, 0.2)
    up = list(reversed(unet.config.block_out_channels))
    hooks = []
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            hidden = up[max(i - 1, 0)] if j == 0 else up[i]  # channels of the running features; the rest is skip

            def pre(module, args, hidden=hidden):
                x = args[0]
                h, skip = x[:, :hidden], x[:, hidden:]
                rule = {top: (freeu.b1, freeu.s1), top // 2: (freeu.b2, freeu.s2)}.get(hidden)
                if rule:
                    h, skip = (torch.from_numpy(a) for a in freeu_reference(h.numpy(), skip.numpy(), *rule))
                return (torch.cat([h, skip], dim=1), *args[1:])
            hooks.append(resnet.register_forward_pre_hook(pre))
    try:
        x, context = rand(2, 4, 8, 8, seed=10), rand(2, 77, 32, seed=11)
        with torch.no_grad():
            expected = unet(x, 500, context).sample
        torch.testing.assert_close(tiny_loaded.unet(x, 500, context, freeu=freeu), expected, rtol=0, atol=1e-10)
    finally:
        for hook in hooks:
            hook.remove()


# ---------------------------------------------------------------------------------------------------------
# The editor against a reference on diffusers


class ReferenceAttention:
    """diffusers attention processor: keyframe pass (extended attention, q/k injection, cache after to_out),
    batch pass (full cosine matrix, argmax, gather, official blend) or plain attention."""

    def __init__(self, name: str, state: dict):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        x = hidden_states
        context = x if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        heads, s = attn.heads, self.state
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (rows, h, tokens, d)

        def attend(q, k, v):
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            out = (p @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
            return attn.to_out[0](out)

        if encoder_hidden_states is not None or not self.name.endswith("attn1"):
            return attend(split(q), split(k), split(v))
        n = s["frames"]
        if s["pass"] == "keyframes":
            if s["inject_attn"] and self.name in tokenflow.PNP_ATTENTION_LAYERS:
                q = torch.cat([q[:n]] * 3)
                k = torch.cat([k[:n]] * 3)
            out = [attend(split(q[:n]), split(k[:n]), split(v[:n]))]
            for b in (1, 2):
                rows = slice(b * n, b * n + n)
                kk = split(k[rows].reshape(1, -1, k.shape[-1]))  # (1, h, K·N, d)
                vv = split(v[rows].reshape(1, -1, v.shape[-1]))
                out.append(attend(split(q[rows]), kk.expand(n, -1, -1, -1), vv.expand(n, -1, -1, -1)))
            out = torch.cat(out)  # (3K, N, C)
            s["cache"][self.name] = (x[:n].clone(), out.clone())
            return out
        inputs, outputs = s["cache"][self.name]
        K = inputs.shape[0]
        src = x[:n].reshape(-1, x.shape[-1])  # (B·N, C)

        def gather(j):
            sim = (src / src.norm(dim=-1, keepdim=True)) @ (inputs[j] / inputs[j].norm(dim=-1, keepdim=True)).T
            idx = sim.argmax(dim=-1)
            return torch.stack([outputs[b * K + j][idx].view(n, -1, x.shape[-1]) for b in range(3)])  # (3, B, N, C)

        i, batch = s["index"], s["batch"]
        out = gather(i)
        if i > 0:
            w = torch.tensor([1 / (1 + math.exp(-abs(f - ((i - 1) * batch + batch // 2))
                                                 / (abs(f - (i * batch + batch // 2)) + abs(f - ((i - 1) * batch + batch // 2)))))
                              for f in s["frame_ids"]], dtype=x.dtype).view(1, n, 1, 1)
            out = w * out + (1 - w) * gather(i - 1)
        return out.reshape(3 * n, -1, x.shape[-1])


def reference_edit(unet, sd, inversion, prompt, negative, guidance, batch, pnp_attn, pnp_conv, table):
    steps = len(inversion.timesteps)
    scheduler = DiffusersDDIM(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.double()

    def ddim_step(eps, t, x):  # closed form in float64 (diffusers' own step keeps ᾱ in float32)
        a_t, a_prev = alphas[t], alphas[max(t - 1000 // steps, 0)]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    state = {"cache": {}}
    previous = unet.attn_processors
    unet.set_attn_processor({name: ReferenceAttention(name.removesuffix(".processor"), state)
                             for name in unet.attn_processors})

    def conv_hook(module, inputs, output):
        if state["inject_conv"]:
            n = state["frames"]
            return torch.cat([output[:n]] * 3)
        return output

    hook = unet.up_blocks[1].resnets[1].conv2.register_forward_hook(conv_hook)
    emb = sd.encode_prompt([inversion.settings.prompt, negative, prompt])  # (3, 77, D)
    x = inversion.x_T.clone()
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps.tolist()):
                src = inversion.latents[1 + inversion.timesteps.index(t)]
                state.update(inject_attn=i < int(steps * pnp_attn), inject_conv=i < int(steps * pnp_conv), cache={})
                kf = table[i]
                state.update({"pass": "keyframes", "frames": len(kf)})
                unet(torch.cat([src[kf], x[kf], x[kf]]), t, emb.repeat_interleave(len(kf), 0))
                new = x.clone()
                for b, start in enumerate(range(0, x.shape[0], batch)):
                    ids = list(range(start, min(start + batch, x.shape[0])))
                    state.update({"pass": "batch", "frames": len(ids), "index": b, "batch": batch, "frame_ids": ids})
                    e = unet(torch.cat([src[ids], x[ids], x[ids]]), t, emb.repeat_interleave(len(ids), 0)).sample
                    _, eu, ec = e.chunk(3)
                    new[ids] = ddim_step(eu + guidance * (ec - eu), t, x[ids])
                x = new
    finally:
        hook.remove()
        unet.set_attn_processor(previous)
    return x


def test_editor_matches_reference(tiny_loaded, tiny_reference, inversion):
    """5 frames in batches of 2 (the last batch holds one frame), 4 steps: conv injection on 3 steps, q/k on 2."""
    table = [[1, 2, 4], [0, 3, 4], [1, 3, 4], [0, 2, 4]]
    ours = tokenflow.edit_latents(tiny_loaded, inversion, TARGET, batch=2, pnp_attn=0.5, pnp_conv=0.8, keyframes=table)
    expected = reference_edit(tiny_reference[0], tiny_loaded, inversion, TARGET, tokenflow.DEFAULT_NEGATIVE, 7.5, 2,
                              0.5, 0.8, table)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Whole-editor invariants


def test_identical_frames_edit_is_the_reconstruction(tiny_sd):
    """Identical frames, injection off, guidance 1, target = source prompt: the plain DDIM
    reconstruction (extended attention over identical keyframes = one frame's attention; blending equal
    tensors = identity), every frame identical."""
    frames = rand(1, 3, 64, 64, seed=12).expand(4, -1, -1, -1)
    inv = stemref.invert(tiny_sd, frames, PROMPT, steps=3, context="1-frame")
    edited = tokenflow.edit_latents(tiny_sd, inv, PROMPT, guidance=1.0, batch=2, pnp_attn=0, pnp_conv=0)
    with torch.no_grad():
        single = stemref.invert(tiny_sd, frames[:1], PROMPT, steps=3, context="1-frame")
        eps_fn = lambda x, t, i: tiny_sd.unet(x, t, tiny_sd.encode_prompt(PROMPT), RunInfo(frames=1, step=i))
        from stemref.sampling import ddim_sample_loop
        expected = ddim_sample_loop(tiny_sd.scheduler, single.x_T, eps_fn, 3)
    for f in range(4):
        torch.testing.assert_close(edited[f:f + 1], expected, rtol=0, atol=1e-10)


def test_single_keyframe_batch_with_the_source_prompt_keeps_the_keyframe(tiny_sd):
    """F = B (one keyframe), target = source prompt, guidance 1: in the first step the conditional
    branch sees exactly what the source branch sees, so the keyframe's ε is a plain per-frame UNet call on x_T
    (its nearest neighbours are its own tokens, one-keyframe extended attention is self-attention, and the
    injection copies equal tensors). Non-keyframes do not equal per-frame denoising."""
    inv = stemref.invert(tiny_sd, rand(5, 3, 64, 64, seed=13), PROMPT, steps=1, context="stem", **STEM)
    edited = tokenflow.edit_latents(tiny_sd, inv, PROMPT, guidance=1.0, batch=5, keyframes=[[2]])
    t = inv.timesteps[0]
    with torch.no_grad():
        eps = tiny_sd.unet(inv.x_T[2:3], t, tiny_sd.encode_prompt(PROMPT), RunInfo(frames=1))
    expected = tiny_sd.scheduler.step(eps, t, inv.x_T[2:3], 1)
    torch.testing.assert_close(edited[2:3], expected, rtol=0, atol=1e-10)
    assert not torch.allclose(edited[0:1], tiny_sd.scheduler.step(
        tiny_sd.unet(inv.x_T[0:1], t, tiny_sd.encode_prompt(PROMPT), RunInfo(frames=1)), t, inv.x_T[0:1], 1))


def test_keyframe_blend_variant_runs_and_differs(tiny_sd, inversion):
    """blend="keyframes" runs end to end and, on the same keyframe table, is not the official blend."""
    table = [[1, 2, 4]] * 4
    official = tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2, keyframes=table)
    variant = tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2, keyframes=table, blend="keyframes")
    assert variant.shape == official.shape and not torch.allclose(variant, official)


def test_negative_prompt_is_inert_at_guidance_one(tiny_sd, inversion):
    """At guidance 1 the unconditional branch cancels (up to rounding); it never enters the update."""
    a = tokenflow.edit_latents(tiny_sd, inversion, TARGET, guidance=1.0, batch=2, negative_prompt="")
    b = tokenflow.edit_latents(tiny_sd, inversion, TARGET, guidance=1.0, batch=2, negative_prompt="blurry")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    c = tokenflow.edit_latents(tiny_sd, inversion, TARGET, guidance=7.5, batch=2, negative_prompt="blurry")
    assert not torch.allclose(a, c)


def test_deterministic_and_seeded(tiny_sd, inversion):
    a = tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2, seed=3, freeu=True)
    b = tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2, seed=3, freeu=True)
    c = tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2, seed=4, freeu=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == inversion.x_T.shape


def test_keyframe_cache_lives_one_step(tiny_sd, inversion, monkeypatch):
    caches = []
    original = KeyframeAttention.__init__

    def spy(self, cache, chunk_frames=1):
        caches.append(cache)
        original(self, cache, chunk_frames)

    monkeypatch.setattr(KeyframeAttention, "__init__", spy)  # observing the editor, not changing it
    tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2)
    assert len(caches) == len(inversion.timesteps)
    assert len({id(c) for c in caches}) == len(caches)  # a fresh cache every step
    assert all(len(c) == 16 for c in caches)  # one entry per self-attention layer


def test_bad_arguments(tiny_sd, inversion):
    with pytest.raises(ValueError, match="batch"):
        tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=0)
    with pytest.raises(ValueError, match="keyframes"):
        tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2, keyframes=[[0, 2, 4]] * 3)
    with pytest.raises(ValueError, match=r"keyframes\[0\]\[1\] = 5"):
        tokenflow.edit_latents(tiny_sd, inversion, TARGET, batch=2, keyframes=[[0, 5, 4]] * 4)
    with pytest.raises(ValueError, match="pnp_attn"):
        tokenflow.edit_latents(tiny_sd, inversion, TARGET, pnp_attn=1.5)
    with pytest.raises(ValueError, match="guidance"):
        tokenflow.edit_latents(tiny_sd, inversion, TARGET, guidance=float("nan"))
    with pytest.raises(ValueError, match="blend"):
        tokenflow.edit_latents(tiny_sd, inversion, TARGET, blend="centres")
    with pytest.raises(ValueError, match="freeu"):
        tokenflow.edit_latents(tiny_sd, inversion, TARGET, freeu=(1, 2))


def test_non_finite_inversion_and_results_are_refused(tiny_sd, inversion):
    """A NaN inversion is refused before any work, and a model whose ε is infinite gives a ValueError naming the
    edited latents, never NaN frames."""
    import copy

    nan = stemref.Inversion(inversion.latents.clone(), inversion.timesteps, inversion.settings)
    nan.latents[-1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="the inversion's latents contain 1 NaN"):
        tokenflow.edit(tiny_sd, nan, TARGET, batch=5)
    broken = copy.deepcopy(tiny_sd)
    broken.unet.conv_out.bias.data.fill_(float("inf"))
    with pytest.raises(ValueError, match="the edited latents contain .* NaN or infinite"):
        tokenflow.edit_latents(broken, inversion, TARGET, batch=5)
