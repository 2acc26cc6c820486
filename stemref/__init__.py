"""stemref: a plain-PyTorch reference for zero-shot video editing on Stable Diffusion 1.5.

    sd = stemref.load("weights/sd15")                    # tokenizer, text encoder, VAE, UNet, DDIM
    image = stemref.txt2img(sd, "a watercolor fox")      # (1, 3, 512, 512) in [0, 1]
    inv = stemref.invert(sd, frames, "a mallard")        # STEM inversion of (F, 3, H, W) frames
    recon = stemref.reconstruct(sd, inv)
    sd = stemref.tiny_model(seed=0)                      # tiny random weights in the SD1.5 layout
"""
from .attention import RunInfo
from .inversion import Inversion, invert, reconstruct
from .loading import WeightsError, load
from .pipeline import StableDiffusion
from .sampling import txt2img
from .tiny import tiny_model

__all__ = ["Inversion", "RunInfo", "StableDiffusion", "WeightsError", "invert", "load", "reconstruct", "tiny_model", "txt2img"]
