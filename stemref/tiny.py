"""`tiny_model(seed)`: a tiny random-weight Stable Diffusion in the SD1.5 layout, built by stemref alone.

It has SD1.5's topology at small widths: a UNet of 4 levels with 2 ResNets per block, attention on the
first 3 levels and 8 heads; a 4-level VAE with 4 latent channels; a 2-layer CLIP text encoder with the
real 49,408-token vocabulary (the CLIP BPE shipped in stemref/data) and 77 positions; SD1.5's DDIM
schedule. Every code path of stemref runs on it in seconds on a CPU, with no download and no other
library, which is what the walkthrough (examples/walkthrough/) and most tests use. Its outputs mean
nothing: the weights are random.

Initialisation: torch's defaults for convolutions and linear layers, N(0, 0.02²) for the text encoder's
embeddings (as CLIP initialises them), then every parameter moves by 0.05·N(0, 1), so that no norm is a
unit scale and no bias is zero: a wrong wiring cannot hide behind an identity.
"""
from __future__ import annotations

import torch
from torch import nn

from .clip import CLIPTextModel
from .config import CLIPTextConfig, DDIMConfig, UNetConfig, VAEConfig
from .pipeline import StableDiffusion
from .scheduler import DDIMScheduler
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

TINY_UNET = UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, heads=8, cross_attention_dim=32,
                       norm_num_groups=8)
TINY_VAE = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=8)
TINY_TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
PERTURBATION = 0.05


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> StableDiffusion:
    """A tiny random-weight SD1.x (same seed, same weights on every machine); float64 for exact checks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the default initialisers draw from the global generator
        torch.manual_seed(seed)
        unet, vae, text = UNet2DConditionModel(TINY_UNET), AutoencoderKL(TINY_VAE), CLIPTextModel(TINY_TEXT)
    with torch.no_grad():
        for embedding in (m for m in text.modules() if isinstance(m, nn.Embedding)):
            embedding.weight.normal_(0.0, 0.02, generator=generator)
        for model in (unet, vae, text):
            for p in model.parameters():
                p.add_(PERTURBATION * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    unet, vae, text = (m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, text))
    return StableDiffusion(tokenizer=CLIPTokenizer.openai(), text_encoder=text, vae=vae, unet=unet,
                           scheduler=DDIMScheduler(DDIMConfig()))
