"""stemref: a plain-PyTorch reference for zero-shot video editing on Stable Diffusion 1.5."""
from .loading import WeightsError, load
from .pipeline import StableDiffusion
from .sampling import txt2img

__all__ = ["StableDiffusion", "WeightsError", "load", "txt2img"]
