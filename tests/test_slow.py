"""Full-size SD1.5 parity (`pytest -m slow`): the checks of test_models.py at SD1.5's real widths and depths.

The weights are random (diffusers' and transformers' own initialisation, then every parameter perturbed
by 0.05·randn), written in the hub layout and loaded by each side through its own loader. Full size
matters where tiny models cannot reach: 8 heads of width 40–160, 320–1280 channels in 32 GroupNorm groups,
12 CLIP layers, and latents of real video frames (854×480 → 60×106, which halves to 30×53, 15×27 and
8×14 and must be upsampled back to exactly those sizes).

Memory: a full UNet is 3.4 GB in float32 and 6.9 GB in float64, so no test holds two models of one family.
Each module fixture loads a model, runs every input through it, keeps only the outputs and frees the model
before the next one loads; stemref's float64 outputs are all computed in one `stemref.load`.
Measured (`/usr/bin/time -v`, 2 CPU cores shared with other work): 13 min wall, 6 min of CPU time, peak
RSS 12.4 GiB. The peak is `stemref.load(dtype=torch.float64)` itself (12.2 GiB on its own): the UNet's
float32 tensors and their float64 copies are briefly both in memory.

The largest |difference| of each comparison is recorded with `record_property`; read the numbers with
`--junitxml=FILE -o junit_family=xunit1`. All float64 and float32 comparisons measured exactly 0.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import stemref
from conftest import perturb, write_hub_layout

F64 = dict(atol=1e-10, rtol=0)
F32 = dict(atol=1e-5, rtol=0)

# stable-diffusion-v1-5's configs; UNet and VAE arguments left out are diffusers' defaults, which are SD1.5's.
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

# name -> (latent shape, timestep): a 512×512 frame, and an 854×480 frame (106 = 854 // 8).
UNET_CASES = {"64x64": ((1, 4, 64, 64), 981), "60x106": ((1, 4, 60, 106), 261)}
PROMPTS = ["a mallard duck swimming in a lake", "", "a tennis player, in the style of Van Gogh; 4k!"]
TXT2IMG = dict(prompt="a red bicycle", seed=11)


def unet_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, 4, h, w) and a text context (B, 77, 768), the same for every dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    context = torch.randn(shape[0], 77, 768, generator=g, dtype=torch.float64)
    return x.to(dtype), context.to(dtype)


def vae_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """An image (1, 3, 256, 256) in [-1, 1] to encode and latents (1, 4, 32, 32) to decode."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 256, 256, generator=g, dtype=torch.float64) * 2 - 1
    return image, torch.randn(1, 4, 32, 32, generator=g, dtype=torch.float64)


def check(ours: torch.Tensor, theirs: torch.Tensor, record_property, name: str, tol: dict) -> None:
    record_property(f"max_abs_diff[{name}]", f"{(ours - theirs).abs().max().item():.3e}")
    record_property(f"max_abs[{name}]", f"{theirs.abs().max().item():.3e}")
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.fixture(scope="module")
def sd15_root(tmp_path_factory) -> Path:
    """A randomly initialised SD1.5 in the hub layout (about 4.3 GB of float32 safetensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(**SD15_UNET), 1)
    vae = perturb(AutoencoderKL(**SD15_VAE), 2)
    text = perturb(CLIPTextModel(CLIPTextConfig(**SD15_CLIP)), 3)
    root = write_hub_layout(tmp_path_factory.mktemp("sd15-random"), unet, vae, text)
    del unet, vae, text
    gc.collect()
    return root


@pytest.fixture(scope="module")
def ours(sd15_root) -> dict[str, torch.Tensor]:
    """Every float64 stemref output the tests compare, from one `stemref.load`; the model is freed on return."""
    sd = stemref.load(sd15_root, dtype=torch.float64)
    out = {}
    with torch.no_grad():
        for name, (shape, t) in UNET_CASES.items():
            x, context = unet_inputs(shape, torch.float64)
            out[f"unet {name}"] = sd.unet(x, t, context)
        image, z = vae_inputs()
        posterior = sd.vae.encode(image)
        out["vae mean"], out["vae std"] = posterior.mean, posterior.std
        out["vae decode"] = sd.vae.decode(z)
        out["prompts"] = sd.encode_prompt(PROMPTS)
        out["txt2img"] = stemref.txt2img(sd, TXT2IMG["prompt"], steps=1, guidance=7.5, seed=TXT2IMG["seed"], size=64)
    del sd, posterior
    gc.collect()
    return out


@pytest.fixture(scope="module")
def diffusers_unet64(sd15_root) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15_root / "unet").double().eval()
    out = {}
    with torch.no_grad():
        for name, (shape, t) in UNET_CASES.items():
            x, context = unet_inputs(shape, torch.float64)
            out[name] = unet(x, t, context).sample
    del unet
    gc.collect()
    return out


@pytest.fixture(scope="module")
def diffusers_vae64(sd15_root) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd15_root / "vae").double().eval()
    image, z = vae_inputs()
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        out = {"vae mean": posterior.mean, "vae std": posterior.std, "vae decode": vae.decode(z).sample}
    del vae, posterior
    gc.collect()
    return out


def _hf_tokenizer(root: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_float64(ours, diffusers_unet64, record_property, case):
    """60×106 goes 60×106 → 30×53 → 15×27 → 8×14 and back through upsampling to the skip connections' sizes."""
    check(ours[f"unet {case}"], diffusers_unet64[case], record_property, case, F64)


@pytest.mark.slow
def test_unet_float32(sd15_root, record_property):
    """Both sides in float32 on the same 512×512 latents, one model in memory at a time."""
    from diffusers import UNet2DConditionModel

    shape, t = UNET_CASES["64x64"]
    x, context = unet_inputs(shape, torch.float32)
    with torch.no_grad():
        sd = stemref.load(sd15_root)
        ours = sd.unet(x, t, context)
        del sd
        gc.collect()
        unet = UNet2DConditionModel.from_pretrained(sd15_root / "unet").eval()
        theirs = unet(x, t, context).sample
        del unet
        gc.collect()
    check(ours, theirs, record_property, "unet float32", F32)


@pytest.mark.slow
@pytest.mark.parametrize("part", ["vae mean", "vae std", "vae decode"])
def test_vae_float64(ours, diffusers_vae64, record_property, part):
    check(ours[part], diffusers_vae64[part], record_property, part, F64)


@pytest.mark.slow
def test_encode_prompt_float64(ours, sd15_root, record_property):
    """stemref's tokenizer and text encoder against transformers' tokenizer and CLIPTextModel from the same folder."""
    from transformers import CLIPTextModel

    ids = _hf_tokenizer(sd15_root)(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids  # (3, 77)
    text = CLIPTextModel.from_pretrained(sd15_root / "text_encoder").double().eval()
    with torch.no_grad():
        theirs = text(ids).last_hidden_state
    del text
    gc.collect()
    check(ours["prompts"], theirs, record_property, "encode_prompt", F64)


@pytest.mark.slow
def test_txt2img_matches_diffusers_pipeline(ours, sd15_root, record_property):
    """One DDIM step with CFG at 64×64 through StableDiffusionPipeline, all three models in float64."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(sd15_root / "vae").double().eval(),
        text_encoder=CLIPTextModel.from_pretrained(sd15_root / "text_encoder").double().eval(),
        tokenizer=_hf_tokenizer(sd15_root),
        unet=UNet2DConditionModel.from_pretrained(sd15_root / "unet").double().eval(),
        scheduler=DDIMScheduler.from_pretrained(sd15_root / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # txt2img draws its starting noise on the CPU from the seed, as float32, before casting.
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(TXT2IMG["seed"])).double()
    theirs = pipe(TXT2IMG["prompt"], height=64, width=64, num_inference_steps=1, guidance_scale=7.5,
                  latents=latents, output_type="pt").images
    del pipe
    gc.collect()
    check(ours["txt2img"], theirs.float(), record_property, "txt2img", F32)
