"""What the command-line tools share: device/dtype choice, loading with friendly errors, atomic writes."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..config import NotSD1Error
from ..loading import WeightsError, load
from ..pipeline import StableDiffusion

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UserError(Exception):
    """A problem with the command's input, reported as one line and exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, type=Path,
                        help="diffusers SD1.5 folder or original .safetensors file (get one: python -m stemref.download)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on GPU, fp32 on CPU")


def load_model(args: argparse.Namespace) -> StableDiffusion:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if str(args.device).startswith("cuda") else torch.float32)
    try:
        return load(args.weights, dtype=dtype, device=args.device)
    except (WeightsError, NotSD1Error) as e:
        raise UserError(str(e)) from e


def temporary_path(path: Path) -> Path:
    """Where to write `path` before renaming it into place, so a failed run leaves no partial file."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def finish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def progress_printer(label: str):
    def report(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    return report


def run(main) -> int:
    """Run a CLI body; turn user errors into one message on stderr and exit code 2."""
    try:
        main()
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
