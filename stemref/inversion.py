"""DDIM inversion of a video under a chosen self-attention context, and the reconstruction that checks it.

    frames ─VAE─► x_0 ─inverse DDIM steps (UNet with the context processor)─► x_1 … x_T
    x_T ─DDIM steps with the same context and prompt─► x̂_0 ─VAE─► reconstructed frames

Each inverse step is DDIM's deterministic update (Song et al., "Denoising Diffusion Implicit Models", Eq. 12
with σ = 0) run upwards, from level t − Δ to t, which encodes x_0 into x_T as the paper's Sec. 5.4 does by
reversing the ODE of its Eq. 14 (scheduler.inverse_step, sampling.ddim_inversion_loop):

    x̂_0 = (x_{t−Δ} − √(1 − ᾱ_{t−Δ}) ε) / √ᾱ_{t−Δ},    x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε,    ε = ε_θ(x_{t−Δ}, t, prompt)

ε is predicted at the target level t from the latent one level below. Undoing the sampling step from t
exactly would need ε_θ(x_t, t), from the very x_t being computed; using ε_θ(x_{t−Δ}, t) instead is DDIM
inversion's approximation, and the reason the reconstruction is close but not exact.

The context decides what each frame's self-attention sees: "1-frame" (itself), "2-frame" (the first and
the previous frame), "all-frame" (every frame) or "stem" (K bases estimated by EM from every frame).
All latents along the path are kept: TokenFlow and FateZero edit from them.

Fidelity (as STEM's official code): the inversion is guided by the source prompt alone (guidance 1), and the
reconstruction runs under the same context as the inversion (the EM attention too).

Several processes: with `group=` (a torch.distributed process group, e.g. torch.distributed.group.WORLD),
every process takes the same arguments (all frames, or only its own shard of them with `total=`), encodes
and inverts only its contiguous shard of the frames (distributed.py) and returns the Inversion of its shard
(`Inversion.shard` says which frames); the frame-context processors exchange what crosses shards, so each
shard's latents are those a single process computes for those frames. `Inversion.whole()` gathers the shards
(on every rank) for saving or editing in one process; `reconstruct` of a sharded Inversion returns the shard's
frames.

Dimension legend: S steps, F frames, h × w latent grid (H/8 × W/8).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import distributed
from .attention import Processor, Recorder, RunInfo
from .context import CONTEXTS, context_processor
from .distributed import Shard, shard_frames
from .files import read_stemref_file, save_stemref_file
from .frames import check_finite, non_finite_hint
from .pipeline import StableDiffusion, check_encodable
from .sampling import (NoiseFn, Progress, check_guidance, check_seed, ddim_inversion_loop, ddim_sample_loop,
                       predict_noise)

SELF_ATTENTION = r"attn1$"
FORMAT = "stemref.inversion/1"
Chooser = Callable[[str], Processor | None]  # attention-layer name -> its processor (None: keep the installed one)


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

    latents: torch.Tensor  # (S + 1, F, 4, h, w); with a shard, this rank's frames only
    timesteps: list[int]  # ascending, e.g. [1, 21, …, 981]
    settings: InversionSettings
    shard: Shard | None = field(default=None, compare=False, repr=False)  # the frames this process holds

    def whole(self) -> "Inversion":
        """Every process's frames in one Inversion, on every rank (a collective); itself when not sharded."""
        if self.shard is None:
            return self
        return Inversion(distributed.all_gather(self.latents, self.shard, dim=1), self.timesteps, self.settings)

    def local(self, group: dist.ProcessGroup | None) -> "Inversion":
        """This rank's shard of a whole Inversion over `group` (no communication); itself without a group."""
        if self.shard is not None:
            raise ValueError("this Inversion is already one process's shard; call whole() first to reshard it")
        shard = shard_frames(self.latents.shape[1], group)
        if shard is None:
            return self
        return Inversion(self.latents[:, shard.start:shard.stop], self.timesteps, self.settings, shard)

    def __post_init__(self):
        if not isinstance(self.latents, torch.Tensor) or not self.latents.is_floating_point():
            raise TypeError(f"Inversion latents must be a floating torch.Tensor, got {type(self.latents).__name__}")
        if self.latents.ndim != 5 or self.latents.shape[2] != 4 or self.latents.shape[0] != len(self.timesteps) + 1:
            raise ValueError(f"Inversion latents must be (S + 1, F, 4, h, w) for its S = {len(self.timesteps)} "
                             f"timesteps (SD1.x latents have 4 channels), got {tuple(self.latents.shape)}")

    @property
    def x_T(self) -> torch.Tensor:
        return self.latents[-1]

    def at(self, t: int) -> torch.Tensor:
        """The latents at timestep t of the path (F, 4, h, w)."""
        if t not in self.timesteps:
            raise KeyError(f"timestep {t} is not on this {len(self.timesteps)}-step inversion path")
        return self.latents[1 + self.timesteps.index(t)]

    def check_of(self, frames: torch.Tensor) -> "Inversion":
        """This inversion, after checking that its latents (S + 1, F, 4, H/8, W/8) fit `frames` (F, 3, H, W)."""
        F, _, H, W = frames.shape
        expected = (len(self.timesteps) + 1, F, 4, H // 8, W // 8)
        if tuple(self.latents.shape) != expected:
            raise ValueError(f"an inversion of latents {tuple(self.latents.shape)} is not one of {F} frames of "
                             f"{W}×{H}, which need latents {expected}")
        return self

    def save(self, path: str | Path, cache: dict | None = None) -> Path:
        """One .safetensors file: the latents, and the settings as JSON in its metadata (with `cache`, a cache
        entry's identity: stemref.edit.cache)."""
        if self.shard is not None:
            raise ValueError("this Inversion holds one process's frames; save inversion.whole() (from one rank)")
        meta = {"format": FORMAT, "timesteps": self.timesteps, "settings": asdict(self.settings),
                **({"cache": cache} if cache is not None else {})}
        return save_stemref_file(path, {"latents": self.latents}, meta, "inversion")

    @classmethod
    def load(cls, path: str | Path) -> "Inversion":
        """Read a file written by `save`; refuses, with ValueError, anything whose contents do not fit."""
        path = Path(path)
        meta, tensors = read_stemref_file(path, FORMAT, "inversion", "make one with `python -m stemref.invert`")
        if "latents" not in tensors:
            raise ValueError(f"{path} is not a stemref inversion file ({FORMAT}): it holds no latents")
        return _checked(tensors["latents"], meta, path)


def _checked(latents: torch.Tensor, meta: dict, path: Path) -> Inversion:
    """The Inversion the file describes, after checking every field that later code relies on."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: damaged stemref inversion file: {problem}; make it again with "
                          "`python -m stemref.invert`")

    timesteps, raw = meta.get("timesteps"), meta.get("settings")
    if not isinstance(timesteps, list) or not timesteps or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in timesteps):
        raise bad(f"timesteps must be a list of integers, got {timesteps!r:.80}")
    if timesteps != sorted(set(timesteps)) or timesteps[0] < 0:
        raise bad("timesteps must be distinct, ascending and non-negative")
    if latents.ndim != 5 or latents.shape[0] != len(timesteps) + 1 or latents.shape[2] != 4 \
            or not latents.is_floating_point():
        raise bad(f"latents of shape {tuple(latents.shape)} ({latents.dtype}) do not hold the "
                  f"{len(timesteps) + 1} floating (F, 4, h, w) latents its {len(timesteps)} timesteps need")
    if not torch.isfinite(latents).all():
        raise bad(f"its latents hold {(~torch.isfinite(latents)).sum().item()} NaN or infinite values of "
                  f"{latents.numel()}")
    names = {f.name for f in fields(InversionSettings)}
    if not isinstance(raw, dict) or not {"prompt"} <= set(raw) <= names:
        raise bad(f"settings must be an object with the keys {sorted(names)}, got {raw!r:.120}")
    settings = InversionSettings(**raw)
    types = {"prompt": str, "steps": int, "context": (str, type(None)), "guidance": (int, float), "layers": str,
             "seed": int, "options": dict}
    wrong = [name for name, kind in types.items()
             if not isinstance(getattr(settings, name), kind) or isinstance(getattr(settings, name), bool)]
    if wrong:
        raise bad(f"settings {', '.join(wrong)} have the wrong type")
    # the timesteps are the path the latents were computed on; settings.steps only repeats their count
    return Inversion(latents, timesteps, replace(settings, steps=len(timesteps)))


def check_inversion(inversion: object) -> Inversion:
    """What every editor checks first: an Inversion whose latents are all finite (NaN latents edit to NaN frames)."""
    if not isinstance(inversion, Inversion):
        raise TypeError(f"expected an Inversion (from stemref.invert or Inversion.load), got {type(inversion).__name__}")
    check_finite(inversion.latents, "the inversion's latents", "invert the video again (in fp32 if it was fp16)")
    return inversion


def invert(sd: StableDiffusion, frames: torch.Tensor, prompt: str, steps: int = 50, context: str | None = "stem",
           guidance: float = 1.0, layers: str = SELF_ATTENTION, seed: int = 0, batch: int | None = None,
           progress: Progress | None = None, vae_progress: Progress | None = None, recorder: Recorder | None = None,
           group: dist.ProcessGroup | None = None, total: int | None = None, **options) -> Inversion:
    """DDIM-invert `frames` (F, 3, H, W) in [0, 1] under `context` in the layers matching `layers`.

    `guidance` 1 (the default, as STEM and TokenFlow invert) uses the prompt only. `batch` bounds memory for
    the 1-frame context by running that many frames per UNet call; the other contexts need every frame in
    one call. `options` go to the context (for "stem": num_bases, iters, tau, scope, chunk, and the
    off-by-default warm_start_iters, all_frame_if_few_tokens, low_precision_products; see context.EMAttention).
    context=None keeps the processors installed in the UNet (a tuned video UNet's own self-attention,
    edit/tuning.py). `progress` follows the DDIM steps, `vae_progress` the frames through the VAE encoder.
    `recorder` (stemref.explain) is offered what every UNet call computes; it changes nothing in the result.
    `group`: share the work among the processes of a torch.distributed group (module docstring); every
    process passes all frames and gets back the Inversion of its shard. With `total` (the video's frame count),
    `frames` may instead be only this process's shard, the frames shard_frames(total, group) gives it: a
    process need not hold the others' frames.
    """
    settings = InversionSettings(prompt, steps, context, guidance, layers, seed, options)
    shard, local, timesteps, chooser, eps_fn = _prepare(sd, frames, settings, batch, group, recorder, total)
    x = sd.encode_frames(local, progress=vae_progress)  # x_0 of this process's frames
    with sd.unet.attention(chooser):  # the context's processor in the chosen self-attention layers
        path = ddim_inversion_loop(sd.scheduler, x, eps_fn, steps, progress)  # x_0, x_1, …, x_T
    latents = torch.stack(path)  # (S + 1, F, 4, h, w)
    check_finite(latents, "the inverted latents", non_finite_hint(sd.dtype))
    return Inversion(latents, timesteps, settings, shard)


def _prepare(sd: StableDiffusion, frames: torch.Tensor, s: InversionSettings, batch: int | None,
             group: dist.ProcessGroup | None, recorder: Recorder | None, total: int | None = None
             ) -> tuple[Shard | None, torch.Tensor, list[int], Chooser, NoiseFn]:
    """Check everything `invert` is given, before the (slow) VAE encode, and return what it runs with: this
    process's shard and its frames, the ascending timesteps, the layer-to-processor chooser and the noise
    predictor."""
    check_encodable(frames)
    _check_settings(s, batch)
    shard = shard_frames(frames.shape[0] if total is None else total, group)
    local = _local_frames(frames, shard, total)
    _check_shardable(s, shard)
    timesteps = sd.scheduler.timesteps(s.steps).flip(0).tolist()  # ascending
    video = (frames.shape[0] if shard is None else shard.total, *frames.shape[-2:])
    eps_fn, chooser = _noise_fn(sd, s, batch, recorder, shard), _chooser(sd, s, video)
    return shard, local, timesteps, chooser, eps_fn


def _local_frames(frames: torch.Tensor, shard: Shard | None, total: int | None) -> torch.Tensor:
    """This process's frames (n, 3, H, W): its shard of all F `frames`, or `frames` itself when it is that shard."""
    if total is None or frames.shape[0] == total:
        return frames if shard is None else frames[shard.start:shard.stop]
    if shard is None or frames.shape[0] != shard.count:
        mine = "" if shard is None else f", or this process's shard of them ({shard.count} frames)"
        raise ValueError(f"{frames.shape[0]} frames given with total={total}: pass all {total} frames{mine}")
    return frames


def reconstruct(sd: StableDiffusion, inversion: Inversion, batch: int | None = None,
                progress: Progress | None = None, vae_progress: Progress | None = None,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Denoise x_T back to frames (F, 3, H, W) with the inversion's prompt, guidance and context.

    `progress` follows the DDIM steps, `vae_progress` the frames through the VAE decoder. A sharded Inversion
    (from `invert(..., group=)`), or a whole one with `group`, is reconstructed by the processes together:
    each returns its shard's frames.
    """
    check_inversion(inversion)
    if group is not None and inversion.shard is None:
        inversion = inversion.local(group)
    s = inversion.settings
    _check_settings(s, batch)
    _check_shardable(s, inversion.shard)
    # the stored timesteps, not settings.steps, define the path (they agree for every file invert wrote)
    steps = len(inversion.timesteps)
    if sd.scheduler.timesteps(steps).flip(0).tolist() != inversion.timesteps:
        raise ValueError(f"the inversion's timesteps {inversion.timesteps[:3]}… are not this scheduler's "
                         f"{steps}-step DDIM path; reconstruct with the scheduler (weights) it was inverted with")
    with sd.unet.attention(_chooser(sd, s)):
        x = ddim_sample_loop(sd.scheduler, inversion.x_T.to(sd.device, sd.dtype),
                             _noise_fn(sd, s, batch, shard=inversion.shard), steps, progress=progress)
    check_finite(x, "the reconstructed latents", non_finite_hint(sd.dtype))
    return sd.decode_latents(x, progress=vae_progress)


@torch.no_grad()
def replay(sd: StableDiffusion, inversion: Inversion, steps: list[int], recorder: Recorder | None,
           batch: int | None = None) -> None:
    """Run the inversion's UNet calls of the given steps again, on its latents, offering them to `recorder`
    (None: plain calls, e.g. to time them).

    Call j saw latents[j] at timesteps[j]: the same inputs, so the same features; STEM draws its initial
    bases afresh, so its bases are an equally good draw, not the original one. For a reused (cached)
    inversion, whose run recorded nothing.
    """
    s = check_inversion(inversion).settings
    _check_settings(s, batch)
    eps_fn = _noise_fn(sd, s, batch, recorder, inversion.shard)
    with sd.unet.attention(_chooser(sd, s)):
        for j in steps:
            eps_fn(inversion.latents[j].to(sd.device, sd.dtype), inversion.timesteps[j], j)


def _check_settings(s: InversionSettings, batch: int | None) -> None:
    check_guidance(s.guidance)
    check_seed(s.seed)
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


def _check_shardable(s: InversionSettings, shard: Shard | None) -> None:
    """Refuse, before any work, the settings that cannot run across processes."""
    if shard is None:
        return
    if s.context is None:
        raise ValueError("context=None (a tuned video UNet's own attention) runs in one process: its temporal "
                         "layers see every frame; invert without a group")
    if s.context == "stem" and s.options.get("scope") is not None:
        raise ValueError(f"scope={s.options['scope']} is not supported across processes; use scope=None (the "
                         "paper's bases over the whole video) or one process")


def _chooser(sd: StableDiffusion, s: InversionSettings, video: tuple[int, int, int] | None = None) -> Chooser:
    """processor-for-layer-name for `sd.unet.attention`; with `video` (F, H, W), first checks that STEM can run
    on its frames.

    context None keeps every layer's installed processor (a tuned video UNet's own self-attention)."""
    if s.context is None:
        return lambda name: None
    pattern = re.compile(s.layers)
    chosen = [name for name in sd.unet.attention_layers if pattern.search(name)]
    if not chosen:
        raise ValueError(f"layers={s.layers!r} matches no attention layer (names look like "
                         "'up_blocks.1.attentions.0.transformer_blocks.0.attn1')")
    if s.context == "stem" and video is not None:
        _check_stem_tokens(sd, video, chosen)
    # a CPU generator, as txt2img, TokenFlow and tuning draw: the same seed gives the same bases on every device
    generator = torch.Generator().manual_seed(s.seed)
    processor = context_processor(s.context, generator=generator, **s.options)
    return lambda name: processor if name in chosen else None


def _check_stem_tokens(sd: StableDiffusion, video: tuple[int, int, int], layers: list[str]) -> None:
    """STEM's EM estimates the spread of the keys of all frames: each chosen layer needs at least 2 tokens."""
    levels = len(sd.unet.config.block_out_channels)
    halvings = max(levels - 1 if name.startswith("mid_block") else
                   int(name.split(".")[1]) if name.startswith("down_blocks") else levels - 1 - int(name.split(".")[1])
                   for name in layers)
    F, H, W = video
    h, w = (-(-(side // 8) // 2 ** halvings) for side in (H, W))  # ceil: strided convs round up
    if F * h * w < 2:
        raise ValueError(f"STEM needs at least 2 tokens in each attention layer it runs in, but {F} "
                         f"frame(s) of {W}×{H} give 1 in the smallest; use larger "
                         f"frames (at least {16 * 2 ** halvings} px on a side) or more frames")


def _noise_fn(sd: StableDiffusion, s: InversionSettings, batch: int | None, recorder: Recorder | None = None,
              shard: Shard | None = None) -> NoiseFn:
    """ε of the whole video (this rank's shard of it) per call, or of `batch` frames at a time (1-frame only)."""
    cond = sd.encode_prompt(s.prompt)
    uncond = sd.encode_prompt("") if s.guidance != 1.0 else None

    def eps_fn(x: torch.Tensor, t: int, step: int) -> torch.Tensor:
        chunks = x.split(batch) if batch else [x]
        return torch.cat([predict_noise(sd, c, t, cond, uncond, s.guidance,
                                        RunInfo(frames=c.shape[0], step=step, recorder=recorder, shard=shard))
                          for c in chunks])
    return eps_fn
