"""`python -m stemref.edit`: edit a video with a text prompt.

    python -m stemref.edit VIDEO --source "a mallard floats on the pond" --target "a white swan floats on the pond"
        OUT/edit-01-<target>.mp4   the edited video, one per --target (--target may repeat: one inversion, many edits)
        OUT/source.mp4             the source frames as edited (after frame selection, resize and crop)
        OUT/side_by_side.mp4       source | edit 1 | edit 2 …, each panel labelled
        OUT/config.toml            the resolved settings (common and the method's); `--config` repeats the run exactly
        OUT/metrics.json           frames, width, height, temporal consistency of the source and each edit, timings
        OUT/index.html             open in a browser: the videos, pictures of what the method did, metrics, settings

Settings come from, in rising priority: the defaults, `--config FILE.toml` (each option under its long name
with underscores, e.g. `pnp_attn = 0.5`; `target` is a list; relative paths are relative to the file) and
the command line.

The inversion (and any other costly preparation shared by all targets: the one-shot tuning of tune-a-video
and ei2) is cached under --cache, keyed by everything it depends on (the frames, prompt, steps, context and
its options, seed, weights, dtype; for tuning the method, its options, --tune-steps, --lr and precision): a
second edit of the same video skips it. Missing weights are downloaded into --weights first (~2 GB,
resumable, checksummed) unless --offline. Everything is written into a hidden folder that becomes OUT only
when the run succeeds.

Several processes: `torchrun --nproc-per-node N -m stemref.edit ...` (and torchrun's --nnodes/--rdzv-* flags for
several machines) shares the frames among N processes (NCCL on GPUs, each on cuda:LOCAL_RANK; gloo on the
CPU): the same files as one process, with `processes = N` in config.toml. Rank 0 reads and writes the cache
(which every rank must be able to read) and writes the output; tune-a-video and ei2 run in one process only.

The methods (their options, `prepare` and `edit` steps) are registered in edit_methods.py; the editors
themselves are in stemref/edit/. This module is the command (its settings are in edit_settings.py): parsing, checks, outputs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checks import check_cache_folder, check_free_space, check_num_bases, checked, warn_if_large
from .errors import ArgumentParser, UserError, run, warn
from .launch import Launch, SharedFrames, check_settings_agree, failed_ranks, finish, read_shared, start
from .model import check_model_arguments, load_model, model_inputs
from .output import PANEL_GAP, check_output_folder, output_folder
from .progress import progress_printer, silent_printer
from .download import stderr_progress
from .edit_methods import METHODS, Job
from .edit_settings import (COMMON, GEOMETRY, all_options, check_flags_apply, check_settings, free_folder, option_flag,
                            read_config, to_toml)
from .measure import SCORED, clock, consistency, peak_memory, reset_peak_memory, source_fps
from ..download import DownloadError, download, unfinished
from ..edit.cache import default_root
from ..clip_metrics import clip_metrics
from ..loading import WeightsError, load_clip
from ..report import Video, write_report
from ..video import read_video, side_by_side, write_video

SLUG_LENGTH = 40
LONG_RUN_FRAMES = 200  # warn above this many frames: hours of work on most machines
SINGLE_PROCESS_METHODS = ("tune-a-video", "ei2")  # one-shot tuning runs on one device (clips of ≤ 24 frames)



# ---------------------------------------------------------------------------------------------------
# Settings: defaults < --config FILE.toml < command line
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    epilog = "methods:\n" + "\n".join(f"  {name:<12} {m.summary}" for name, m in METHODS.items())
    parser = ArgumentParser(prog="python -m stemref.edit", description=__doc__.split("\n\n")[0],
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
            parser.add_argument(f"--{option_flag(o.name)}", action=argparse.BooleanOptionalAction,
                                **{**kw, "help": o.help + f" (default: {'on' if o.default else 'off'})"})
        elif o.type is list:
            parser.add_argument(f"--{option_flag(o.name)}", action="append", **kw)
        else:
            choices = tuple(METHODS) if o.name == "method" else o.choices
            parser.add_argument(f"--{option_flag(o.name)}", type=o.type, choices=choices, **kw)
    return parser


def resolve_settings(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """Defaults, overridden by the TOML file, overridden by the flags given; checked."""
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if not (k == "video" and v is None)}
    defaults = {o.name: o.default for o in all_options()}
    settings = dict(defaults)
    config = given.pop("config", None)
    if config is not None:
        settings.update(read_config(config))
        # a flag's way of setting the size replaces the file's other way; --no-square chooses no way (it holds
        # for --width/--height too)
        chosen = {name for name in given if name != "square" or given["square"]}
        for way, other in GEOMETRY:
            if way & chosen and not other & chosen:
                settings.update({name: defaults[name] for name in other})
    settings.update(given)
    settings["config"] = config  # not a setting (to_toml leaves it out): an input that --out must not hold
    method = METHODS.get(settings["method"])
    for name in ("inversion", "guidance"):
        if settings[name] is None and method is not None:
            settings[name] = getattr(method, name)
    check_settings(settings)
    check_flags_apply(set(given), settings)
    if settings["negative"] is None:
        settings["negative"] = method.negative
    if settings["dtype"] is None:  # as load_model would choose, written down so a rerun elsewhere is the same
        settings["dtype"] = method.gpu_dtype if str(settings["device"]).startswith("cuda") else "fp32"
    if settings["out"] is None:
        settings["out"] = free_folder(Path("out") / (Path(settings["video"]).stem or "video"))
    return settings


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


class ProcessFailure(Exception):
    """Another process of a torchrun run failed or was killed (exit 1)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    launch = Launch()

    def body():
        nonlocal launch
        s = resolve_settings(parser, argv)
        launch, device = start(s["device"], s["timeout"])
        try:
            edit_video(s, launch, device)
        except dist.DistError as e:
            raise ProcessFailure(failed_ranks(launch) if launch.group is not None else str(e)) from None

    try:
        return run(body, failures=(DownloadError, ProcessFailure))
    finally:
        finish(launch)


def edit_video(s: dict[str, Any], launch: Launch, device: str) -> None:
    """The command's work, in one process or as one rank of several under torchrun (only rank 0 writes)."""
    # the output folder is rank 0's alone; every other setting must be the same on every rank
    check_settings_agree(launch, {k: v for k, v in s.items() if k not in ("out", "overwrite")})
    if launch.group is not None and s["method"] in SINGLE_PROCESS_METHODS:
        raise UserError(f"--method {s['method']} tunes a model on one device (clips of at most 24 frames); run it "
                        "without torchrun")
    method = METHODS[s["method"]]
    model_args = argparse.Namespace(weights=s["weights"], device=device, dtype=s["dtype"],
                                    model_config=s["model_config"])
    inputs = run_inputs(s, model_args)
    cache_root = (s["cache"] or default_root()) if s["reuse"] else None
    if launch.main:
        if s["width"] is not None:
            warn_if_large(max(s["width"], s["height"]), "--width/--height")
        else:
            warn_if_large(s["size"])
        check_output_folder(s["out"], s["overwrite"], inputs)
        if cache_root is not None:
            check_cache_folder(cache_root)
        ensure_weights(s)
    launch.barrier()  # the other ranks use the weights rank 0 may have just downloaded
    check_model_arguments(model_args)
    started = clock(torch.device("cpu"))
    with output_folder(s["out"], s["overwrite"], inputs) if launch.main else nullcontext() as tmp:
        video = read_frames(s, launch)  # on ranks > 0 only their shard
        frames, F, (H, W) = video.frames, video.total, video.frames.shape[-2:]
        if launch.main:
            if s["frames"] is not None and F < s["frames"]:
                warn(f"{s['video']} has only {F} frames from --start {s['start']} with --stride "
                     f"{s['stride']}; editing those {F} instead of --frames {s['frames']}")
            if F > LONG_RUN_FRAMES * launch.size:
                warn(f"{F} frames: an edit takes roughly {F}× the time of one frame; "
                     "consider --frames or --stride")
            print(f"video: {F} frames of {W}×{H} from {s['video']}"
                  + (f", shared by {launch.size} processes" if launch.group is not None else ""),
                  file=sys.stderr, flush=True)
        if s["inversion"] == "stem":
            check_num_bases(s["num_bases"], F, H, W, s["scope"])
        if cache_root is not None and launch.main:  # the inversion's latents x_0 … x_T in float32, at most
            check_free_space(cache_root, (s["steps"] + 1) * F * 4 * (H // 8) * (W // 8) * 4,
                             "this run's inversion")
        job = Job(None, frames, s, cache_root, launch=launch, total=F, frames_digest=video.digest)
        with job.progress("loading weights", unit="part") as report:
            job.sd = sd = load_model(model_args, progress=report)
        for text, flag in [(s["source"], "--source"), *((t, "--target") for t in s["target"]),
                           (s["negative"], "--negative")]:  # refuse over-long prompts now, naming the flag
            checked(flag, sd.tokenizer.refuse_long, [text])
        reset_peak_memory(sd.device)
        prepared = method.prepare(job)
        edits = []
        for target in s["target"]:
            t0 = clock(sd.device)
            edits.append(method.edit(job, prepared, target))
            job.timings.setdefault("edits", []).append(clock(sd.device) - t0)
        if launch.main:
            write_outputs(tmp, job, edits, started)
    launch.barrier()  # the other ranks end when rank 0's output folder is in place
    if launch.main:
        print(f"wrote {s['out']}", file=sys.stderr)


def run_inputs(s: dict[str, Any], model_args: argparse.Namespace) -> list[Path]:
    """Every path the run reads (or keeps for later runs): --overwrite must never delete one of them."""
    cache = [s["cache"] or default_root()] if s["reuse"] else []
    return [s["video"], *model_inputs(model_args), *cache, s["clip"],
            *(Path(s[name]) for name in ("config", "store_dir") if s.get(name) is not None)]


def ensure_weights(s: dict[str, Any]) -> None:
    """Download SD1.5 into --weights when nothing is there, or finish an unfinished download (unless --offline)."""
    weights = Path(s["weights"]).expanduser()
    resume = unfinished(weights)
    if weights.exists() and not resume:
        return
    command = f"python -m stemref.download --to {weights}"
    if s["offline"]:
        if resume:
            raise UserError(f"{weights} holds an unfinished download and --offline forbids downloading; run "
                            f"without --offline to finish it, or `{command}`")
        raise UserError(f"no weights at {weights} and --offline forbids downloading; get them with `{command}`, "
                        "or point --weights at a diffusers SD1.5 folder or .safetensors file")
    if weights.suffix and not resume:
        raise UserError(f"no weights file at {weights}; give an existing .safetensors file, or a folder name to "
                        "download SD1.5 into")
    what = f"{weights} holds an unfinished download: finishing" if resume else f"no weights at {weights}: downloading"
    print(f"{what} SD1.5 (fp16, about 2 GB) from {s['hub_url']} (resumable; --offline to refuse)",
          file=sys.stderr, flush=True)
    with progress_printer("download") as line:
        download(weights, base_url=s["hub_url"], progress=stderr_progress(line))


def read_frames(s: dict[str, Any], launch: Launch = Launch()) -> SharedFrames:
    """The selected frames: all of them in one process and on rank 0, only the rank's shard on the others."""
    resize = (s["height"], s["width"]) if s["width"] is not None else None
    size = None if resize else s["size"]

    def read(start: int, count: int | None) -> torch.Tensor:
        with (progress_printer if launch.main else silent_printer)("reading video", unit="frame") as report:
            return read_video(s["video"], start, s["stride"], count, size, s["square"], resize=resize,
                              progress=report)
    return read_shared(launch, read, s["start"], s["stride"], s["frames"])


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
        labels = ["source", *(f"edit {i + 1}: {target}" for i, target in enumerate(s["target"]))]
        together = side_by_side(frames, *edits, labels=labels, gap=PANEL_GAP)
        write_video(folder / f"side_by_side{suffix}", together, fps)
        report(len(edits) + 1, len(edits) + 1)
    (folder / "config.toml").write_text(to_toml(s) + f"processes = {job.launch.size}\n", encoding="utf-8")
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
        "frames": len(frames), "width": frames.shape[-1], "height": frames.shape[-2], "fps": fps,
        "method": s["method"],
        "scored": SCORED,
        "source": {"prompt": s["source"], "file": f"source{suffix}", "consistency": source_consistency,
                   **({"clip": source_scores} if scores is not None else {})},
        "edits": rows,
        "consistency_measure": "mean cosine similarity of consecutive frames' last-decoder-layer UNet features",
        "clip_measure": "clip_score: 100 × mean cosine of frame and prompt; frame_accuracy: share of frames closer "
                        "to the target than to the source prompt; clip_consistency: mean cosine of consecutive "
                        f"frames (CLIP at {s['clip']})" if scores is not None else None,
        "seconds": {"inversion": job.timings.get("inversion"), **({"tuning": job.timings["tuning"]}
                    if "tuning" in job.timings else {}), **({"explain": job.timings["explain"]}
                    if "explain" in job.timings else {}), "total": clock(sd.device) - started},
        "peak_memory_bytes": peak, "peak_memory_measure": measure,
        "device": str(sd.device), "dtype": str(sd.dtype).removeprefix("torch."),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    videos = [Video("source", f"source{suffix}", frames, fps),
              *(Video(f"edit {i + 1}: {t}", name, e, fps)
                for i, (t, name, e) in enumerate(zip(s["target"], names, edits))),
              Video("side by side: source | " + " | ".join(f"edit {i + 1}" for i in range(len(edits))),
                    f"side_by_side{suffix}", together, fps)]
    write_report(folder, f"stemref edit ({s['method']}): {s['video']}", videos=videos, metrics=metrics,
                 settings={o.name: s[o.name] for o in COMMON + METHODS[s["method"]].options},
                 pictures=job.pictures, notes=job.notes,
                 summary=f"{s['source']!r} → " + ", ".join(map(repr, s["target"])))


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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:SLUG_LENGTH].strip("-") or "edit"


if __name__ == "__main__":
    sys.exit(main())
