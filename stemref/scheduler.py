"""DDIM sampling and DDIM inversion for Stable Diffusion 1.x (Song, Meng, Ermon, "Denoising Diffusion Implicit
Models", ICLR 2021).

The paper writes α_t for the cumulative product that SD's code (and this file) calls ᾱ_t = alphas_cumprod[t].

Dimension legend:
  B  batch (for video: frames), C latent channels, h x w latent size; x and eps may have any shape,
     as long as they match. `add_noise` also accepts one timestep per sample, t of shape (B,).
  T  num_train_timesteps (1000 for SD1.x); S the number of inference steps.

The forward process noises a clean latent x_0 to level t as (DDIM Eq. 4)
    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε,        ᾱ_t = alphas_cumprod[t].
One DDIM step moves a latent from level t to level t' using the UNet's ε prediction at t (DDIM Eq. 12):
    x̂_0  = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)                                  the "predicted x_0" (Eq. 9)
    x_t' = sqrt(ᾱ_t') x̂_0 + sqrt(1 - ᾱ_t' - σ²) ε + σ z,
    σ    = η sqrt((1 - ᾱ_t') / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_t'),    z ~ N(0, I)     (Eq. 16)
Sampling (`step`) runs it downwards, t' = t - T // S. Inversion (`inverse_step`) runs the same deterministic
(η = 0) map upwards, from t - T // S to t, reusing the ε predicted at t: the paper's encoding x_0 → x_T "by
the reverse of Eq. 14" (its Sec. 5.4), the ODE whose Euler step (Eq. 13) is this η = 0 update. The reuse of
ε is the approximation DDIM inversion makes, and it is why `step` undoes `inverse_step` exactly when both see
the same ε.

Schedule (SD1.x): "scaled_linear" betas, i.e. sqrt(β) evenly spaced from sqrt(0.00085) to sqrt(0.012), and
"leading" spacing with steps_offset 1: t = 0, T//S, 2·T//S, … shifted by 1, so 50 steps are 981, 961, …, 1.

Fidelity (where SD's code differs from the paper, kept on purpose):
- Below the lowest timestep the next level is ᾱ = alphas_cumprod[0] (SD1.x's set_alpha_to_one=False), not the
  paper's α_0 = 1; with set_alpha_to_one it is 1.
- Betas and alphas_cumprod are computed in float32. That is how diffusers builds them, and so these float32
  numbers are the schedule SD1.x checkpoints were sampled with in practice; computing them in float64 would
  shift every coefficient by ~1e-8 relative and lose bit-parity with diffusers.
- The update itself is evaluated in float64 when x is float64 (for exactness tests) and otherwise in float32
  even for fp16/bf16 latents (1 - ᾱ_t is ~1e-3 at small t, which fp16 resolves only to a few digits), then
  cast back; in the same order of operations as diffusers, so float32 results agree bit for bit.
"""
from __future__ import annotations

import numbers

import torch

from .config import DDIMConfig


class DDIMScheduler:
    """Stateless DDIM: the number of inference steps is an argument of every call, never stored."""

    def __init__(self, config: DDIMConfig = DDIMConfig()) -> None:
        self.config = config
        T = config.num_train_timesteps
        # float32 throughout, as diffusers does (see the module docstring): sqrt-space linspace, squared.
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        # The level below the lowest timestep: 1 (the clean latent) with set_alpha_to_one, else (SD1.x) alphas_cumprod[0].
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, steps: int) -> torch.LongTensor:
        """The S sampling timesteps, descending ("leading" spacing): e.g. [981, 961, ..., 1] for 50 steps."""
        stride = self._stride(steps)
        return torch.arange(int(steps) - 1, -1, -1, dtype=torch.long) * stride + self.config.steps_offset  # (S,)

    def alpha(self, t: int | torch.Tensor) -> torch.Tensor:
        """ᾱ_t as float32: alphas_cumprod[t] for t >= 0 and final_alpha_cumprod for t < 0 (the clean end)."""
        t = torch.as_tensor(t).to("cpu", torch.long)
        if (t >= self.config.num_train_timesteps).any():
            raise ValueError(f"timestep {t.max().item()} is beyond the schedule's {self.config.num_train_timesteps} "
                             f"trained timesteps; use timesteps below {self.config.num_train_timesteps}.")
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], self.final_alpha_cumprod)

    def step(self, eps: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor, steps: int, eta: float = 0.0,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise x from level t to t - T // steps with the ε predicted at t.

        eta = 0 is deterministic DDIM, eta = 1 is DDPM-like ancestral sampling. With eta > 0, σ·z is added,
        where z is `noise` if given, else drawn on x's device from `generator` (which must live there too).
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like); got {eta}.")
        t = int(t)
        dtype = _compute_dtype(x)
        a_t = self.alpha(t).to(dtype)
        a_prev = self.alpha(t - self._stride(steps)).to(dtype)
        sigma = eta * (((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)) ** 0.5  # DDIM Eq. 16
        x_prev = _ddim_move(x.to(dtype), eps.to(dtype), a_t, a_prev, sigma)
        if eta > 0:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
            x_prev = x_prev + sigma * noise.to(dtype)  # Eq. 12's "random noise" term σ_t ε_t
        return x_prev.to(x.dtype)

    def inverse_step(self, eps: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
        """Invert one DDIM step: x at level t - T // steps (the clean level when that is negative) to level t.

        eps is the UNet's prediction at t (STEM and DDIM inversion evaluate the UNet at the target timestep,
        on the latent of the level below). Looping over reversed(timesteps(steps)) inverts a whole sampling run.
        """
        t = int(t)
        dtype = _compute_dtype(x)
        a_prev = self.alpha(t - self._stride(steps)).to(dtype)
        a_t = self.alpha(t).to(dtype)
        # Eq. 12 with σ = 0, from ᾱ_prev up to ᾱ_t; not the exact inverse: ε is ε(x_prev, t), not ε(x_t, t)
        return _ddim_move(x.to(dtype), eps.to(dtype), a_prev, a_t, torch.zeros((), dtype=dtype)).to(x.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Forward process (DDIM Eq. 4): sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise; t is one timestep or one per sample."""
        dtype = _compute_dtype(x0)
        a_t = self.alpha(t).to(x0.device, dtype)
        a_t = a_t.reshape(a_t.shape + (1,) * (x0.dim() - a_t.dim()))  # (B, 1, ..., 1): broadcast over a sample
        return (a_t**0.5 * x0.to(dtype) + (1 - a_t) ** 0.5 * noise.to(dtype)).to(x0.dtype)

    def _stride(self, steps: int) -> int:
        """T // steps, after checking that `steps` gives valid timesteps."""
        T = self.config.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer from 1 to num_train_timesteps={T}; got {steps!r}.")
        stride = T // steps
        # With steps_offset 1, 1000 steps would ask for timestep 1000, one past the schedule's end.
        if (steps - 1) * stride + self.config.steps_offset >= T:
            raise ValueError(f"{steps} steps with steps_offset={self.config.steps_offset} reach timestep "
                             f"{(steps - 1) * stride + self.config.steps_offset}, past the last trained timestep "
                             f"{T - 1}; use fewer steps.")
        return stride


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 for exact checks; float32 otherwise, never fp16/bf16 (see the module docstring).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
    """The deterministic part of a DDIM update from level ᾱ_from to ᾱ_to (either direction): DDIM Eq. 12
    without its noise term.

    Evaluated in the same order as diffusers so that float32 results agree bit for bit.
    """
    x0_pred = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5  # "predicted x_0", Eq. 9
    return a_to**0.5 * x0_pred + (1 - a_to - sigma**2) ** 0.5 * eps  # + "direction pointing to x_t"
