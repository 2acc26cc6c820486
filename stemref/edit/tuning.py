"""One-shot tuning of an inflated UNet on one video: Tune-A-Video (Wu et al., ICCV 2023) and EI² (NeurIPS 2023).

    base UNet ─inflate─► video UNet (temporal modules, frame-pooled GroupNorms, method's self-attention)
    frames ─VAE─► posterior ─(each step: sample x_0, noise it to a random t)─► ε-MSE ─AdamW─► tuned tensors

The two methods differ in the model only:

  Tune-A-Video   self-attention: sparse-causal (frame 0 and the previous frame, context.SparseCausal)
                 temporal module after the feed-forward: LayerNorm + attention, output weight zeroed
  EI²            self-attention: FFAM (own frame fine, other frames pooled r×r, context.FineCoarse)
                 temporal module before the cross-attention: STAM (Instance Centering, spectrally
                 normalised value and output maps, zero output bias)

EI²'s options (METHODS) turn its model into the variants of the paper's ablations, one choice each:
temporal_norm and spectral_norm (Figure 4: LayerNorm with or without affine, none, InstanceNorm, Instance
Centering; with or without spectral normalisation), frame_attention (Figure 5: FFAM or sparse-causal, with
STAM), stam_position (Figure 6: FFAM → STAM → CA, FFAM → CA → STAM, or Tune-A-Video's slot after the
feed-forward), stam_heads, resnet_norm (ResNet GroupNorms pooled over frames or per frame). With
temporal_norm="layernorm", spectral_norm="off", frame_attention="sparse-causal" and stam_position="after-ff"
the initial model is Tune-A-Video's with a zero temporal bias.

Both tune the self- and cross-attention query maps and all of the temporal attention (`TUNED`); EI² also
tunes the temporal norm's affine when it has one. Everything else is frozen, holds no gradient and no
optimiser state. The training loop is Tune-A-Video's code (the EI² paper gives only AdamW, lr 3e-5, 500
steps): a fresh posterior sample of the clip's latents every step, one timestep per video shared by its
frames, i.i.d. noise per frame, ε-prediction MSE in fp32, AdamW (β 0.9/0.999, weight decay 1e-2, eps 1e-8)
at a constant learning rate, gradients clipped to norm 1.

The result, `Tuned`, holds only the tuned tensors plus what they depend on (method, options, the base
weights' identity, the training settings); `Tuned.unet(sd)` rebuilds the tuned model from the base bit for bit.

Dimension legend: F frames, h × w latent grid, L text tokens, D text width.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import Processor, RunInfo
from ..context import DOWNSAMPLE, FineCoarse, SparseCausal
from ..files import read_stemref_file, save_stemref_file
from ..pipeline import StableDiffusion, check_encodable
from ..sampling import check_seed
from ..temporal import (CENTRING, HEADS, NORMS, OUT_BIAS, POSITIONS, RESNET_NORMS, SPECTRAL_NORM, SpectralLinear,
                        VideoConfig, init_temporal_)
from ..unet import BasicTransformerBlock, UNet2DConditionModel
from .cache import weights_fingerprint

FORMAT = "stemref.tuned/1"
# The tensors tuning changes, by UNet checkpoint key: W_Q of self- and cross-attention and all of attn_temp (its
# parameters, and STAM's power-iteration vectors when spectral_norm="power"). EI² tunes "all parameters of
# STAMs" (Sec. 5), so also the temporal norm's scale and shift when it has them (temporal_norm="layernorm");
# Tune-A-Video's code leaves its LayerNorm at its initial identity affine.
TUNED = {"tune-a-video": re.compile(r"(attn1\.to_q\.weight|attn2\.to_q\.weight|attn_temp\..+)$"),
         "ei2": re.compile(r"(attn1\.to_q\.weight|attn2\.to_q\.weight|(attn|norm)_temp\..+)$")}
# Each method's options and their defaults (`python -m stemref.edit` exposes them as flags and TOML keys). EI²'s
# defaults are the paper's method; the other values are its ablations (Figures 4–6) and open choices.
METHODS = {
    "tune-a-video": {"temporal_bias": "random"},
    "ei2": {"temporal_norm": "centering", "stam_centring": "frames", "spectral_norm": "power", "stam_heads": "multi",
            "stam_position": "before-cross", "frame_attention": "ffam", "ffam_r": 2, "ffam_downsample": "avg",
            "resnet_norm": "video"},
}
# The values of the options that take a name
CHOICES = {"temporal_bias": OUT_BIAS, "temporal_norm": NORMS, "stam_centring": CENTRING,
           "spectral_norm": SPECTRAL_NORM, "stam_heads": HEADS, "stam_position": POSITIONS,
           "frame_attention": ("ffam", "sparse-causal"), "ffam_downsample": DOWNSAMPLE, "resnet_norm": RESNET_NORMS}
TuneProgress = Callable[[int, int, float], None]  # (steps done, steps in all, this step's loss)


@dataclass(frozen=True)
class TuneSettings:
    """Everything the training run depended on besides the frames, the method and the base weights."""

    prompt: str
    steps: int = 500
    lr: float = 3e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 33  # Tune-A-Video's seed: initial temporal weights, posterior samples, timesteps, noise
    checkpointing: bool = False
    autocast: str | None = None  # None (the model's dtype), "fp16" or "bf16" (CUDA, float32 master weights)


def method_options(method: str, options: dict) -> dict:
    """The method's options with defaults filled in; unknown methods, options and values are refused."""
    if method not in METHODS:
        raise ValueError(f"unknown tuning method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(METHODS[method]))
    if unknown:
        raise ValueError(f"method {method!r} takes the options {', '.join(METHODS[method])}; got {', '.join(unknown)}")
    o = {**METHODS[method], **options}
    for name, value in o.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(CHOICES[name])}; got {value!r}")
    video_config(method, o)  # refuses combinations that make no model
    return o


def video_config(method: str, options: dict) -> VideoConfig:
    """The inflation (temporal modules, their slot and options, the ResNets' norms) a method's model has."""
    o = {**METHODS[method], **options}
    if method == "tune-a-video":
        return VideoConfig(out_bias=o["temporal_bias"])
    return VideoConfig(norm=o["temporal_norm"], spectral_norm=o["spectral_norm"], position=o["stam_position"],
                       centring=o["stam_centring"], heads=o["stam_heads"], resnet_norm=o["resnet_norm"],
                       out_bias="zero")


def self_attention(method: str, options: dict) -> Processor:
    """The method's self-attention processor: sparse-causal (Tune-A-Video) or FFAM (EI², unless its
    frame_attention option asks for sparse-causal: Figure 5's SCA + STAM)."""
    o = method_options(method, options)
    if method == "tune-a-video" or o["frame_attention"] == "sparse-causal":
        return SparseCausal()
    return FineCoarse(o["ffam_r"], o["ffam_downsample"])


def inflate(unet: UNet2DConditionModel, method: str, options: dict | None = None, seed: int = 33,
            tensors: dict[str, torch.Tensor] | None = None) -> UNet2DConditionModel:
    """The method's video UNet on `unet`'s 2-D weights: the base tensors are *shared* with `unet` (no copy), the
    temporal modules fresh from `seed`, and every key in `tensors` taken from there (cast to unet's device and
    dtype; pass copies of tensors that will be trained).

    The method's self-attention processor is installed in every attn1 layer; all parameters are frozen.
    """
    if unet.video is not None:
        raise ValueError("inflate takes a 2-D UNet; this one is already a video UNet")
    options = method_options(method, options or {})
    video = video_config(method, options)
    with torch.device("meta"):
        model = UNet2DConditionModel(unet.config, video)
    device, dtype = unet.conv_in.weight.device, unet.conv_in.weight.dtype
    base = unet.state_dict()
    unknown = sorted(set(tensors or {}) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"tuned tensors {', '.join(unknown[:3])} do not exist in the {method} model")
    model.load_state_dict(base, strict=False, assign=True)  # the temporal modules stay on meta until drawn
    generator = torch.Generator().manual_seed(seed)
    for block in _temporal_blocks(model):
        block.norm_temp.to_empty(device="cpu")
        block.attn_temp.to_empty(device="cpu")
        init_temporal_(block.norm_temp, block.attn_temp, video, generator)
        block.norm_temp.to(device, dtype)
        block.attn_temp.to(device, dtype)
    if tensors:
        model.load_state_dict({k: v.to(device, dtype) for k, v in tensors.items()}, strict=False, assign=True)
    processor = self_attention(method, options)
    model.set_attention(lambda name: processor if name.endswith("attn1") else None)
    return model.eval().requires_grad_(False)


def _temporal_blocks(unet: UNet2DConditionModel) -> list[BasicTransformerBlock]:
    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock) and m.video is not None]


@dataclass
class Tuned:
    """The outcome of one-shot tuning: the tuned tensors and everything they depend on."""

    method: str
    options: dict
    tensors: dict[str, torch.Tensor]  # UNet checkpoint key -> tuned tensor
    base: str  # weights_fingerprint of the base model
    settings: TuneSettings
    losses: list[float] = field(default_factory=list)  # the training loss at each step
    path: str | None = field(default=None, compare=False)  # the file it was loaded from, for messages

    def unet(self, sd: StableDiffusion) -> UNet2DConditionModel:
        """The tuned video UNet on `sd`'s weights (which must be the base it was tuned on)."""
        identity = weights_fingerprint(sd)
        if identity != self.base:
            raise ValueError(f"{self.path or 'these tuned weights'}: tuned on other base weights (identity "
                             f"{self.base[:12]}…, this model is {identity[:12]}…); load the Stable Diffusion weights "
                             "they were tuned on, or tune again")
        self.check_tensors(sd)
        return inflate(sd.unet, self.method, self.options, self.settings.seed, self.tensors)

    def check_tensors(self, sd: StableDiffusion) -> None:
        """ValueError unless the tensors are exactly the ones tuning changes in `sd`'s video UNet, of their shapes:
        a missing tensor would silently run a different model."""
        expected = tuned_shapes(sd.unet, self.method, self.options)
        where = self.path or "these tuned weights"
        missing, unknown = sorted(set(expected) - set(self.tensors)), sorted(set(self.tensors) - set(expected))
        if unknown:
            raise ValueError(f"{where}: stemref tuned-weights file with tensors this model does not have "
                             f"({', '.join(unknown[:2])}…): tuned on another model; tune again")
        if missing:
            raise ValueError(f"{where}: damaged stemref tuned-weights file: {len(missing)} of its model's "
                             f"{len(expected)} tuned tensors are missing ({', '.join(missing[:2])}…); tune again")
        wrong = [k for k, shape in expected.items() if self.tensors[k].shape != shape]
        if wrong:
            raise ValueError(f"{where}: damaged stemref tuned-weights file: {wrong[0]} has shape "
                             f"{tuple(self.tensors[wrong[0]].shape)}, the model needs {tuple(expected[wrong[0]])}"
                             f"{f' ({len(wrong)} tensors in all)' if len(wrong) > 1 else ''}; tune again")

    def model(self, sd: StableDiffusion) -> StableDiffusion:
        """`sd` with its UNet replaced by the tuned video UNet (tokenizer, text encoder, VAE shared)."""
        return replace(sd, unet=self.unet(sd))

    def save(self, path: str | Path, cache: dict | None = None) -> Path:
        """One .safetensors file: only the tuned tensors; method, options, base identity and settings as metadata
        (with `cache`, a cache entry's identity: stemref.edit.cache)."""
        meta = {"format": FORMAT, "method": self.method, "options": self.options, "base": self.base,
                "settings": asdict(self.settings), "losses": self.losses,
                **({"cache": cache} if cache is not None else {})}
        return save_stemref_file(path, self.tensors, meta, "tuned-weights")

    @classmethod
    def load(cls, path: str | Path, sd: StableDiffusion | None = None) -> "Tuned":
        """Read a file written by `save`, checking every field and tensor (finite, floating, tuned keys); with
        `sd`, the base model, also that the tensors are exactly those its video UNet needs. ValueError names
        the file."""
        path = Path(path)
        meta, tensors = read_stemref_file(path, FORMAT, "tuned-weights", "make one with stemref.edit.tuning.tune")

        def bad(problem: str) -> ValueError:
            return ValueError(f"{path}: damaged stemref tuned-weights file: {problem}; tune again")

        try:
            tuned = cls(meta["method"], method_options(meta["method"], meta["options"]), tensors, meta["base"],
                        TuneSettings(**meta["settings"]), list(meta["losses"]), str(path))
        except (KeyError, TypeError, ValueError) as e:
            raise bad(repr(e)) from e
        missing = sorted(set(METHODS[tuned.method]) - set(meta["options"]))
        if missing:  # today's defaults could build another architecture than the one these tensors were tuned in
            raise ValueError(f"{path}: this tuned-weights file does not record the {tuned.method} option(s) "
                             f"{', '.join(missing)} (an earlier stemref wrote it); tune again")
        problem = _metadata_problem(tuned)
        if problem:
            raise bad(problem)
        if not tensors or not all(TUNED[tuned.method].search(k) for k in tensors):
            raise bad("unexpected tensors")
        for name, x in tensors.items():
            if not x.is_floating_point():
                raise bad(f"{name} is {x.dtype}, not floating point")
            if not torch.isfinite(x).all():
                raise bad(f"{name} holds {(~torch.isfinite(x)).sum().item()} NaN or infinite values")
        if sd is not None:
            tuned.check_tensors(sd)
        return tuned


def _metadata_problem(tuned: Tuned) -> str | None:
    """What is wrong with the types of a loaded file's settings, or None."""
    s = tuned.settings
    wrong = [name for name, value, kinds in (
        ("base", tuned.base, str), ("settings.prompt", s.prompt, str), ("settings.steps", s.steps, int),
        ("settings.lr", s.lr, (int, float)), ("settings.weight_decay", s.weight_decay, (int, float)),
        ("settings.max_grad_norm", s.max_grad_norm, (int, float)), ("settings.seed", s.seed, int),
        ("settings.checkpointing", s.checkpointing, bool), ("settings.autocast", s.autocast, (str, type(None))))
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool)]
    defaults = METHODS[tuned.method]
    wrong += [f"options.{name}" for name, value in tuned.options.items()
              if type(value) is not type(defaults[name])]
    wrong += ["losses"] * any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in tuned.losses)
    return f"{', '.join(wrong)} of the wrong type" if wrong else None


def tuned_shapes(unet: UNet2DConditionModel, method: str, options: dict) -> dict[str, torch.Size]:
    """The tensors tuning changes in `method`'s video UNet on `unet`, by checkpoint key, with their shapes."""
    with torch.device("meta"):
        model = UNet2DConditionModel(unet.config, video_config(method, options))
    return {k: v.shape for k, v in model.state_dict().items() if TUNED[method].search(k)}


def diffusion_loss(unet: UNet2DConditionModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor, scheduler, info: RunInfo) -> torch.Tensor:
    """ε-prediction MSE (in fp32, float64 for a float64 model) of one video x0 (F, 4, h, w) noised to timestep t
    (one for all frames)."""
    x_t = scheduler.add_noise(x0, noise, t)
    eps = unet(x_t, t, context, info)
    work = torch.promote_types(eps.dtype, torch.float32)
    return F.mse_loss(eps.to(work), noise.to(work))


class Trainer:
    """One tuning run's state: the video UNet (tuned tensors trainable, the rest frozen and shared with the
    base), AdamW over the tuned tensors only, the prompt embedding and fp16 loss scaling. `step` is one
    optimisation step on a given batch; `tune` feeds it fresh draws."""

    def __init__(self, sd: StableDiffusion, method: str, options: dict, settings: TuneSettings, frames: int):
        _check_settings(sd, settings)
        self.sd, self.settings = sd, settings
        self.pattern = TUNED[method]
        masters = {k: v.detach().clone() for k, v in sd.unet.state_dict().items() if self.pattern.search(k)}
        self.unet = inflate(sd.unet, method, options, settings.seed, masters)  # masters: the base stays untouched
        self.tuned = [p for name, p in self.unet.named_parameters() if self.pattern.search(name)]
        for p in self.tuned:
            p.requires_grad_(True)
        self.optimiser = torch.optim.AdamW(self.tuned, lr=settings.lr, betas=(0.9, 0.999),
                                           weight_decay=settings.weight_decay, eps=1e-8)
        self.context = sd.encode_prompt(settings.prompt).expand(frames, -1, -1)  # (F, L, D)
        self.info = RunInfo(frames=frames, checkpoint=settings.checkpointing)
        self.amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.autocast)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.spectral = [m for m in self.unet.modules() if isinstance(m, SpectralLinear)]

    def step(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> float:
        """One AdamW step on the ε-MSE of latents x0 (F, 4, h, w) noised by `noise` to timestep t (1,); the loss."""
        for layer in self.spectral:  # STAM's spectral-norm estimates follow the weights (Miyato: once per step)
            layer.power_iteration_()
        # entered only when asked: torch.autocast refuses device types it has no policy for, even disabled
        amp = torch.autocast(self.sd.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with amp:
            loss = diffusion_loss(self.unet, x0, noise, t, self.context, self.sd.scheduler, self.info)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimiser)
        torch.nn.utils.clip_grad_norm_(self.tuned, self.settings.max_grad_norm)
        self.scaler.step(self.optimiser)
        self.scaler.update()
        self.optimiser.zero_grad(set_to_none=True)
        return loss.item()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the tuned tensors, by UNet key."""
        return {k: v.detach().clone() for k, v in self.unet.state_dict().items() if self.pattern.search(k)}


def tune(sd: StableDiffusion, frames: torch.Tensor, prompt: str, method: str = "tune-a-video", *, steps: int = 500,
         lr: float = 3e-5, seed: int = 33, checkpointing: bool = False, autocast: str | None = None,
         progress: TuneProgress | None = None, **options) -> Tuned:
    """One-shot tuning of `method`'s video UNet on `frames` (F, 3, H, W) in [0, 1] captioned by `prompt`.

    `checkpointing` recomputes activations in the backward pass (less memory, ~1/3 more time). `autocast`
    "fp16"/"bf16" runs the UNet in that precision on CUDA with float32 master weights (the model must be
    loaded in float32); fp16 uses loss scaling. `options` are the method's (METHODS).
    """
    check_encodable(frames)
    check_seed(seed)
    options = method_options(method, options)
    settings = TuneSettings(prompt, steps, lr, seed=seed, checkpointing=checkpointing, autocast=autocast)
    trainer = Trainer(sd, method, options, settings, frames.shape[0])
    with torch.no_grad():
        posterior = sd.vae.encode(frames.to(sd.device, sd.dtype) * 2 - 1)
    generator = torch.Generator().manual_seed(seed)  # CPU draws: the same run on every device
    draw = lambda shape: torch.randn(shape, generator=generator, dtype=torch.float32).to(sd.device, sd.dtype)
    losses = []
    for step in range(steps):
        x0 = posterior.mean + posterior.std * draw(posterior.mean.shape)
        x0 = x0 * sd.vae.config.scaling_factor  # (F, 4, h, w)
        noise = draw(x0.shape)
        # t stays on the CPU: the schedule is looked up there and only ᾱ_t moves to the device (no device → host read)
        t = torch.randint(0, sd.scheduler.config.num_train_timesteps, (1,), generator=generator)
        losses.append(trainer.step(x0, noise, t))
        if progress:
            progress(step + 1, steps, losses[-1])
    return Tuned(method, options, trainer.tensors(), weights_fingerprint(sd), settings, losses)


def _check_settings(sd: StableDiffusion, s: TuneSettings) -> None:
    if isinstance(s.steps, bool) or not isinstance(s.steps, int) or s.steps < 1:
        raise ValueError(f"steps must be a positive number of training steps (500 is the papers'), got {s.steps!r}")
    if not isinstance(s.lr, (int, float)) or not 0 < s.lr < 1:
        raise ValueError(f"lr must be a learning rate between 0 and 1 (3e-5 is the papers'), got {s.lr!r}")
    sd.encode_prompt(s.prompt)  # an over-long prompt is refused before any work
    if sd.dtype == torch.float16:
        raise ValueError("tuning a float16 model: AdamW's eps (1e-8) and squared gradients underflow in float16 and "
                         "the weights turn NaN after one step; load the model in float32 (autocast='fp16' then runs "
                         "the UNet in float16 on CUDA) or in bfloat16")
    if s.autocast not in (None, "fp16", "bf16"):
        raise ValueError(f"autocast must be None, 'fp16' or 'bf16', got {s.autocast!r}")
    if s.autocast is not None and (sd.device.type != "cuda" or sd.dtype != torch.float32):
        raise ValueError(f"autocast={s.autocast!r} needs the model in float32 on a CUDA device (float32 master "
                         f"weights; this one is {sd.dtype} on {sd.device.type}); load it with dtype=torch.float32 "
                         "on cuda")
