"""Shared fixtures: tiny random-weight SD1.x models.

- `tiny_sd`: `stemref.tiny_model(0)` in float64, built by stemref alone (no diffusers, no download); every
  test that checks stemref against invariants or references written in the test uses it.
- `tiny_root`, `tiny_loaded`, `tiny_reference`: a tiny checkpoint in the hub layout made by diffusers and
  transformers themselves, loaded by stemref (`tiny_loaded`) and by those libraries (`tiny_reference`); the
  tests that compare stemref with diffusers/transformers, and the loading and command-line tests, use them.

The diffusers-built models keep SD1.5's topology (4 levels, 2 layers per block, attention on the first 3 levels,
8 heads) at small widths, and every parameter is perturbed so that no path (a zero-initialised
projection, a unit GroupNorm) is an identity that could hide a wrong wiring.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# One torch thread per test process and per subprocess it starts: the tiny models gain nothing from more, and
# threads × processes oversubscribe a shared machine (the suite ran 7× slower in CPU time beside other jobs).
# STEMREF_TEST_THREADS=N gives more, e.g. for the full-size checks of `pytest -m slow`.
THREADS = int(os.environ.get("STEMREF_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)

TINY_UNET = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=8, sample_size=16)
TINY_VAE = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "prediction_type": "epsilon", "trained_betas": None, "clip_sample": False}
LEGACY_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(**TINY_UNET), 1)
    vae = perturb(AutoencoderKL(**TINY_VAE), 2)
    text = perturb(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), 3)
    return unet, vae, text


def write_hub_layout(root: Path, unet, vae, text) -> Path:
    """The folder layout of stable-diffusion-v1-5 on the hub, with its quirks: legacy VAE attention names,
    `text_model.` prefixes and an int64 position_ids tensor in the text encoder file."""
    from clip_vocab import write_clip_tokenizer_files

    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    vae_file = root / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(vae_file)
    save_file({_legacy_vae_name(k): v for k, v in sd.items()}, vae_file)
    (root / "text_encoder").mkdir(parents=True)
    text.config.to_json_file(root / "text_encoder" / "config.json")
    sd = {"text_model." + k: v.contiguous() for k, v in text.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, root / "text_encoder" / "model.safetensors")
    write_clip_tokenizer_files(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    return root


def _legacy_vae_name(key: str) -> str:
    if ".mid_block.attentions.0." not in key:
        return key
    for new, old in LEGACY_VAE_NAMES.items():
        key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    return key


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny SD1.x checkpoint in the hub's diffusers layout."""
    return write_hub_layout(tmp_path_factory.mktemp("tiny-sd"), *tiny_models())


@pytest.fixture(scope="session")
def tiny_sd():
    """stemref's own tiny SD1.x (stemref.tiny_model), float64."""
    import stemref

    return stemref.tiny_model(0, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_root):
    """The diffusers-built tiny checkpoint loaded by stemref, float64: the same weights as tiny_reference."""
    import stemref

    return stemref.load(tiny_root, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_reference(tiny_root):
    """(diffusers UNet, diffusers VAE, transformers CLIPTextModel) loaded by their own libraries from tiny_root, float64."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_root / "unet")
    vae = AutoencoderKL.from_pretrained(tiny_root / "vae")
    text = CLIPTextModel.from_pretrained(tiny_root / "text_encoder")
    return unet.double().eval(), vae.double().eval(), text.double().eval()


# A tiny CLIPModel (both towers, projections) in the transformers layout; odd widths and a 30x30 image of
# 6x6 patches keep every reshape honest.
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
TINY_CLIP_VISION = dict(hidden_size=24, intermediate_size=29, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                        patch_size=6, hidden_act="quick_gelu")


def tiny_clip_model(seed: int = 4):
    """A perturbed transformers CLIPModel; its logit scale moves too."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_CLIP_VISION, projection_dim=16)
    return perturb(CLIPModel(config), seed).eval()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP folder as transformers 5 saves it: config.json + model.safetensors, no vocabulary."""
    root = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip_model().save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_clip_reference(tiny_clip_dir):
    """transformers' CLIPModel loaded by transformers from tiny_clip_dir, float64."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir).double().eval()
