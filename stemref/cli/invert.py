"""`python -m stemref.invert`: invert a video, reconstruct it, and measure how faithful the round trip is.

    python -m stemref.invert VIDEO --prompt "..." --context stem --weights W --out DIR
        DIR/inversion.safetensors   the latents x_0 … x_T (stemref.Inversion.load reads it back)
        DIR/reconstruction.mp4      x_T denoised back to frames with the same prompt and context
        DIR/side_by_side.mp4        input | reconstruction
        DIR/metrics.json            PSNR, SSIM, temporal consistency, seconds, peak memory, settings
        DIR/index.html              the videos, STEM's bases, the features' PCA and consistency per step, metrics
    python -m stemref.invert VIDEO --prompt "..." --compare --weights W --out DIR
        DIR/<context>/…             the above for 1-frame, 2-frame, all-frame and stem, on the same frames
        DIR/compare.md, .json       one row per context: the layout of the STEM supplement's Table A3
        DIR/index.html              the contexts side by side: features, consistency curves, the table

Under `torchrun --nproc-per-node N -m stemref.invert ...` the N processes share the frames (NCCL on GPUs,
gloo on the CPU; see launch.py); rank 0 writes the same files as one process would, with "processes" in
metrics.json.

Everything is written into a hidden folder beside DIR that becomes DIR only at the end, so a failed run
leaves nothing behind. The library functions are `stemref.invert` and `stemref.reconstruct`
(inversion.py); this module is the command only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from .checks import (check_fps, check_num_bases, check_prompt, check_seed, check_steps, check_video_path, checked,
                     warn_if_large)
from .errors import ArgumentParser, UserError, run, warn
from .launch import (DEFAULT_TIMEOUT, Launch, SharedFrames, check_settings_agree, failed_ranks, finish, read_shared,
                     start)
from .model import add_model_arguments, check_model_arguments, load_model, model_inputs
from .output import PANEL_GAP, output_folder
from .progress import progress_printer, silent_printer
from .measure import FEATURE_TIMESTEP, SCORED, clock, consistency, peak_memory, reset_peak_memory, source_fps
from .. import distributed
from ..context import CONTEXTS
from ..explain import Picture, inversion_pictures, inversion_recorder, similarity_plot
from ..inversion import Inversion, invert, reconstruct
from ..metrics import LAST_DECODER_SELF_ATTENTION, psnr, ssim
from ..pipeline import StableDiffusion
from ..report import Video, write_report
from ..video import read_video, side_by_side, write_video

STEM_BASES = 256
HEAVY_BASES = 4096  # above this, warn that the EM will take very long or run out of memory
LABELS = {"1-frame": "DDIM inversion (1-frame)", "2-frame": "DDIM inversion (2-frame)",
          "all-frame": "DDIM inversion (all-frame)", "stem": "STEM inversion"}
# STEM supplement, Table A3: mean of 5 videos, real SD1.5 weights (PSNR dB, SSIM)
PAPER_TABLE_A3 = {"1-frame": (24.122, 0.8137), "2-frame": (25.967, 0.8595), "all-frame": (26.464, 0.8700),
                  "stem": (31.572, 0.9606)}


class ProcessFailure(Exception):
    """Another process of a torchrun run failed or was killed (exit 1)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    launch = Launch()

    def body():
        nonlocal launch
        _check_arguments(args)
        launch, args.device = start(args.device, args.timeout)
        try:
            invert_video(args, launch)
        except dist.DistError as e:
            raise ProcessFailure(failed_ranks(launch) if launch.group is not None else str(e)) from None

    try:
        return run(body, failures=(ProcessFailure,))
    finally:
        finish(launch)


def invert_video(args: argparse.Namespace, launch: Launch) -> None:
    """The command's work, in one process or as one rank of several under torchrun (only rank 0 writes)."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "device")}
    check_settings_agree(launch, settings)
    printer = progress_printer if launch.main else silent_printer
    contexts = tuple(PAPER_TABLE_A3) if args.compare else (args.context,)
    # --compare keeps the contexts that finished when interrupted, for a rerun with the same arguments
    resume = json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "overwrite"}, default=str))
    with output_folder(args.out, args.overwrite, [args.video, *model_inputs(args)],
                       resume=resume if args.compare else None) if launch.main else nullcontext() as tmp:
        video = _read_frames(args, launch)  # on ranks > 0 only their shard
        frames, F = video.frames, video.total
        if args.num_bases is not None:
            check_num_bases(args.num_bases, F, *frames.shape[-2:], args.scope)
        if F < args.frames and launch.main:
            warn(f"{args.video} has only {F} frames from --start {args.start} at --stride "
                 f"{args.stride}; using {F}, not --frames {args.frames}")
        fps = args.fps or source_fps(args.video, args.stride)
        with printer("loading weights", "part") as report:
            sd = load_model(args, progress=report)
        checked("--prompt", sd.tokenizer.refuse_long, [args.prompt])  # before minutes of inversion
        input_consistency = None
        if launch.main:
            with progress_printer("input consistency", "frame") as report:
                input_consistency = consistency(sd, frames, args.prompt, report)
        rows = []
        for context in contexts:
            folder = tmp / context if args.compare and launch.main else tmp
            # rank 0 decides (the partial folder is its own) and tells the others
            kept = args.compare and launch.main and (folder / "metrics.json").is_file()
            if launch.group is not None:
                kept = distributed.broadcast_object(kept, launch.group)
            if kept:  # finished before an interruption
                if launch.main:
                    rows.append(json.loads((folder / "metrics.json").read_text()))
                    print(f"{context}: kept from the interrupted run", file=sys.stderr)
                continue
            if args.compare and launch.main:
                shutil.rmtree(folder, ignore_errors=True)  # an unfinished context starts over
            if launch.main:
                folder.mkdir(exist_ok=True)
            rows.append(_invert_and_reconstruct(sd, video, context, args, folder, fps, input_consistency, launch))
        if args.compare and launch.main:
            (tmp / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
            (tmp / "compare.md").write_text(compare_table(rows, args.video))
            compare_report(tmp, rows, args.video)
    launch.barrier()  # the other ranks end when rank 0's output folder is in place
    if not launch.main:
        return
    H, W = frames.shape[-2:]
    print(f"{len(frames)} frames of {W}×{H}, {args.steps} steps", file=sys.stderr)
    for row in rows:
        print(f"{row['context']}: PSNR {row['psnr']:.3f} dB, SSIM {row['ssim']:.4f}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


def _read_frames(args: argparse.Namespace, launch: Launch) -> SharedFrames:
    """The selected frames: all of them in one process and on rank 0, only the rank's shard on the others."""
    def read(start: int, count: int) -> torch.Tensor:
        with (progress_printer if launch.main else silent_printer)("reading video", "frame") as report:
            return read_video(args.video, start, args.stride, count, args.size, args.square, progress=report)
    return read_shared(launch, read, args.start, args.stride, args.frames)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m stemref.invert", description=__doc__.split("\n\nEverything")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", type=Path, help="video file (mp4, mov, webm, mkv, gif) or folder of images")
    parser.add_argument("--prompt", required=True, help="a caption of the source video (the inversion prompt)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--context", choices=CONTEXTS, default="stem", help="what each frame's self-attention sees (default stem)")
    which.add_argument("--compare", action="store_true", help="run all four contexts (Table A3)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps for inversion and for reconstruction (default 50)")
    parser.add_argument("--frames", type=int, default=16, help="how many frames to read (default 16)")
    parser.add_argument("--start", type=int, default=0, help="index of the first frame to read (default 0)")
    parser.add_argument("--stride", type=int, default=1, help="read every n-th frame (default 1)")
    parser.add_argument("--size", type=int, default=512, help="longer side in pixels, a multiple of 8 (default 512)")
    parser.add_argument("--square", action="store_true", help="resize the shorter side to --size and crop a square")
    parser.add_argument("--seed", type=int, default=0, help="seeds STEM's random initial bases (default 0)")
    parser.add_argument("--num-bases", type=int, default=None, help=f"STEM's K (default {STEM_BASES})")
    parser.add_argument("--scope", type=int, default=None,
                        help="frames per set of STEM bases (default: the whole video; 8 reproduces the official code)")
    parser.add_argument("--batch", type=int, default=None,
                        help="frames per UNet call, 1-frame context only (with --compare: its 1-frame run; "
                             "default: all)")
    parser.add_argument("--fps", type=float, default=None, help="frame rate of the written videos (default: the input's, divided by --stride)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (its files: see above)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if an earlier stemref run wrote it (never another folder)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"under torchrun: seconds a process waits for the others before the run stops with "
                             f"an error (default {DEFAULT_TIMEOUT:g})")
    add_model_arguments(parser)
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad settings before reading the video or loading weights; warn about very heavy ones."""
    check_video_path(args.video)
    check_seed(args.seed)
    check_fps(args.fps)
    check_prompt(args.prompt)
    check_steps(args.steps)
    check_model_arguments(args)
    if args.size % 8 or args.size < 64:
        raise UserError(f"--size {args.size}: use a multiple of 8 that is at least 64 (SD works on 8× smaller "
                        "latents), such as 256 or 512")
    for name in ("steps", "frames", "stride"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.start < 0:
        raise UserError(f"--start must be 0 or more, got {args.start}")
    if args.batch is not None:
        if args.batch < 1:
            raise UserError(f"--batch must be at least 1, got {args.batch}")
        if not args.compare and args.context != "1-frame":
            raise UserError(f"--batch splits the video across UNet calls, which only --context 1-frame allows; "
                            f"the {args.context} context needs every frame in one call. Drop --batch.")
    for flag, value in (("--num-bases", args.num_bases), ("--scope", args.scope)):
        if value is None:
            continue
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
        if not args.compare and args.context != "stem":
            raise UserError(f"{flag} is a STEM option; use it with --context stem (or --compare)")
    warn_if_large(args.size)
    if (args.num_bases or 0) > HEAVY_BASES:
        warn(f"--num-bases {args.num_bases}: STEM uses {STEM_BASES}; the EM's time and memory grow with K")


def _invert_and_reconstruct(sd: StableDiffusion, video: SharedFrames, context: str, args: argparse.Namespace,
                            folder: Path, fps: float, input_consistency: float | None,
                            launch: Launch = Launch()) -> dict | None:
    """One context: invert, reconstruct, write the four files into `folder`, return the metrics (rank 0; the
    other ranks of a torchrun run invert and reconstruct their shards, hand them to rank 0 and return None)."""
    frames = video.frames  # every frame on rank 0, the shard on the other ranks
    printer = progress_printer if launch.main else silent_printer
    options = {} if context != "stem" else {key: value for key, value in
                                            (("num_bases", args.num_bases), ("scope", args.scope)) if value}
    batch = args.batch if context == "1-frame" else None
    reset_peak_memory(sd.device)
    started = clock(sd.device)
    # the pictures need every frame in one process: a sharded run records none
    recorder = inversion_recorder(sd.unet, args.steps) if launch.group is None else None
    with printer(f"{context} VAE encode", "frame") as encoding, printer(f"{context} inversion") as stepping:
        inversion = invert(sd, frames, args.prompt, args.steps, context, seed=args.seed, batch=batch,
                           progress=stepping, vae_progress=encoding, recorder=recorder, group=launch.group,
                           total=video.total, **options)
    inverted = clock(sd.device)
    with printer(f"{context} reconstruction") as stepping, printer(f"{context} VAE decode", "frame") as decoding:
        recon = reconstruct(sd, inversion, batch=batch, progress=stepping, vae_progress=decoding).cpu()
    finished = clock(sd.device)
    peak, measure = peak_memory(sd.device)
    if inversion.shard is not None:  # rank 0 gathers every shard (in host memory, over gloo) and writes
        shard = launch.on_cpu(inversion.shard)
        recon = distributed.gather_to_first(recon, shard)
        latents = distributed.gather_to_first(inversion.latents.cpu(), shard, dim=1)
        if not launch.main:
            return None
        inversion = Inversion(latents, inversion.timesteps, inversion.settings)

    with progress_printer(f"{context} consistency", "frame") as report:
        recon_consistency = consistency(sd, recon, args.prompt, report)
    inversion.save(folder / "inversion.safetensors")
    write_video(folder / "reconstruction.mp4", recon, fps)
    together = side_by_side(frames, recon, labels=["input", f"{context} reconstruction"], gap=PANEL_GAP)
    write_video(folder / "side_by_side.mp4", together, fps)
    metrics = {
        "context": context,
        "psnr": psnr(recon, frames),
        "ssim": ssim(recon, frames),
        # cosine similarity of consecutive frames' last-decoder-layer features (metrics.temporal_consistency)
        "consistency": {"reconstruction": recon_consistency, "input": input_consistency},
        "seconds": {"inversion": inverted - started, "reconstruction": finished - inverted},
        "peak_memory_bytes": peak,
        "peak_memory_measure": measure,
        # per inversion step: mean cosine similarity of consecutive frames' features (unwarped; index.html plots it)
        "feature_similarity": {} if recorder is None else {str(step): value
                                                           for step, value in sorted(recorder.similarity.items())},
        "frames": frames.shape[0],
        "processes": launch.size,
        "width": frames.shape[-1], "height": frames.shape[-2], "scored": SCORED,
        "steps": args.steps,
        "settings": {**asdict(inversion.settings), "batch": batch, "video": str(args.video), "start": args.start,
                     "stride": args.stride, "square": args.square, "device": str(sd.device),
                     "dtype": str(sd.dtype).removeprefix("torch."), "fps": fps,
                     "consistency_layer": LAST_DECODER_SELF_ATTENTION, "consistency_timestep": FEATURE_TIMESTEP},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(folder, f"stemref invert ({LABELS[context]}): {args.video}",
                 summary=f"PSNR {metrics['psnr']:.3f} dB, SSIM {metrics['ssim']:.4f} against the input",
                 videos=[Video("input | reconstruction", "side_by_side.mp4", together, fps),
                         Video("reconstruction", "reconstruction.mp4", recon, fps)],
                 pictures=[] if recorder is None else inversion_pictures(recorder, options.get("num_bases", STEM_BASES),
                                                                         context),
                 metrics={k: v for k, v in metrics.items() if k != "settings"}, settings=metrics["settings"])
    return metrics


def compare_table(rows: list[dict], video: Path) -> str:
    """Markdown: one row per context, Table A3's columns plus consistency, time and memory."""
    first = rows[0]
    H, W = first["height"], first["width"]
    consistency = first["consistency"]["input"]
    lines = [
        "# Reconstruction after inversion, by self-attention context (STEM supplement, Table A3)",
        "",
        f"`{video}`: {first['frames']} frames, {W}×{H}, {first['steps']} steps, "
        f"prompt {first['settings']['prompt']!r}, {first['settings']['dtype']} on {first['settings']['device']}. "
        f"Consistency of the input: {_number(consistency, 4)}.",
        "",
        "| context | PSNR | SSIM | consistency | seconds | peak memory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        seconds = row["seconds"]["inversion"] + row["seconds"]["reconstruction"]
        lines.append(f"| {LABELS[row['context']]} | {row['psnr']:.3f} | {row['ssim']:.4f} | "
                     f"{_number(row['consistency']['reconstruction'], 4)} | {seconds:.1f} | "
                     f"{_bytes(row['peak_memory_bytes'])} |")
    paper = ", ".join(f"{context} {p:.3f} / {s:.4f}" for context, (p, s) in PAPER_TABLE_A3.items())
    lines += [
        "",
        "PSNR in dB and SSIM against the input frames; consistency: mean cosine similarity of consecutive frames'",
        "last-decoder-layer UNet features (no flow); seconds: inversion + reconstruction; peak memory: "
        f"{first['peak_memory_measure']}.",
        f"The paper (real SD1.5, mean of 5 videos, PSNR / SSIM): {paper}.",
        "",
    ]
    return "\n".join(lines)


def compare_report(folder: Path, rows: list[dict], video: Path) -> Path:
    """folder/index.html for --compare: each context's page and features side by side, the curves in one plot."""
    curves = {LABELS[r["context"]]: {int(k): v for k, v in r.get("feature_similarity", {}).items()} for r in rows}
    pictures = [similarity_plot({k: v for k, v in curves.items() if v})] if any(curves.values()) else []
    pictures += [Picture(f"{r['context']}-features", f"{LABELS[r['context']]}: features",
                         "The PCA of the last decoder self-attention layer's features (fitted per context), top, and "
                         "the similarity of consecutive frames, bottom: compare how steady the colours stay.",
                         file=f"{r['context']}/explain/features-pca.png")
                 for r in rows if (folder / r["context"] / "explain" / "features-pca.png").is_file()]
    # the settings all contexts share; the others (context, --batch, the context's options) go in its row
    common = {k: v for k, v in rows[0]["settings"].items() if all(r["settings"].get(k) == v for r in rows)}
    own = [{k: v for k, v in r["settings"].items() if k not in common and k not in ("context", "options")}
           for r in rows]
    table = [{"context": LABELS[r["context"]], **mine, **r["settings"].get("options", {}), "psnr": r["psnr"],
              "ssim": r["ssim"], "consistency": r["consistency"]["reconstruction"],
              "seconds": r["seconds"]["inversion"] + r["seconds"]["reconstruction"],
              "peak_memory_bytes": r["peak_memory_bytes"]} for r, mine in zip(rows, own)]
    return write_report(folder, f"stemref invert --compare: {video}", links=[
        (f"{LABELS[r['context']]}: videos and pictures", f"{r['context']}/index.html") for r in rows],
        pictures=pictures, metrics={"contexts": table, "input consistency": rows[0]["consistency"]["input"]},
        settings=common,
        summary="Reconstruction after inversion under each self-attention context (STEM supplement, Table A3).")


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _bytes(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB"


if __name__ == "__main__":
    sys.exit(main())
