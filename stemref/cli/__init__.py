"""What the command-line tools share: device/dtype choice, loading with friendly errors, atomic writes."""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
    add_device_arguments(parser)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on GPU, fp32 on CPU")


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype, else fp16 on a GPU and fp32 on the CPU."""
    return DTYPES[args.dtype] if args.dtype else (torch.float16 if str(args.device).startswith("cuda") else torch.float32)


def load_model(args: argparse.Namespace) -> StableDiffusion:
    try:
        return load(args.weights, dtype=chosen_dtype(args), device=args.device)
    except (WeightsError, NotSD1Error) as e:
        raise UserError(str(e)) from e


@contextmanager
def output_folder(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """`with output_folder(out) as tmp:` write into tmp; it becomes `out` only when the block succeeds.

    tmp is a hidden sibling of `out` (same file system, so the final rename is atomic). On any error,
    Ctrl-C included, tmp is deleted, with any parent folders this call created, so a failed run leaves
    nothing behind. An existing non-empty `out` is refused unless `overwrite`; then it is replaced whole.
    """
    if path.name in ("", ".", ".."):
        raise UserError(f"--out {path}: name a new folder, such as {path / 'run'}")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a folder name")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"--out {path} exists and is not empty; choose a new folder or pass --overwrite")
    created = [p for p in path.parents if not p.exists()]  # innermost first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:  # something else wrote there meanwhile: leave it
                break
        raise
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    if path.exists():
        os.replace(path, old)  # moved aside, not deleted, until the new folder is in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
