"""stemref: a plain-PyTorch reference for zero-shot video editing on Stable Diffusion 1.5.

    sd = stemref.load("weights/sd15")                    # tokenizer, text encoder, VAE, UNet, DDIM
    image = stemref.txt2img(sd, "a watercolor fox")      # (1, 3, 512, 512) in [0, 1]
    inv = stemref.invert(sd, frames, "a mallard")        # STEM inversion of (F, 3, H, W) frames
    recon = stemref.reconstruct(sd, inv)
"""
from .attention import RunInfo
from .inversion import Inversion, invert, reconstruct
from .loading import WeightsError, load
from .pipeline import StableDiffusion
from .sampling import txt2img

__all__ = ["Inversion", "RunInfo", "StableDiffusion", "WeightsError", "invert", "load", "reconstruct", "txt2img"]
