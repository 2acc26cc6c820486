"""The editing methods of `python -m stemref.edit`: each one's options and its two steps.

A method registers an `Option` table (flags and TOML keys), `prepare` (once per video, cached: the inversion,
or tuning then inversion) and `edit` (once per target prompt: the edited frames). The editors themselves are
in stemref/edit/; this module only maps the command's flat settings onto them.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .launch import Launch
from .progress import progress_printer, silent_printer
from .measure import clock
from .. import distributed
from ..context import CONTEXTS
from ..edit import fatezero, tokenflow, tuning
from ..edit import tuned as tuned_editing
from ..edit.cache import Cache, key_of, tensor_digest, weights_fingerprint
from ..edit.fatezero_plan import check_words
from ..edit.p2p import has_word
from ..inversion import FORMAT as INVERSION_FORMAT
from ..frames import check_finite, non_finite_hint
from ..explain import (Picture, fatezero_pictures, fatezero_recorders, inversion_pictures, inversion_recorder,
                       tokenflow_pictures, tokenflow_recorder, tuning_pictures)
from ..inversion import Inversion, invert, replay
from ..pipeline import StableDiffusion


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
    frames: torch.Tensor  # (F, 3, H, W) in [0, 1]; on ranks > 0 under torchrun only this rank's shard of them
    settings: dict[str, Any]
    cache_root: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    launch: Launch = Launch()  # several processes under torchrun: only rank 0 reports, caches and writes
    pictures: list[Picture] = field(default_factory=list)  # for index.html, each edit's named after it
    notes: list[str] = field(default_factory=list)  # for index.html: why a picture is missing
    total: int = 0  # F, the video's frame count: len(frames) unless frames is only this rank's shard
    frames_digest: str = ""  # tensor_digest of all F frames, the cache key's: rank 0's under torchrun

    def __post_init__(self):
        self.total = self.total or len(self.frames)
        if not self.frames_digest:
            if self.total != len(self.frames):
                raise ValueError("a Job of one rank's shard of the frames needs the digest of all frames")
            self.frames_digest = tensor_digest(self.frames)

    def explained(self, pictures: list[Picture], target: str | None = None) -> None:
        """Keep pictures for the report; an edit's get its target in the title and its number in the file name."""
        if target is not None:
            n = self.settings["target"].index(target) + 1
            pictures = [replace(p, name=f"edit-{n:02d}-{p.name}", title=f"Edit {n} ({_short(target)}): {p.title}")
                        for p in pictures]
        self.pictures.extend(pictures)

    def progress(self, label: str, unit: str = "step") -> progress_printer:
        return progress_printer(label, unit) if self.launch.main else silent_printer(label, unit)

    def say(self, message: str) -> None:
        if self.launch.main:
            print(message, file=sys.stderr, flush=True)

    def cached(self, label: str, folder: str, description: dict, load: Callable[[Path], Any],
               compute: Callable[[], Any]) -> Any:
        """The cache entry (under `folder`) for `description` if there is a sound one, else `compute()`, timed and
        stored with its `.save(path)`; `label` names it in messages and in the timings."""
        cache, key = Cache(self.cache_root, folder, notice=self.say), key_of(description)
        found = cache.get(key, description, load)
        if found is not None:
            self.say(f"{label}: reusing {cache.path(key)}")
            self.timings[label] = 0.0
            return found
        started = clock(self.sd.device)
        result = compute()
        self.timings[label] = clock(self.sd.device) - started
        if cache.put(key, description, result) is not None:
            self.say(f"{label}: cached as {cache.path(key)}")
        return result


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
    check: Callable[[dict], None] | None = None  # refuses bad settings of its own before any slow work


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
    Option("temporal_bias", str, tuning.METHODS["tune-a-video"]["temporal_bias"], "tune-a-video: initial output "
           "bias of the temporal attention: random (the official code's) or zero", tuning.CHOICES["temporal_bias"]),
)
EI2_DEFAULTS, CHOICES = tuning.METHODS["ei2"], tuning.CHOICES
EI2 = TUNING + (
    Option("temporal_norm", str, EI2_DEFAULTS["temporal_norm"], "ei2: STAM's norm (Figure 4): Instance Centering "
           "(the paper), LayerNorm with or without its learnt scale and shift (Tune-A-Video's), none, or "
           "InstanceNorm over the frames", CHOICES["temporal_norm"]),
    Option("stam_centring", str, EI2_DEFAULTS["stam_centring"], "ei2: Instance Centering over the frames (Eq. 6) "
           "or over each token's channels (a LayerNorm without rescaling); with --temporal-norm centering",
           CHOICES["stam_centring"]),
    Option("spectral_norm", str, EI2_DEFAULTS["spectral_norm"], "ei2: spectral normalisation of STAM's value and "
           "output maps by Miyato's power method, by exact SVD, or off (Figure 4; the output weight then starts at "
           "zero, as Tune-A-Video's)", CHOICES["spectral_norm"]),
    Option("stam_heads", str, EI2_DEFAULTS["stam_heads"], "ei2: STAM with the block's heads or a single head (the "
           "paper's variance analysis)", CHOICES["stam_heads"]),
    Option("stam_position", str, EI2_DEFAULTS["stam_position"], "ei2: STAM's slot (Figure 6): before-cross "
           "(FFAM → STAM → cross-attention, the paper), after-cross (FFAM → cross-attention → STAM), after-ff "
           "(after the feed-forward, Tune-A-Video's)", CHOICES["stam_position"]),
    Option("frame_attention", str, EI2_DEFAULTS["frame_attention"], "ei2: the self-attention (Figure 5): FFAM, or "
           "Tune-A-Video's sparse-causal attention (frame 0 and the previous frame)", CHOICES["frame_attention"]),
    Option("ffam_r", int, EI2_DEFAULTS["ffam_r"], "ei2: FFAM's downsampling factor of the other frames"),
    Option("ffam_downsample", str, EI2_DEFAULTS["ffam_downsample"], "ei2: FFAM's downsampling: average r×r cells "
           "or keep every r-th token", CHOICES["ffam_downsample"]),
    Option("resnet_norm", str, EI2_DEFAULTS["resnet_norm"], "ei2: the ResNets' GroupNorm statistics pooled over the "
           "frames of the video (Tune-A-Video's code) or per frame", CHOICES["resnet_norm"]),
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
    description = {"kind": "inversion", "format": INVERSION_FORMAT, "frames": job.frames_digest,
                   "prompt": prompt, "steps": s["steps"], "context": s["inversion"], "options": options,
                   "seed": s["seed"], "weights": weights_fingerprint(sd), "dtype": str(sd.dtype)}
    context = None if s["inversion"] == "model" else s["inversion"]
    group = job.launch.group
    recorder = inversion_recorder(sd.unet, s["steps"])

    def compute() -> Inversion:
        with job.progress("encoding frames", unit="frame") as encoding, \
                job.progress(f"{s['inversion']} inversion") as report:
            return invert(sd, job.frames, prompt, s["steps"], context, seed=s["seed"], progress=report,
                          vae_progress=encoding, group=group, total=job.total,
                          recorder=recorder if group is None else None, **options)
    load = lambda path: Inversion.load(path).check_of(job.frames)
    if group is not None:  # the pictures need every frame in one process: a sharded run draws none
        return _sharded_cached_inversion(job, description, load, compute)
    inversion = job.cached("inversion", "inversions", description, load, compute)
    if recorder.features is None and s["explain"]:  # reused from the cache: one inversion step again
        started = clock(sd.device)
        replay(sd, inversion, [recorder.feature_step], recorder)
        job.timings["explain"] = job.timings.get("explain", 0.0) + clock(sd.device) - started
    if recorder.features is None:
        note = "the inversion came from the cache, so its pictures are left out; --explain replays one step"
        job.say(f"note: {note}")
        job.notes.append(f"Note: {note}.")
    job.explained(inversion_pictures(recorder, s["num_bases"], s["inversion"]))
    return inversion


def _sharded_cached_inversion(job: Job, description: dict, load: Callable[[Path], Inversion],
                              compute: Callable[[], Inversion]) -> Inversion:
    """Job.cached for several processes: rank 0 looks the inversion up and tells the others; on a hit every rank
    reads the file (the cache folder must be the same on every machine) and keeps its shard; on a miss the ranks
    invert together, rank 0 gathers the shards and stores the whole inversion. Returns this rank's shard (the
    other ranks hold only their shard of the frames, and check only their shard of the file against it)."""
    launch, cache, key = job.launch, Cache(job.cache_root, "inversions", notice=job.say), key_of(description)
    found = cache.get(key, description, load) if launch.main else None
    hit = distributed.broadcast_object(None if found is None else str(cache.path(key)), launch.group)
    if hit is not None:
        job.say(f"inversion: reusing {hit}")
        job.timings["inversion"] = 0.0
        if launch.main:
            return found.local(launch.group)
        return Inversion.load(Path(hit)).local(launch.group).check_of(job.frames)
    started = clock(job.sd.device)
    inversion = compute()
    job.timings["inversion"] = clock(job.sd.device) - started
    whole = distributed.gather_to_first(inversion.latents.cpu(), launch.on_cpu(inversion.shard), dim=1)  # on rank 0
    if launch.main and cache.put(key, description, Inversion(whole, inversion.timesteps, inversion.settings)):
        job.say(f"inversion: cached as {cache.path(key)}")
    return inversion


def tokenflow_edit(job: Job, inversion: Inversion, target: str) -> torch.Tensor:
    s = job.settings
    recorder = tokenflow_recorder(job.sd.unet, s["steps"])
    with job.progress(f"TokenFlow: {_short(target)}") as report:
        latents = tokenflow.edit_latents(job.sd, inversion, target, negative_prompt=s["negative"],
                                         guidance=s["guidance"], batch=s["batch"], pnp_attn=s["pnp_attn"],
                                         pnp_conv=s["pnp_conv"], freeu=s["freeu"], seed=s["seed"], blend=s["blend"],
                                         progress=report, recorder=None if inversion.shard is not None else recorder)
    if inversion.shard is None:  # the pictures need every frame in one process
        job.explained(tokenflow_pictures(recorder, len(job.frames)), target)
    return decode(job, latents, inversion)


def fatezero_edit(job: Job, inversion: Inversion, target: str) -> torch.Tensor:
    s = job.settings
    store_dir, sharded = s["store_dir"], job.launch.group is not None
    if store_dir is not None and sharded:  # each rank spills its own frames' store
        store_dir = Path(store_dir) / f"rank{job.launch.rank}"
    source, edit = fatezero_recorders(job.sd.unet, job.sd.tokenizer, s["source"], target)
    # FateZero inverts again for each target (recording attention), so its count is 2 × --steps
    with job.progress(f"FateZero: {_short(target)} (inversion + edit)") as report:
        latents = fatezero.edit_latents(job.sd, inversion, s["source"], target, guidance=s["guidance"],
                                        negative_prompt=s["negative"], memory_budget=s["store_memory"] * 2**20,
                                        store_dir=store_dir, progress=report, recorder=None if sharded else edit,
                                        source_recorder=None if sharded else source, **fatezero_settings(s, target))
    if not sharded:  # the pictures need every frame in one process
        job.explained(fatezero_pictures(source, edit, job.sd.tokenizer, s["source"], target, job.frames), target)
    return decode(job, latents, inversion)


def fatezero_settings(s: dict[str, Any], target: str | None = None) -> dict[str, Any]:
    """The FateZeroSettings fields from the command's flat settings (WORD=NUMBER lists become dicts). With
    `target`, the target words (reweight, word windows, blend target) are those of that target prompt: one
    command edits towards several targets, and each word applies to the targets that have it."""
    def mine(words: dict | list) -> dict | list:
        if target is None:
            return words
        kept = [w for w in words if has_word(target, w, s["strip_punctuation"])]
        return {w: words[w] for w in kept} if isinstance(words, dict) else kept

    return dict(cross_window=s["cross_window"], word_windows=mine(_word_numbers(s["word_window"], "word-window")),
                self_window=s["self_window"], controller=s["controller"],
                reweight=mine(_word_numbers(s["reweight"], "reweight")),
                blend_words=(s["blend_source"] or [], mine(s["blend_target"] or []))
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


def check_fatezero(s: dict[str, Any]) -> None:
    """What FateZero's own settings refuse (word lists, blending without words), before the model loads; the
    checks that a flag can name come first."""
    for flag, words, prompts in (("reweight", _word_numbers(s["reweight"], "reweight"), s["target"]),
                                 ("word-window", _word_numbers(s["word_window"], "word-window"), s["target"]),
                                 ("blend-target", s["blend_target"] or [], s["target"]),
                                 ("blend-source", s["blend_source"] or [], [s["source"]])):
        for word in words:
            if not any(has_word(prompt, word, s["strip_punctuation"]) for prompt in prompts):
                which = "source" if flag == "blend-source" else "target"
                raise UserError(f"--{flag} {word}: {word!r} is not a word of the {which} prompt "
                                f"{' or '.join(map(repr, prompts))}; name a whole, space-separated word of it")
    for word, fraction in _word_numbers(s["word_window"], "word-window").items():
        if not 0 <= fraction <= 1:
            raise UserError(f"--word-window {word}={fraction:g}: a word's window is a fraction of the steps, from 0 "
                            "to 1")
    if s["blend_latents"] and not (s["blend_source"] or s["blend_target"]):
        raise UserError("--blend-latents resets the latents outside the blend words' masks; give the words with "
                        "--blend-source (and --blend-target), or leave out --blend-latents")
    try:
        fatezero.FateZeroSettings(**fatezero_settings(s))
        for target in s["target"]:
            check_words(fatezero.FateZeroSettings(**fatezero_settings(s, target)), s["source"], target)
    except ValueError as e:
        raise UserError(f"FateZero settings: {e}") from None
    if s["store_dir"] is not None and Path(s["store_dir"]).exists() and not Path(s["store_dir"]).is_dir():
        raise UserError(f"--store-dir {s['store_dir']} is a file; name a new or empty folder")
    if s["store_dir"] is not None and Path(s["store_dir"]).exists() and any(Path(s["store_dir"]).iterdir()):
        raise UserError(f"--store-dir {s['store_dir']} is not empty; name a new or empty folder")


def cached_tuning(job: Job) -> tuning.Tuned:
    """The one-shot tuning of --method on job.frames with the source prompt, from the cache if there."""
    s, sd = job.settings, job.sd
    method = s["method"]
    options = {name: s[name] for name in tuning.METHODS[method]}
    precision = s["tune_precision"] if sd.device.type == "cuda" else None
    # checkpointing is left out: it changes memory and time, not the result
    description = {"kind": "tuned", "format": tuning.FORMAT, "frames": job.frames_digest,
                   "prompt": s["source"], "method": method, "options": options, "steps": s["tune_steps"],
                   "lr": s["lr"], "seed": s["seed"], "precision": precision,
                   "weights": weights_fingerprint(sd), "dtype": str(sd.dtype)}

    def compute() -> tuning.Tuned:
        with job.progress(f"{method} tuning") as report:
            def show(done: int, total: int, loss: float) -> None:
                report.label = f"{method} tuning (loss {loss:.4f})"
                report(done, total)
            return tuning.tune(sd, job.frames, s["source"], method, steps=s["tune_steps"], lr=s["lr"],
                               seed=s["seed"], checkpointing=s["checkpointing"], autocast=precision, progress=show,
                               **options)
    return job.cached("tuning", "tuned", description, lambda path: tuning.Tuned.load(path, sd), compute)


def check_tuning(s: dict[str, Any]) -> None:
    """What the tuned method's options refuse together (e.g. --stam-centring without Instance Centering)."""
    try:
        tuning.method_options(s["method"], {name: s[name] for name in tuning.METHODS[s["method"]]})
    except ValueError as e:
        raise UserError(f"{s['method']} options: {e}") from None


def tuned_prepare(job: Job) -> tuple[StableDiffusion, Inversion]:
    """Tune (or reuse the tuning), then invert with the tuned model and the empty prompt."""
    tuned = cached_tuning(job)
    job.explained(tuning_pictures(tuned.losses, job.settings["method"]))
    model = tuned.model(job.sd)
    return model, cached_inversion(job, model, prompt="")


def tuned_edit(job: Job, prepared: tuple[StableDiffusion, Inversion], target: str) -> torch.Tensor:
    s = job.settings
    model, inversion = prepared
    with job.progress(f"{s['method']}: {_short(target)}") as report:
        latents = tuned_editing.edit_latents(model, inversion, target, s["guidance"], s["negative"], report)
    return decode(job, latents)


def decode(job: Job, latents: torch.Tensor, inversion: Inversion | None = None) -> torch.Tensor | None:
    """VAE-decode every method's edited latents (F, 4, h, w) to frames (F, 3, H, W) on the CPU, with progress;
    non-finite latents (fp16 overflow) are refused here, before anything is written. Of a sharded inversion's
    edit, each rank decodes its shard and rank 0 gets every frame (the others None)."""
    check_finite(latents, "the edited latents", non_finite_hint(job.sd.dtype))
    with job.progress("decoding", unit="frame") as report:
        frames = job.sd.decode_latents(latents, progress=report).cpu()
    shard = None if inversion is None else inversion.shard
    return frames if shard is None else distributed.gather_to_first(frames, job.launch.on_cpu(shard))


METHODS: dict[str, Method] = {
    "tokenflow": Method("TokenFlow (STEM's editor): PnP injection, keyframe attention, token propagation, FreeU",
                        TOKENFLOW, cached_inversion, tokenflow_edit, tokenflow.DEFAULT_NEGATIVE),
    "fatezero": Method("FateZero: inversion attention fused into the edit (prompt-to-prompt replace, refine, "
                       "reweight, blend masks)", FATEZERO, cached_inversion, fatezero_edit, check=check_fatezero),
    "tune-a-video": Method("Tune-A-Video: one-shot tuning of an inflated UNet (sparse-causal and temporal attention), "
                           "DDIM inversion and guided sampling with the tuned model", TUNE_A_VIDEO, tuned_prepare,
                           tuned_edit, inversion="model", guidance=tuned_editing.GUIDANCE["tune-a-video"],
                           gpu_dtype="fp32", inversions=tuned_editing.INVERSIONS, check=check_tuning),
    "ei2": Method("EI²: Tune-A-Video with STAM (shift-restricted temporal attention) and FFAM (fine-coarse frame "
                  "attention)", EI2, tuned_prepare, tuned_edit, inversion="model",
                  guidance=tuned_editing.GUIDANCE["ei2"], gpu_dtype="fp32", inversions=tuned_editing.INVERSIONS,
                  check=check_tuning),
}


def _short(text: str) -> str:
    return text if len(text) <= 30 else text[:29] + "…"
