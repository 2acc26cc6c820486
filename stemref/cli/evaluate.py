"""`python -m stemref.evaluate`: score an edited video with the CLIP metrics papers report.

    python -m stemref.evaluate EDITED --source-video SRC --prompt "..." --source-prompt "..." [--json] [--clip DIR]

EDITED is any edited video (stemref's or another tool's output), SRC the video it was edited from. Printed:
CLIP score (×100) of the edited frames against --prompt, frame accuracy (--prompt against --source-prompt),
and CLIP consistency of the edited and of the source frames (stemref.clip_metrics). `--json` prints one
JSON object with keys clip_score, frame_accuracy, clip_consistency and source_clip_consistency instead.

Every frame of EDITED is scored (at most --frames); the source frames compared are the same number read from
--start with --stride, so pass the selection the edit used. Frames are scored exactly as stored, at their own
resolution (no crop to a multiple of 8).
Nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checks import check_prompt, check_video_path
from .errors import ArgumentParser, UserError, run
from .model import add_device_arguments, check_device, chosen_dtype
from ..clip_metrics import clip_metrics
from ..loading import DEFAULT_CLIP, WeightsError, load_clip
from ..video import read_video


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body():
        _check_arguments(args)
        check_device(args)
        try:
            clip = load_clip(args.clip, dtype=chosen_dtype(args), device=args.device)
        except WeightsError as e:
            raise UserError(str(e)) from e
        edited = read_video(args.edited, count=args.frames, as_stored=True)
        source = read_video(args.source_video, args.start, args.stride, count=len(edited), as_stored=True)
        if len(source) != len(edited):
            raise UserError(f"{args.edited} has {len(edited)} frames but {args.source_video} has only {len(source)} "
                            f"from frame {args.start} with stride {args.stride}; pass the --start/--stride the edit "
                            f"used, or --frames {len(source)} to score fewer frames")
        edit = clip_metrics(clip, edited, args.prompt, args.source_prompt)
        scores = {"clip_score": edit["clip_score"], "frame_accuracy": edit["frame_accuracy"],
                  "clip_consistency": edit["clip_consistency"],
                  "source_clip_consistency": clip_metrics(clip, source, args.source_prompt)["clip_consistency"]}
        print(json.dumps(scores) if args.json else table(scores, args.clip, len(edited)))

    return run(body)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m stemref.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("edited", type=Path, help="the edited video (file or folder of images)")
    parser.add_argument("--source-video", type=Path, required=True, help="the video it was edited from")
    parser.add_argument("--prompt", required=True, help="the edit's target prompt")
    parser.add_argument("--source-prompt", required=True, help="a caption of the source video")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP,
                        help=f"CLIP folder, config.json + model.safetensors (default {DEFAULT_CLIP}; "
                             "get one: python -m stemref.download --model clip-vit-large-patch14)")
    parser.add_argument("--frames", type=int, default=None, help="score at most this many frames (default: all)")
    parser.add_argument("--start", type=int, default=0, help="first source frame the edit used (default 0)")
    parser.add_argument("--stride", type=int, default=1, help="the source frame stride the edit used (default 1)")
    add_device_arguments(parser)
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad settings before loading CLIP or reading a video."""
    for text, flag in ((args.prompt, "--prompt"), (args.source_prompt, "--source-prompt")):
        check_prompt(text, flag)
        if not text.strip():
            raise UserError(f"{flag} is empty; give the text the video is scored against")
    if args.prompt == args.source_prompt:
        raise UserError("--prompt and --source-prompt are the same text, so frame accuracy means nothing; give the "
                        "edit's target prompt and a caption of the source video")
    for name in ("frames", "stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.start < 0:
        raise UserError(f"--start must be 0 or more, got {args.start}")
    check_video_path(args.edited, "EDITED")
    check_video_path(args.source_video, "--source-video")


def table(scores: dict, clip: Path, frames: int) -> str:
    """The scores as a small aligned table, one row per metric, edited and source columns."""
    def cell(value: float | None, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    rows = [("CLIP score ×100", cell(scores["clip_score"], 2), "–"),
            ("frame accuracy", cell(scores["frame_accuracy"], 3), "–"),
            ("CLIP consistency", cell(scores["clip_consistency"], 4), cell(scores["source_clip_consistency"], 4))]
    lines = [f"CLIP metrics ({clip}, {frames} frames)", f"{'':<18}{'edited':>10}{'source':>10}"]
    lines += [f"{name:<18}{edited:>10}{source:>10}" for name, edited, source in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
