"""The DDIM loops (sampling and inversion), classifier-free guidance, and text-to-image.

The loops take any noise predictor `eps_fn(x, t, step)`, so the same code runs the UNet under any
attention context, and the tests can run them with closed-form predictors.

Dimension legend: B rows (branches × frames), F frames, L text tokens, D text width.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .attention import RunInfo
from .frames import check_finite
from .pipeline import StableDiffusion
from .scheduler import DDIMScheduler

Progress = Callable[[int, int], None]  # (steps done, steps in all)
NoiseFn = Callable[[torch.Tensor, int, int], torch.Tensor]  # (latents, timestep, step index) -> ε


def predict_noise(sd: StableDiffusion, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
                  guidance: float, info: RunInfo) -> torch.Tensor:
    """ε for latents x (F, 4, h, w); with guidance ≠ 1, unconditional and conditional rows run as one batch.

    `cond`/`uncond` are one prompt embedding (1, L, D), repeated over the F frames. The two branches are
    stacked branch-major ([uncond frames, cond frames]) so frame-context processors see whole videos.
    """
    frames = x.shape[0]
    if uncond is None or guidance == 1.0:
        return sd.unet(x, t, cond.expand(frames, -1, -1), info)
    context = torch.cat([uncond.expand(frames, -1, -1), cond.expand(frames, -1, -1)])  # (2F, L, D)
    eps_uncond, eps_cond = sd.unet(torch.cat([x, x]), t, context, info).chunk(2)  # (F, 4, h, w) each
    # classifier-free guidance (Ho & Salimans, 2022), in SD's form: w = 1 is the conditional prediction alone
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample_loop(scheduler: DDIMScheduler, x: torch.Tensor, eps_fn: NoiseFn, steps: int, eta: float = 0.0,
                     generator: torch.Generator | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Denoise x_T to x_0 along the DDIM timesteps (981, 961, …, 1 for 50 steps): DDIM Eq. 12 at each step."""
    timesteps = scheduler.timesteps(steps).tolist()
    for i, t in enumerate(timesteps):
        x = scheduler.step(eps_fn(x, t, i), t, x, steps, eta=eta, generator=generator)
        if progress:
            progress(i + 1, steps)
    return x


@torch.no_grad()
def ddim_inversion_loop(scheduler: DDIMScheduler, x: torch.Tensor, eps_fn: NoiseFn, steps: int,
                        progress: Progress | None = None) -> list[torch.Tensor]:
    """Run DDIM backwards from x_0 to x_T (timesteps 1, 21, …, 981); return every latent on the way, x_0 first.

    This is the DDIM paper's encoding "by the reverse of Eq. 14" (Sec. 5.4). Each step predicts ε at the *next*
    timestep from the current latent: the approximation ε(x_t, t) ≈ ε(x_{t-1}, t) that makes DDIM invertible,
    and the source of inversion error.
    """
    path = [x]
    for i, t in enumerate(scheduler.timesteps(steps).flip(0).tolist()):
        x = scheduler.inverse_step(eps_fn(x, t, i), t, x, steps)
        path.append(x)
        if progress:
            progress(i + 1, steps)
    return path


def check_size(size: object) -> tuple[int, int]:
    """(H, W) of an image size given as an int or (height, width), multiples of 8 and at least 64."""
    sides = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise ValueError(f"size must be an int or (height, width) of ints, such as 512 or (512, 768); got {size!r}")
    H, W = sides
    if H % 8 or W % 8 or min(H, W) < 64:
        raise ValueError(f"size {W}×{H}: both sides must be multiples of 8 and at least 64")
    return H, W


def check_guidance(guidance: object) -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (7.5 is usual, 1 turns it off), got {guidance!r}")


def txt2img(sd: StableDiffusion, prompt: str, negative_prompt: str = "", steps: int = 50, guidance: float = 7.5,
            seed: int = 0, size: int | tuple[int, int] = 512, progress: Progress | None = None) -> torch.Tensor:
    """One image (1, 3, H, W) in [0, 1] for `prompt`. `size` is an int or (height, width), multiples of 8.

    The starting noise is drawn on the CPU from `seed`, as diffusers does with a CPU generator, so the same
    seed gives the same image on every device.
    """
    H, W = check_size(size)
    check_guidance(guidance)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, sd.unet.config.in_channels, H // 8, W // 8), generator=generator)
    cond = sd.encode_prompt(prompt)
    uncond = sd.encode_prompt(negative_prompt) if guidance != 1.0 else None
    eps_fn = lambda x, t, i: predict_noise(sd, x, t, cond, uncond, guidance, RunInfo(frames=1, step=i))
    latents = ddim_sample_loop(sd.scheduler, noise.to(sd.device, sd.dtype), eps_fn, steps, progress=progress)
    check_finite(latents, "the generated latents", "half precision can overflow: try --dtype fp32 "
                 "(dtype=torch.float32), or a smaller guidance")
    return sd.decode_latents(latents)
