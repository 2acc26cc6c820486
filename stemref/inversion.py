"""DDIM inversion of a video under a chosen self-attention context, and the reconstruction that checks it.

    frames ─VAE─► x_0 ─inverse DDIM steps (UNet with the context processor)─► x_1 … x_T
    x_T ─DDIM steps with the same context and prompt─► x̂_0 ─VAE─► reconstructed frames

The context decides what each frame's self-attention sees: "1-frame" (itself), "2-frame" (the first and
the previous frame), "all-frame" (every frame) or "stem" (K bases estimated by EM from every frame).
All latents along the path are kept: TokenFlow and FateZero edit from them.

Dimension legend: S steps, F frames, h × w latent grid (H/8 × W/8).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attention import RunInfo
from .context import CONTEXTS, context_processor
from .files import atomic_path
from .pipeline import StableDiffusion, check_encodable
from .sampling import NoiseFn, Progress, ddim_inversion_loop, ddim_sample_loop, predict_noise

SELF_ATTENTION = r"attn1$"
FORMAT = "stemref.inversion/1"


@dataclass
class InversionSettings:
    prompt: str
    steps: int = 50
    context: str | None = "stem"  # None: the UNet's own self-attention (a tuned video UNet's)
    guidance: float = 1.0
    layers: str = SELF_ATTENTION  # regex over attention-layer names that get the context
    seed: int = 0  # seeds the EM's random initial bases
    options: dict = field(default_factory=dict)  # context options, e.g. num_bases, iters, tau, scope


@dataclass
class Inversion:
    """latents[0] are the encoded frames x_0; latents[i] the latents at timesteps[i - 1]; latents[-1] is x_T."""

    latents: torch.Tensor  # (S + 1, F, 4, h, w)
    timesteps: list[int]  # ascending, e.g. [1, 21, …, 981]
    settings: InversionSettings

    @property
    def x_T(self) -> torch.Tensor:
        return self.latents[-1]

    def at(self, t: int) -> torch.Tensor:
        """The latents at timestep t of the path (F, 4, h, w)."""
        if t not in self.timesteps:
            raise KeyError(f"timestep {t} is not on this {len(self.timesteps)}-step inversion path")
        return self.latents[1 + self.timesteps.index(t)]

    def save(self, path: str | Path) -> Path:
        """One .safetensors file: the latents, and the settings as JSON in its metadata."""
        path = Path(path)
        meta = {"format": FORMAT, "timesteps": self.timesteps, "settings": asdict(self.settings)}
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save the inversion to {path}: folder {path.parent} does not exist; "
                                    "create it first")
        with atomic_path(path) as tmp:
            save_file({"latents": self.latents.contiguous().cpu()}, tmp, metadata={"stemref": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Inversion":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no inversion file at {path}; make one with `python -m stemref.invert`")
        try:
            f = safe_open(str(path), framework="pt")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a stemref inversion file ({FORMAT}): not safetensors ({e})") from e
        with f:
            raw = (f.metadata() or {}).get("stemref")
            if raw is None or json.loads(raw).get("format") != FORMAT:
                raise ValueError(f"{path} is not a stemref inversion file ({FORMAT})")
            meta = json.loads(raw)
            return cls(f.get_tensor("latents"), meta["timesteps"], InversionSettings(**meta["settings"]))


def invert(sd: StableDiffusion, frames: torch.Tensor, prompt: str, steps: int = 50, context: str | None = "stem",
           guidance: float = 1.0, layers: str = SELF_ATTENTION, seed: int = 0, batch: int | None = None,
           progress: Progress | None = None, **options) -> Inversion:
    """DDIM-invert `frames` (F, 3, H, W) in [0, 1] under `context` in the layers matching `layers`.

    `guidance` 1 (the default, as STEM and TokenFlow invert) uses the prompt only. `batch` bounds memory for
    the 1-frame context by running that many frames per UNet call; the other contexts need every frame in
    one call. `options` go to the context (for "stem": num_bases, iters, tau, scope, chunk). context=None keeps
    the processors installed in the UNet (a tuned video UNet's own self-attention, edit/tuning.py).
    """
    check_encodable(frames)
    settings = InversionSettings(prompt, steps, context, guidance, layers, seed, options)
    _check_settings(settings, batch)
    # everything that can refuse the settings runs before the (slow) VAE encode
    timesteps = sd.scheduler.timesteps(steps).flip(0).tolist()  # ascending
    chooser, eps_fn = _chooser(sd, settings), _noise_fn(sd, settings, batch)
    x = sd.encode_frames(frames)
    with sd.unet.attention(chooser):
        path = ddim_inversion_loop(sd.scheduler, x, eps_fn, steps, progress)
    return Inversion(torch.stack(path), timesteps, settings)  # (S + 1, F, 4, h, w)


def reconstruct(sd: StableDiffusion, inversion: Inversion, batch: int | None = None,
                progress: Progress | None = None) -> torch.Tensor:
    """Denoise x_T back to frames (F, 3, H, W) with the inversion's prompt, guidance and context."""
    s = inversion.settings
    _check_settings(s, batch)
    with sd.unet.attention(_chooser(sd, s)):
        x = ddim_sample_loop(sd.scheduler, inversion.x_T.to(sd.device, sd.dtype), _noise_fn(sd, s, batch), s.steps,
                             progress=progress)
    return sd.decode_latents(x)


def _check_settings(s: InversionSettings, batch: int | None) -> None:
    if s.context is not None and s.context not in CONTEXTS:
        raise ValueError(f"unknown context {s.context!r}; choose one of {', '.join(CONTEXTS)}")
    if s.context is None and s.options:
        raise ValueError(f"context=None keeps the UNet's own self-attention and takes no options; got {', '.join(s.options)}")
    if batch is not None and s.context != "1-frame":
        raise ValueError(f"batch={batch} splits the video across UNet calls, which only the 1-frame context allows; "
                         f"the {s.context} context needs every frame in one call")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    try:
        re.compile(s.layers)
    except re.error as e:
        raise ValueError(f"layers={s.layers!r} is not a valid regular expression: {e}") from e


def _chooser(sd: StableDiffusion, s: InversionSettings):
    if s.context is None:
        return lambda name: None
    generator = torch.Generator(sd.device).manual_seed(s.seed)
    processor = context_processor(s.context, generator=generator, **s.options)
    pattern = re.compile(s.layers)
    chosen = [name for name in sd.unet.attention_layers if pattern.search(name)]
    if not chosen:
        raise ValueError(f"layers={s.layers!r} matches no attention layer (names look like "
                         "'up_blocks.1.attentions.0.transformer_blocks.0.attn1')")
    return lambda name: processor if name in chosen else None


def _noise_fn(sd: StableDiffusion, s: InversionSettings, batch: int | None) -> NoiseFn:
    """ε of the whole video per call, or of `batch` frames at a time (1-frame context only)."""
    cond = sd.encode_prompt(s.prompt)
    uncond = sd.encode_prompt("") if s.guidance != 1.0 else None

    def eps_fn(x: torch.Tensor, t: int, step: int) -> torch.Tensor:
        chunks = x.split(batch) if batch else [x]
        return torch.cat([predict_noise(sd, c, t, cond, uncond, s.guidance, RunInfo(frames=c.shape[0], step=step))
                          for c in chunks])
    return eps_fn
