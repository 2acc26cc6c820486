"""Numerical parity of stemref's UNet, VAE and text encoder with diffusers/transformers on the same weights.

Both sides load the tiny hub-layout checkpoint through their own loaders (stemref.load vs
from_pretrained), so the tests cover the names, the legacy VAE aliases and the text_model prefix too.
"""
from __future__ import annotations

import pytest
import torch

import stemref

F64 = dict(atol=1e-10, rtol=0)
F32 = dict(atol=1e-5, rtol=0)


def inputs(shape, text_width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    context = torch.randn(shape[0], 77, text_width, generator=g, dtype=dtype)
    return x, context


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (2, 4, 12, 10), (1, 4, 8, 8)])
@pytest.mark.parametrize("t", [1, 500, 981])
def test_unet_float64(tiny_loaded, tiny_reference, shape, t):
    """(12, 10) latents take the odd path 12×10 → 6×5 → 3×3 → 2×2 and back through sized upsampling."""
    x, context = inputs(shape, 32, torch.float64)
    with torch.no_grad():
        ours = tiny_loaded.unet(x, t, context)
        theirs = tiny_reference[0](x, t, context).sample
    torch.testing.assert_close(ours, theirs, **F64)


def test_unet_per_row_timesteps(tiny_loaded, tiny_reference):
    x, context = inputs((3, 4, 8, 8), 32, torch.float64)
    t = torch.tensor([1, 400, 999])
    with torch.no_grad():
        torch.testing.assert_close(tiny_loaded.unet(x, t, context), tiny_reference[0](x, t, context).sample, **F64)


def test_unet_float32(tiny_root, tiny_reference):
    sd = stemref.load(tiny_root)
    x, context = inputs((2, 4, 16, 16), 32, torch.float32)
    with torch.no_grad():
        ours = sd.unet(x, 321, context)
        theirs = tiny_reference[0].float()(x, 321, context).sample
        tiny_reference[0].double()
    torch.testing.assert_close(ours, theirs, **F32)


@pytest.mark.parametrize("hw", [(64, 64), (48, 40)])
def test_vae_float64(tiny_loaded, tiny_reference, hw):
    vae = tiny_reference[1]
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        ours, theirs = tiny_loaded.vae.encode(x), vae.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, **F64)
        torch.testing.assert_close(ours.std, theirs.std, **F64)
        torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(7)),
                                   theirs.sample(torch.Generator().manual_seed(7)), **F64)
        z = ours.mean
        torch.testing.assert_close(tiny_loaded.vae.decode(z), vae.decode(z).sample, **F64)


def test_vae_float32(tiny_root, tiny_reference):
    sd = stemref.load(tiny_root)
    vae = tiny_reference[1].float()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(sd.vae.encode(x).mean, vae.encode(x).latent_dist.mean, **F32)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sd.vae.decode(z), vae.decode(z).sample, **F32)
    tiny_reference[1].double()


def test_text_encoder(tiny_loaded, tiny_reference, tiny_root):
    ids = torch.randint(0, 49408, (3, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(tiny_loaded.text_encoder(ids), tiny_reference[2](ids).last_hidden_state, **F64)
        sd32 = stemref.load(tiny_root)
        theirs = tiny_reference[2].float()(ids).last_hidden_state
        tiny_reference[2].double()
        torch.testing.assert_close(sd32.text_encoder(ids), theirs, **F32)


def test_pipeline_conversions(tiny_loaded, tiny_reference):
    """encode_frames is the posterior mean × 0.18215 of frames mapped to [-1, 1]; decode_latents inverts the maps."""
    vae = tiny_reference[1]
    frames = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        expected = vae.encode(frames * 2 - 1).latent_dist.mean * 0.18215
        torch.testing.assert_close(tiny_loaded.encode_frames(frames, batch=2), expected, **F64)
        decoded = ((vae.decode(expected / 0.18215).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(tiny_loaded.decode_latents(expected, batch=2), decoded.float(), **F32)


def _hf_tokenizer(root):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77)


def test_encode_prompt(tiny_loaded, tiny_reference, tiny_root):
    prompts = ["a photo of a cat", "", "a mallard duck, swimming; 4k!"]
    ids = _hf_tokenizer(tiny_root)(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(tiny_loaded.encode_prompt(prompts), tiny_reference[2](ids).last_hidden_state, **F64)


def test_encode_prompt_refuses_long_prompts(tiny_loaded):
    with pytest.raises(ValueError, match="tokens long"):
        tiny_loaded.encode_prompt("duck " * 80)


def test_txt2img_matches_diffusers_pipeline(tiny_root, tiny_loaded, tiny_reference):
    """The whole text-to-image path (prompt, CFG, DDIM, decode) against StableDiffusionPipeline with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, text = tiny_reference
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_hf_tokenizer(tiny_root), unet=unet,
                                   scheduler=DDIMScheduler.from_pretrained(tiny_root / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)).double()
    theirs = pipe("a red bicycle", height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                  latents=latents, output_type="pt").images
    ours = stemref.txt2img(tiny_loaded, "a red bicycle", steps=4, guidance=7.5, seed=11, size=64)
    torch.testing.assert_close(ours, theirs.float(), **F32)


def test_txt2img_validates_size(tiny_loaded):
    with pytest.raises(ValueError, match="multiples of 8"):
        stemref.txt2img(tiny_loaded, "x", size=(60, 64), steps=1)


def test_attention_layers_are_named(tiny_loaded):
    names = list(tiny_loaded.unet.attention_layers)
    assert len(names) == 32 and sum(n.endswith("attn1") for n in names) == 16
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1" in names
    assert all(layer.name == name for name, layer in tiny_loaded.unet.attention_layers.items())


def test_set_attention_reaches_exactly_the_chosen_layers_and_restores(tiny_loaded):
    """Processors see the per-call facts passed to the UNet, only chosen layers are swapped, and the
    context manager puts the previous processors back."""
    from stemref.attention import sdpa

    calls = []

    def recording(q, k, v, call):
        calls.append((call.name, call.is_cross, call.info.frames, call.info.step, call.info.hw))
        return sdpa(q, k, v, call)

    chosen = lambda name: recording if name.startswith("up_blocks.1") and name.endswith("attn1") else None
    x, context = inputs((4, 4, 16, 16), 32, torch.float64)
    with torch.no_grad():
        plain = tiny_loaded.unet(x, 10, context)
        with tiny_loaded.unet.attention(chosen):
            swapped = tiny_loaded.unet(x, 10, context, stemref.RunInfo(frames=2, step=7))
        after = tiny_loaded.unet(x, 10, context)
    expected = [f"up_blocks.1.attentions.{j}.transformer_blocks.0.attn1" for j in range(3)]
    assert [c[0] for c in calls] == expected
    assert all(c[1:] == (False, 2, 7, (4, 4)) for c in calls)  # level 1 going up: 16 / 4 = 4
    assert all(layer.processor is sdpa for layer in tiny_loaded.unet.attention_layers.values())
    assert torch.equal(swapped, plain) and torch.equal(after, plain)


def test_tiny_model_has_the_topology_of_the_diffusers_built_fixture(tiny_sd, tiny_loaded):
    """stemref.tiny_model builds, by itself, exactly the modules and tensor shapes of the checkpoint that
    diffusers and transformers write; only the random values differ."""
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny_sd, part), getattr(tiny_loaded, part)
        assert ours.config == theirs.config
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert tiny_sd.scheduler.config == tiny_loaded.scheduler.config
    prompt = "a mallard, swimming in a pond!"
    assert torch.equal(tiny_sd.tokenizer(prompt), tiny_loaded.tokenizer(prompt))


def test_tiny_model_depends_on_its_seed_only():
    state = torch.random.get_rng_state()
    a, b, c = stemref.tiny_model(0), stemref.tiny_model(0), stemref.tiny_model(1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    for x, y, z in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), c.unet.state_dict().values()):
        assert torch.equal(x, y) and not torch.equal(x, z)
    assert torch.equal(a.text_encoder.text_model.embeddings.token_embedding.weight,
                       b.text_encoder.text_model.embeddings.token_embedding.weight)


def test_full_size_unet_has_diffusers_tensor_shapes():
    """SD1.5's UNet (built on the meta device: no memory) has exactly diffusers' keys and shapes, the skip
    widths of every decoder ResNet included."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from stemref.config import UNetConfig
    from stemref.unet import UNet2DConditionModel, skip_channels

    with torch.device("meta"):
        ours, theirs = UNet2DConditionModel(UNetConfig()), DiffusersUNet(cross_attention_dim=768)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert skip_channels(UNetConfig()) == [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]
