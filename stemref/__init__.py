"""stemref: a plain-PyTorch reference for zero-shot video editing on Stable Diffusion 1.5."""
