"""Editing with a one-shot tuned video UNet (Tune-A-Video, EI²; tuning.py makes the model).

    frames ─VAE─► x_0 ─DDIM inversion, tuned UNet, empty prompt, no guidance─► x_T
    x_T ─DDIM sampling, tuned UNet, target prompt, classifier-free guidance against ""─► edited frames

Both steps run the tuned model whole: its own self-attention (sparse-causal or FFAM), its temporal modules
and its frame-pooled GroupNorms. Tune-A-Video inverts with the empty prompt and samples with guidance 12.5
(its configs); the EI² paper says only "DDIM inversion" and guidance 7.5, so its inversion follows
Tune-A-Video. With inversion="stem", STEM's EM attention replaces the model's self-attention while
inverting (the temporal modules and pooled GroupNorms stay); sampling always uses the model's own.

Tune-A-Video inverts the latents of its last training batch (a posterior sample); stemref inverts the
posterior mean, as every other stemref editor does, so the inversion does not depend on the training run.

Dimension legend: F frames, h × w latent grid.
"""
from __future__ import annotations

import torch

from ..attention import RunInfo
from ..frames import check_finite
from ..inversion import NON_FINITE_HINT, Inversion, check_inversion, invert
from ..pipeline import StableDiffusion
from ..sampling import Progress, check_guidance, ddim_sample_loop, predict_noise

GUIDANCE = {"tune-a-video": 12.5, "ei2": 7.5}
INVERSIONS = ("model", "stem")


def invert_tuned(model: StableDiffusion, frames: torch.Tensor, steps: int = 50, inversion: str = "model",
                 seed: int = 0, progress: Progress | None = None, **stem_options) -> Inversion:
    """DDIM-invert `frames` (F, 3, H, W) with the tuned model (`Tuned.model(sd)`) and the empty prompt.

    inversion="model" uses the model's own self-attention (the methods' code); "stem" uses STEM's EM
    attention (`stem_options`: num_bases, iters, tau, scope, chunk; `seed` seeds its initial bases).
    """
    if inversion not in INVERSIONS:
        raise ValueError(f"inversion must be one of {', '.join(INVERSIONS)}, got {inversion!r}")
    if inversion == "model" and stem_options:
        raise ValueError(f"inversion='model' takes no STEM options; got {', '.join(stem_options)}")
    context = None if inversion == "model" else "stem"
    return invert(model, frames, "", steps, context=context, seed=seed, progress=progress, **stem_options)


@torch.no_grad()
def edit_latents(model: StableDiffusion, inversion: Inversion, prompt: str, guidance: float,
                 negative_prompt: str = "", progress: Progress | None = None) -> torch.Tensor:
    """Denoise the inversion's x_T towards `prompt` with the tuned model; returns the edited latents (F, 4, h, w)."""
    steps = len(check_inversion(inversion).timesteps)
    check_guidance(guidance)
    cond, uncond = model.encode_prompt([prompt, negative_prompt]).split(1)
    eps_fn = lambda x, t, i: predict_noise(model, x, t, cond, uncond, guidance, RunInfo(frames=x.shape[0], step=i))
    x = ddim_sample_loop(model.scheduler, inversion.x_T.to(model.device, model.dtype), eps_fn, steps,
                         progress=progress)
    check_finite(x, "the edited latents", NON_FINITE_HINT)
    return x


def edit(model: StableDiffusion, frames: torch.Tensor, prompt: str, method: str, *, guidance: float | None = None,
         steps: int = 50, inversion: str = "model", negative_prompt: str = "", seed: int = 0,
         progress: Progress | None = None, **stem_options) -> torch.Tensor:
    """Invert `frames` with the tuned `model` and sample `prompt`: edited frames (F, 3, H, W) in [0, 1].

    `guidance` defaults to the method's (GUIDANCE).
    """
    guidance = GUIDANCE[method] if guidance is None else guidance
    inverted = invert_tuned(model, frames, steps, inversion, seed, progress, **stem_options)
    return model.decode_latents(edit_latents(model, inverted, prompt, guidance, negative_prompt, progress))
