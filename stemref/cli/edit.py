"""`python -m stemref.edit`: edit a video with a text prompt.

    python -m stemref.edit VIDEO --source "a mallard floats on the pond" --target "a white swan floats on the pond"
        OUT/edit-01-<target>.mp4   the edited video, one per --target (--target may repeat: one inversion, many edits)
        OUT/source.mp4             the source frames as edited (after frame selection, resize and crop)
        OUT/side_by_side.mp4       source | edit 1 | edit 2 …
        OUT/config.toml            every resolved setting; `--config OUT/config.toml` repeats the run exactly
        OUT/metrics.json           frame count, temporal consistency of the source and of each edit, timings

Settings come from, in rising priority: the defaults, `--config FILE.toml` (each option under its long name
with underscores, e.g. `pnp_attn = 0.5`; `target` is a list; relative paths are relative to the file) and
the command line.

The inversion (and any other costly preparation shared by all targets: the one-shot tuning of tune-a-video
and ei2) is cached under --cache, keyed by everything it depends on (the frames, prompt, steps, context and
its options, seed, weights, dtype; for tuning the method, its options, --tune-steps, --lr and precision): a
second edit of the same video skips it. Missing weights are downloaded into --weights first (~2 GB,
resumable, checksummed) unless --offline. Everything is written into a hidden folder that becomes OUT only
when the run succeeds.

Methods register here: each one names its options and two steps, `prepare` (cached, once per video) and
`edit` (once per target). The editors themselves are in stemref/edit/.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import (DTYPES, UserError, check_model_arguments, check_output_folder, check_prompt, check_steps, load_model,
               model_inputs, output_folder, progress_printer, run, warn, warn_if_large)
from .download import stderr_progress
from .measure import clock, consistency, peak_memory, reset_peak_memory, source_fps
from ..context import CONTEXTS
from ..download import DEFAULT_BASE_URL, DownloadError, download
from ..edit import fatezero, tokenflow, tuning
from ..edit import tuned as tuned_editing
from ..edit.cache import Cache, default_root, key_of, tensor_digest, weights_fingerprint
from ..inversion import FORMAT as INVERSION_FORMAT
from ..inversion import Inversion, invert
from ..clip_metrics import clip_metrics
from ..loading import DEFAULT_CLIP, WeightsError, load_clip
from ..pipeline import StableDiffusion
from ..video import read_video, side_by_side, write_video

DEFAULT_WEIGHTS = Path("weights/sd15")
SLUG_LENGTH = 40
LONG_RUN_FRAMES = 200  # warn above this many frames: hours of work on most machines


@dataclass(frozen=True)
class Option:
    """One setting: a command-line flag `--name-with-dashes` and a TOML key `name_with_underscores`."""

    name: str
    type: type  # str, int, float, bool, Path; `list` for repeatable strings
    default: Any
    help: str
    choices: tuple | None = None


@dataclass
class Job:
    """What a method's steps get: the model, the frames, the resolved settings and the command's reporting."""

    sd: StableDiffusion
    frames: torch.Tensor  # (F, 3, H, W) in [0, 1]
    settings: dict[str, Any]
    cache_root: Path | None
    timings: dict[str, float] = field(default_factory=dict)

    def progress(self, label: str, unit: str = "step") -> progress_printer:
        return progress_printer(label, unit)

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Method:
    summary: str
    options: tuple[Option, ...]
    prepare: Callable[[Job], Any]  # once per video (cached): e.g. the inversion
    edit: Callable[[Job, Any, str], torch.Tensor]  # once per target prompt: the edited frames (F, 3, H, W)
    negative: str = ""  # the unconditional prompt when --negative is not given
    inversion: str = "stem"  # the inversion context when --inversion is not given
    guidance: float = 7.5  # the guidance scale when --guidance is not given
    gpu_dtype: str = "fp16"  # the model precision on a GPU when --dtype is not given
    inversions: tuple[str, ...] = CONTEXTS  # the --inversion values it accepts


COMMON = (
    Option("video", Path, None, "video file (mp4, mov, webm, mkv, gif) or folder of images"),
    Option("source", str, None, "a caption of the source video (the inversion prompt)"),
    Option("target", list, None, "the edit: a caption of the video you want; repeat for several edits"),
    Option("method", str, "tokenflow", "editing method", None),  # choices filled in from METHODS
    Option("inversion", str, None, "self-attention context of the inversion (default: the method's; model = a "
           "tuned model's own self-attention)", (*CONTEXTS, "model")),
    Option("num_bases", int, 256, "STEM's K: bases per set (with --inversion stem)"),
    Option("scope", int, None, "frames per set of STEM bases (default: the whole video; 8 reproduces the official code)"),
    Option("frames", int, None, "how many frames to edit (default: all)"),
    Option("start", int, 0, "index of the first frame"),
    Option("stride", int, 1, "use every n-th frame"),
    Option("size", int, 512, "longer side in pixels, a multiple of 8 (ignored with --width/--height)"),
    Option("square", bool, False, "resize the shorter side to --size and crop a square"),
    Option("width", int, None, "resize to exactly this width (with --height; then cropped to a multiple of 8)"),
    Option("height", int, None, "resize to exactly this height (with --width)"),
    Option("steps", int, 50, "DDIM steps, for the inversion and the edit"),
    Option("guidance", float, None, "classifier-free guidance scale of the edit (default: the method's)"),
    Option("negative", str, None, "negative prompt of the edit (default: the method's)"),
    Option("seed", int, 1, "seeds every random choice (STEM's initial bases, keyframes, tuning's draws)"),
    Option("fps", float, None, "frame rate of the written videos (default: the input's, divided by --stride)"),
    Option("format", str, "mp4", "written videos: mp4 (H.264, plays everywhere) or mkv (lossless FFV1)", ("mp4", "mkv")),
    Option("weights", Path, DEFAULT_WEIGHTS, "SD1.5 diffusers folder or .safetensors file; downloaded here if missing"),
    Option("model_config", Path, None, "for a single .safetensors file of another size: a diffusers folder with "
           "its config.json files"),
    Option("offline", bool, False, "never download: fail with the download command when --weights is missing"),
    Option("hub_url", str, DEFAULT_BASE_URL, "Hugging Face hub (or mirror) to download missing weights from"),
    Option("device", str, "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, mps"),
    Option("dtype", str, None, "model precision (default: fp32 on CPU; on GPU fp16, fp32 for the tuned methods' "
           "master weights)", tuple(DTYPES)),
    Option("clip", Path, DEFAULT_CLIP, "CLIP folder (transformers layout) for the CLIP metrics in metrics.json; "
           "skipped with a note when absent"),
    Option("cache", Path, None, f"cache folder for inversions (default: {default_root()})"),
    Option("reuse", bool, True, "read and write the cache (--no-reuse: always recompute, store nothing)"),
    Option("out", Path, None, "output folder (default: out/<video name>, or the first out/<video name>-N not taken)"),
    Option("overwrite", bool, False, "replace --out if an earlier stemref run wrote it"),
)

TOKENFLOW = (
    Option("batch", int, 8, "TokenFlow: frames per batch (one keyframe each)"),
    Option("pnp_attn", float, 0.5, "TokenFlow: fraction of steps with self-attention q/k injection"),
    Option("pnp_conv", float, 0.8, "TokenFlow: fraction of steps with ResNet feature injection"),
    Option("freeu", bool, True, "FreeU with STEM's settings (b1 1.2, b2 1.4, s1 0.9, s2 0.2)"),
    Option("blend", str, "official", "TokenFlow: how a frame mixes two keyframes: the official sigmoid of distances "
           "to batch centres, or linear in the distances to the sampled keyframes", tokenflow.BLENDS),
)

# FateZero: one official p2p_config entry; its key in brackets
FATEZERO = (
    Option("cross_window", float, 0.8, "FateZero: fraction of the steps whose cross-attention maps are fused "
           "[cross_replace_steps]"),
    Option("word_window", list, None, "FateZero: WORD=FRACTION, a target word's own cross window; repeatable"),
    Option("self_window", float, 0.6, "FateZero: fraction of the steps whose self-attention maps are fused "
           "[self_replace_steps]"),
    Option("controller", str, "replace", "FateZero: replace (word swap; refine when the word counts differ) or "
           "refine (token alignment) [is_replace_controller]", ("replace", "refine")),
    Option("reweight", list, None, "FateZero: WORD=FACTOR, scale a target word's cross-attention [eq_params]; "
           "repeatable"),
    Option("blend_source", list, None, "FateZero: source words of the blend mask [blend_words[0]]; repeatable"),
    Option("blend_target", list, None, "FateZero: target words of latent blending [blend_words[1]]; repeatable"),
    Option("blend_self_attention", bool, False, "FateZero: keep the edit's self-attention inside the source words' "
           "mask"),
    Option("blend_latents", bool, False, "FateZero: reset the latents outside the source and target words' masks"),
    Option("blend_threshold", float, 0.3, "FateZero: blend mask threshold [blend_th]"),
    Option("fuse_all_layers", bool, False, "FateZero: fuse the 64² layers too (official: query length ≤ 1024)"),
    Option("fix_shift", bool, False, "FateZero: keep the word-swap mapper aligned after a word whose token count "
           "changes (corrects the official code)"),
    Option("strip_punctuation", bool, False, "FateZero: find words with punctuation attached (corrects the "
           "official code)"),
    Option("st_attention", str, "mid", "FateZero's spatial-temporal attention, with --inversion fatezero: the middle "
           "frame, or the previous and first frames", ("mid", "first+previous")),
    Option("min_channels", int, 640, "FateZero: narrowest layer that attends to the middle frame [least_sc_channel]"),
    Option("store_memory", int, 1024, "FateZero: MiB of attention store kept in memory; the rest goes to disk"),
    Option("store_dir", Path, None, "FateZero: folder for the spilled attention store (default: a temporary one)"),
)

TUNING = (
    Option("tune_steps", int, 500, "tune-a-video/ei2: one-shot tuning steps"),
    Option("lr", float, 3e-5, "tune-a-video/ei2: AdamW learning rate of the tuning"),
    Option("checkpointing", bool, True, "tune-a-video/ei2: gradient checkpointing while tuning (less memory, "
           "same result)"),
    Option("tune_precision", str, "fp16", "tune-a-video/ei2: autocast precision of the tuning on a GPU (fp32 "
           "master weights; ignored on CPU)", ("fp16", "bf16")),
)
TUNE_A_VIDEO = TUNING + (
    Option("temporal_bias", str, "random", "tune-a-video: initial output bias of the temporal attention: random "
           "(the official code's) or zero", ("random", "zero")),
)
EI2 = TUNING + (
    Option("stam_position", str, "before_cross", "ei2: STAM before the cross-attention (the paper) or after the "
           "feed-forward (Tune-A-Video's slot)", ("before_cross", "after_ff")),
    Option("stam_centring", str, "frames", "ei2: Instance Centering over the frames (Eq. 6) or over the channels",
           ("frames", "channels")),
    Option("spectral_norm", str, "power", "ei2: spectral normalisation by Miyato's power method or exact SVD",
           ("power", "exact")),
    Option("ffam_r", int, 2, "ei2: FFAM's downsampling factor of the other frames"),
    Option("ffam_downsample", str, "avg", "ei2: FFAM's downsampling: average r×r cells or keep every r-th token",
           ("avg", "stride")),
)


# ---------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------


def cached_inversion(job: Job, sd: StableDiffusion | None = None, prompt: str | None = None) -> Inversion:
    """The inversion of job.frames with the source prompt and the --inversion context, from the cache if there.

    `sd` and `prompt` replace job.sd and the source prompt: a tuned model inverts with the empty prompt.
    """
    s = job.settings
    sd = sd or job.sd
    prompt = s["source"] if prompt is None else prompt
    options = {"stem": {"num_bases": s["num_bases"], "scope": s["scope"]},
               "fatezero": {"mode": s["st_attention"], "min_channels": s["min_channels"]}}.get(s["inversion"], {})
    description = {"kind": "inversion", "format": INVERSION_FORMAT, "frames": tensor_digest(job.frames),
                   "prompt": prompt, "steps": s["steps"], "context": s["inversion"], "options": options,
                   "seed": s["seed"], "weights": weights_fingerprint(sd),
                   "dtype": str(sd.dtype)}
    cache, key = Cache(job.cache_root, "inversions"), key_of(description)
    found = cache.get(key, Inversion.load)
    if found is not None:
        job.say(f"inversion: reusing {cache.path(key)}")
        job.timings["inversion"] = 0.0
        return found
    started = clock(job.sd.device)
    context = None if s["inversion"] == "model" else s["inversion"]
    with job.progress("encoding frames", unit="frame") as encoding, job.progress(f"{s['inversion']} inversion") as report:
        inversion = invert(sd, job.frames, prompt, s["steps"], context, seed=s["seed"], progress=report,
                           vae_progress=encoding, **options)
    job.timings["inversion"] = clock(job.sd.device) - started
    if cache.put(key, inversion.save) is not None:
        job.say(f"inversion: cached as {cache.path(key)}")
    return inversion


def tokenflow_edit(job: Job, inversion: Inversion, target: str) -> torch.Tensor:
    s = job.settings
    with job.progress(f"TokenFlow: {_short(target)}") as report:
        latents = tokenflow.edit_latents(job.sd, inversion, target, negative_prompt=s["negative"],
                                         guidance=s["guidance"], batch=s["batch"], pnp_attn=s["pnp_attn"],
                                         pnp_conv=s["pnp_conv"], freeu=s["freeu"], seed=s["seed"], blend=s["blend"],
                                         progress=report)
    return decode(job, latents)


def fatezero_edit(job: Job, inversion: Inversion, target: str) -> torch.Tensor:
    s = job.settings
    with job.progress(f"FateZero: {_short(target)}") as report:
        latents = fatezero.edit_latents(job.sd, inversion, s["source"], target, guidance=s["guidance"],
                                        negative_prompt=s["negative"], memory_budget=s["store_memory"] * 2**20,
                                        store_dir=s["store_dir"], progress=report, **fatezero_settings(s))
    return decode(job, latents)


def fatezero_settings(s: dict[str, Any]) -> dict[str, Any]:
    """The FateZeroSettings fields from the command's flat settings (WORD=NUMBER lists become dicts)."""
    return dict(cross_window=s["cross_window"], word_windows=_word_numbers(s["word_window"], "word-window"),
                self_window=s["self_window"], controller=s["controller"],
                reweight=_word_numbers(s["reweight"], "reweight"),
                blend_words=(s["blend_source"] or [], s["blend_target"] or [])
                if s["blend_source"] or s["blend_target"] else None,
                blend_self_attention=s["blend_self_attention"], blend_latents=s["blend_latents"],
                blend_threshold=s["blend_threshold"], max_tokens=None if s["fuse_all_layers"] else 1024,
                fix_shift=s["fix_shift"], strip_punctuation=s["strip_punctuation"])


def _word_numbers(items: list[str] | None, flag: str) -> dict[str, float]:
    out = {}
    for item in items or []:
        word, _, number = item.rpartition("=")
        try:
            out[word] = float(number)
        except ValueError:
            word = ""
        if not word or not math.isfinite(out[word]):
            raise UserError(f"--{flag} {item!r}: write WORD=NUMBER, e.g. --{flag} watercolor=10")
    return out


def cached_tuning(job: Job) -> tuning.Tuned:
    """The one-shot tuning of --method on job.frames with the source prompt, from the cache if there."""
    s, sd = job.settings, job.sd
    method = s["method"]
    options = {name: s[name] for name in tuning.METHODS[method]}
    precision = s["tune_precision"] if sd.device.type == "cuda" else None
    # checkpointing is left out: it changes memory and time, not the result
    description = {"kind": "tuned", "format": tuning.FORMAT, "frames": tensor_digest(job.frames),
                   "prompt": s["source"], "method": method, "options": options, "steps": s["tune_steps"],
                   "lr": s["lr"], "seed": s["seed"], "precision": precision,
                   "weights": weights_fingerprint(sd), "dtype": str(sd.dtype)}
    cache, key = Cache(job.cache_root, "tuned"), key_of(description)
    found = cache.get(key, tuning.Tuned.load)
    if found is not None:
        job.say(f"tuning: reusing {cache.path(key)}")
        job.timings["tuning"] = 0.0
        return found
    started = clock(sd.device)
    with job.progress(f"{method} tuning") as report:
        def show(done: int, total: int, loss: float) -> None:
            report.label = f"{method} tuning (loss {loss:.4f})"
            report(done, total)
        result = tuning.tune(sd, job.frames, s["source"], method, steps=s["tune_steps"], lr=s["lr"], seed=s["seed"],
                             checkpointing=s["checkpointing"], autocast=precision, progress=show, **options)
    job.timings["tuning"] = clock(sd.device) - started
    if cache.put(key, result.save) is not None:
        job.say(f"tuning: cached as {cache.path(key)}")
    return result


def tuned_prepare(job: Job) -> tuple[StableDiffusion, Inversion]:
    """Tune (or reuse the tuning), then invert with the tuned model and the empty prompt."""
    model = cached_tuning(job).model(job.sd)
    return model, cached_inversion(job, model, prompt="")


def tuned_edit(job: Job, prepared: tuple[StableDiffusion, Inversion], target: str) -> torch.Tensor:
    s = job.settings
    model, inversion = prepared
    with job.progress(f"{s['method']}: {_short(target)}") as report:
        latents = tuned_editing.edit_latents(model, inversion, target, s["guidance"], s["negative"], report)
    return decode(job, latents)


def decode(job: Job, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode (F, 4, h, w) latents to frames (F, 3, H, W) on the CPU, with progress."""
    with job.progress("decoding", unit="frame") as report:
        return job.sd.decode_latents(latents, progress=report).cpu()


METHODS: dict[str, Method] = {
    "tokenflow": Method("TokenFlow (STEM's editor): PnP injection, keyframe attention, token propagation, FreeU",
                        TOKENFLOW, cached_inversion, tokenflow_edit, tokenflow.DEFAULT_NEGATIVE),
    "fatezero": Method("FateZero: inversion attention fused into the edit (prompt-to-prompt replace, refine, "
                       "reweight, blend masks)", FATEZERO, cached_inversion, fatezero_edit),
    "tune-a-video": Method("Tune-A-Video: one-shot tuning of an inflated UNet (sparse-causal and temporal attention), "
                           "DDIM inversion and guided sampling with the tuned model", TUNE_A_VIDEO, tuned_prepare,
                           tuned_edit, inversion="model", guidance=tuned_editing.GUIDANCE["tune-a-video"],
                           gpu_dtype="fp32", inversions=tuned_editing.INVERSIONS),
    "ei2": Method("EI²: Tune-A-Video with STAM (shift-restricted temporal attention) and FFAM (fine-coarse frame "
                  "attention)", EI2, tuned_prepare, tuned_edit, inversion="model",
                  guidance=tuned_editing.GUIDANCE["ei2"], gpu_dtype="fp32", inversions=tuned_editing.INVERSIONS),
}


# ---------------------------------------------------------------------------------------------------
# Settings: defaults < --config FILE.toml < command line
# ---------------------------------------------------------------------------------------------------


def all_options() -> tuple[Option, ...]:
    """Every option once (methods may share options, e.g. the two tuned methods' TUNING)."""
    options = {o.name: o for o in reversed(COMMON + tuple(o for m in METHODS.values() for o in m.options))}
    return tuple(reversed(options.values()))


def build_parser() -> argparse.ArgumentParser:
    epilog = "methods:\n" + "\n".join(f"  {name:<12} {m.summary}" for name, m in METHODS.items())
    parser = argparse.ArgumentParser(prog="python -m stemref.edit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=epilog + "\n\n" + __doc__.split("\n\n", 1)[1].split("\n\nSettings")[0])
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="TOML file of settings (e.g. an earlier run's config.toml); flags override it")
    for o in all_options():
        default = f" (default: {o.default})" if o.default is not None and o.type is not bool else ""
        kw = dict(default=argparse.SUPPRESS, help=o.help + default)
        if o.name == "video":  # argparse hands SUPPRESS to an optional positional's type: default None instead
            parser.add_argument("video", nargs="?", type=Path, default=None, help=kw["help"])
        elif o.type is bool:
            parser.add_argument(f"--{_flag(o.name)}", action=argparse.BooleanOptionalAction,
                                **{**kw, "help": o.help + f" (default: {'on' if o.default else 'off'})"})
        elif o.type is list:
            parser.add_argument(f"--{_flag(o.name)}", action="append", **kw)
        else:
            choices = tuple(METHODS) if o.name == "method" else o.choices
            parser.add_argument(f"--{_flag(o.name)}", type=o.type, choices=choices, **kw)
    return parser


def resolve_settings(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """Defaults, overridden by the TOML file, overridden by the flags given; checked."""
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if not (k == "video" and v is None)}
    settings = {o.name: o.default for o in all_options()}
    config = given.pop("config", None)
    if config is not None:
        settings.update(read_config(config))
    settings.update(given)
    method = METHODS.get(settings["method"])
    for name in ("inversion", "guidance"):
        if settings[name] is None and method is not None:
            settings[name] = getattr(method, name)
    check_settings(settings)
    if settings["negative"] is None:
        settings["negative"] = method.negative
    if settings["dtype"] is None:  # as load_model would choose, written down so a rerun elsewhere is the same
        settings["dtype"] = method.gpu_dtype if str(settings["device"]).startswith("cuda") else "fp32"
    if settings["out"] is None:
        settings["out"] = free_folder(Path("out") / (Path(settings["video"]).stem or "video"))
    return settings


def free_folder(base: Path) -> Path:
    """`base`, or the first of base-2, base-3, … that does not exist or is empty."""
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def read_config(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, type-checked against the option table."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path} is not valid TOML: {e}") from None
    options = {o.name: o for o in all_options()}
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in options:
            raise UserError(f"--config {path}: unknown setting {key!r}; the settings are the long options of "
                            "`python -m stemref.edit --help`, with underscores")
        settings[name] = _typed(options[name], value, path)
    return settings


def _typed(o: Option, value: Any, path: Path) -> Any:
    bad = UserError(f"--config {path}: {o.name} must be {_type_name(o)}, got {value!r}")
    if o.type is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return value
    if o.type is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if o.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if o.type is Path and isinstance(value, str):
        return path.parent / Path(value).expanduser()  # relative to the TOML file, not to where the command runs
    if not isinstance(value, o.type) or isinstance(value, bool):
        raise bad
    return value


def check_settings(s: dict[str, Any]) -> None:
    """Every refusal that needs no file read and no model: before minutes of loading."""
    for name, what in (("video", "a VIDEO (or `video = ...` in --config)"), ("source", "--source"),
                       ("target", "at least one --target")):
        if not s[name]:
            raise UserError(f"missing {what}; see python -m stemref.edit --help")
    if s["method"] not in METHODS:
        raise UserError(f"--method {s['method']}: choose one of {', '.join(METHODS)}")
    if s["inversion"] not in METHODS[s["method"]].inversions:
        raise UserError(f"--inversion {s['inversion']} does not go with --method {s['method']}; choose one of "
                        f"{', '.join(METHODS[s['method']].inversions)}")
    for o in all_options():
        if o.choices and s[o.name] is not None and s[o.name] not in o.choices:
            raise UserError(f"--{_flag(o.name)} {s[o.name]}: choose one of {', '.join(map(str, o.choices))}")
    for text, flag in [(s["source"], "--source"), *((t, "--target") for t in s["target"]),
                       *([(s["negative"], "--negative")] if s["negative"] else [])]:
        check_prompt(text, flag)
        if not text.strip() and flag != "--negative":
            raise UserError(f"{flag} is empty; describe the video in a few words")
    for name, low in (("steps", 1), ("stride", 1), ("start", 0), ("num_bases", 1), ("batch", 1), ("min_channels", 1),
                      ("store_memory", 0), ("tune_steps", 1), ("ffam_r", 1)):
        if s[name] < low:
            raise UserError(f"--{_flag(name)} must be at least {low}, got {s[name]}")
    for name in ("frames", "scope"):
        if s[name] is not None and s[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {s[name]}")
    if (s["width"] is None) != (s["height"] is None):
        raise UserError("--width and --height go together; give both, or use --size")
    if s["width"] is not None:
        if min(s["width"], s["height"]) < 64:
            raise UserError(f"--width {s['width']} --height {s['height']}: each must be at least 64 pixels")
        if s["square"]:
            raise UserError("--square crops to --size; it does not combine with --width/--height")
    elif s["size"] % 8 or s["size"] < 64:
        raise UserError(f"--size {s['size']}: use a multiple of 8 that is at least 64, such as 256 or 512")
    check_steps(s["steps"])
    for name in ("guidance", "pnp_attn", "pnp_conv", "cross_window", "self_window", "blend_threshold", "lr"):
        if not math.isfinite(s[name]):
            raise UserError(f"--{_flag(name)} must be a finite number, got {s[name]}")
    if not 0 < s["lr"] < 1:
        raise UserError(f"--lr {s['lr']}: a learning rate between 0 and 1 (3e-5 is the papers')")
    for name in ("pnp_attn", "pnp_conv", "cross_window", "self_window"):
        if not 0 <= s[name] <= 1:
            raise UserError(f"--{_flag(name)} is a fraction of the steps, from 0 to 1; got {s[name]}")
    if s["fps"] is not None and not 0 < s["fps"] <= 1000:
        raise UserError(f"--fps must be in (0, 1000], got {s['fps']}")
    if s["scope"] is not None and s["inversion"] != "stem":
        raise UserError("--scope is a STEM option; use it with --inversion stem")
    if s["method"] == "fatezero":
        check_fatezero(s)
    if not Path(s["video"]).exists():
        raise UserError(f"{s['video']}: no such video file or folder")


def check_fatezero(s: dict[str, Any]) -> None:
    """What FateZero's own settings refuse (word lists, blending without words), before the model loads."""
    try:
        fatezero.FateZeroSettings(**fatezero_settings(s))
    except ValueError as e:
        raise UserError(f"FateZero settings: {e}") from None
    if s["store_dir"] is not None and Path(s["store_dir"]).exists() and any(Path(s["store_dir"]).iterdir()):
        raise UserError(f"--store-dir {s['store_dir']} is not empty; name a new or empty folder")


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body():
        s = resolve_settings(parser, argv)
        method = METHODS[s["method"]]
        model_args = argparse.Namespace(weights=s["weights"], device=s["device"], dtype=s["dtype"],
                                        model_config=s["model_config"])
        inputs = [s["video"], *model_inputs(model_args), *([s["cache"]] if s["cache"] else [])]
        if s["width"] is not None:
            warn_if_large(max(s["width"], s["height"]), "--width/--height")
        else:
            warn_if_large(s["size"])
        check_output_folder(s["out"], s["overwrite"], inputs)
        ensure_weights(s)
        check_model_arguments(model_args)
        started = clock(torch.device("cpu"))
        with output_folder(s["out"], s["overwrite"], inputs) as tmp:
            frames = read_frames(s)
            if s["frames"] is not None and len(frames) < s["frames"]:
                warn(f"{s['video']} has only {len(frames)} frames from --start {s['start']} with --stride "
                     f"{s['stride']}; editing those {len(frames)} instead of --frames {s['frames']}")
            if len(frames) > LONG_RUN_FRAMES:
                warn(f"{len(frames)} frames: an edit takes roughly {len(frames)}× the time of one frame; "
                     "consider --frames or --stride")
            H, W = frames.shape[-2:]
            print(f"video: {len(frames)} frames of {W}×{H} from {s['video']}", file=sys.stderr, flush=True)
            with progress_printer("loading weights", unit="part") as report:
                sd = load_model(model_args, progress=report)
            sd.encode_prompt([s["source"], *s["target"], s["negative"]])  # refuse over-long prompts now
            reset_peak_memory(sd.device)
            job = Job(sd, frames, s, None if not s["reuse"] else s["cache"] or default_root())
            prepared = method.prepare(job)
            edits = []
            for target in s["target"]:
                t0 = clock(sd.device)
                edits.append(method.edit(job, prepared, target))
                job.timings.setdefault("edits", []).append(clock(sd.device) - t0)
            write_outputs(tmp, job, edits, started)
        print(f"wrote {s['out']}", file=sys.stderr)

    return run(body, failures=(DownloadError,))


def ensure_weights(s: dict[str, Any]) -> None:
    """Download SD1.5 into --weights when nothing is there (unless --offline)."""
    weights = Path(s["weights"]).expanduser()
    if weights.exists():
        return
    command = f"python -m stemref.download --to {weights}"
    if s["offline"]:
        raise UserError(f"no weights at {weights} and --offline forbids downloading; get them with `{command}`, "
                        "or point --weights at a diffusers SD1.5 folder or .safetensors file")
    if weights.suffix:
        raise UserError(f"no weights file at {weights}; give an existing .safetensors file, or a folder name to "
                        "download SD1.5 into")
    print(f"no weights at {weights}: downloading SD1.5 (fp16, about 2 GB) from {s['hub_url']} "
          "(resumable; --offline to refuse)", file=sys.stderr, flush=True)
    with progress_printer("download") as line:
        download(weights, base_url=s["hub_url"], progress=stderr_progress(line))


def read_frames(s: dict[str, Any]) -> torch.Tensor:
    resize = (s["height"], s["width"]) if s["width"] is not None else None
    size = None if resize else s["size"]
    with progress_printer("reading video", unit="frame") as report:
        return read_video(s["video"], s["start"], s["stride"], s["frames"], size, s["square"], resize=resize,
                          progress=report)


def write_outputs(folder: Path, job: Job, edits: list[torch.Tensor], started: float) -> None:
    s, sd, frames = job.settings, job.sd, job.frames
    fps = s["fps"] or source_fps(Path(s["video"]), s["stride"])
    suffix = "." + s["format"]
    names = [f"edit-{i + 1:02d}-{_slug(t)}{suffix}" for i, t in enumerate(s["target"])]
    with job.progress("writing videos", unit="file") as report:
        write_video(folder / f"source{suffix}", frames, fps)
        for i, (name, edited) in enumerate(zip(names, edits)):
            write_video(folder / name, edited, fps)
            report(i + 1, len(edits) + 1)
        write_video(folder / f"side_by_side{suffix}", side_by_side(frames, *edits), fps)
        report(len(edits) + 1, len(edits) + 1)
    (folder / "config.toml").write_text(to_toml(s))
    with job.progress("metrics", unit="video") as report:
        source_consistency = consistency(sd, frames, s["source"])
        report(1, len(edits) + 1)
        rows = []
        for i, (target, name, edited) in enumerate(zip(s["target"], names, edits)):
            rows.append({"target": target, "file": name, "consistency": consistency(sd, edited, target),
                         "seconds": job.timings["edits"][i]})
            report(i + 2, len(edits) + 1)
    scores = clip_scores(job, edits)
    if scores is not None:
        source_scores, *edit_scores = scores
        for row, score in zip(rows, edit_scores):
            row["clip"] = score
    peak, measure = peak_memory(sd.device)
    metrics = {
        "frames": len(frames), "size": list(frames.shape[-2:]), "fps": fps, "method": s["method"],
        "source": {"prompt": s["source"], "file": f"source{suffix}", "consistency": source_consistency,
                   **({"clip": source_scores} if scores is not None else {})},
        "edits": rows,
        "consistency_measure": "mean cosine similarity of consecutive frames' last-decoder-layer UNet features",
        "clip_measure": "clip_score: 100 × mean cosine of frame and prompt; frame_accuracy: share of frames closer "
                        "to the target than to the source prompt; clip_consistency: mean cosine of consecutive "
                        f"frames (CLIP at {s['clip']})" if scores is not None else None,
        "seconds": {"inversion": job.timings.get("inversion"), **({"tuning": job.timings["tuning"]}
                    if "tuning" in job.timings else {}), "total": clock(sd.device) - started},
        "peak_memory_bytes": peak, "peak_memory_measure": measure,
        "device": str(sd.device), "dtype": str(sd.dtype).removeprefix("torch."),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def clip_scores(job: Job, edits: list[torch.Tensor]) -> list[dict] | None:
    """CLIP metrics of the source and of each edit, or None (said once) when no CLIP weights are there."""
    s = job.settings
    try:
        clip = load_clip(s["clip"], device=job.sd.device)
    except WeightsError as e:
        job.say(f"note: CLIP metrics skipped: {e}")
        return None
    with job.progress("CLIP metrics", unit="video") as report:
        scores = [clip_metrics(clip, job.frames, s["source"])]
        report(1, len(edits) + 1)
        for i, (target, edited) in enumerate(zip(s["target"], edits)):
            scores.append(clip_metrics(clip, edited, target, source_prompt=s["source"]))
            report(i + 2, len(edits) + 1)
    return scores


def to_toml(s: dict[str, Any]) -> str:
    """Every resolved setting as TOML; paths absolute, None ("the default behaviour") left out, and where the
    outputs went (out, overwrite) too: a rerun with --config writes a new folder."""
    lines = ["# written by python -m stemref.edit; repeat the run with --config config.toml", ""]
    for o in all_options():
        value = s[o.name]
        if value is None or o.name in ("out", "overwrite"):
            continue
        if o.type is Path:
            value = Path(value).expanduser().absolute()
        lines.append(f"{o.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON's string escapes are valid TOML basic strings


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _type_name(o: Option) -> str:
    return {list: "a string or a list of strings", bool: "true or false", int: "an integer", float: "a number",
            str: "a string", Path: "a path (string)"}[o.type]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:SLUG_LENGTH].strip("-") or "edit"


def _short(text: str) -> str:
    return text if len(text) <= 30 else text[:29] + "…"


if __name__ == "__main__":
    sys.exit(main())
