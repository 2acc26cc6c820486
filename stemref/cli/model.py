"""The model arguments of the commands that load SD: --weights, --model-config, --device, --dtype
(`add_device_arguments` / `check_device` / `chosen_dtype` for commands that load no SD weights)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError
from ..config import NotSD1Error
from ..download import unfinished
from ..loading import WeightsError, load
from ..pipeline import StableDiffusion
from ..tokenizer import TokenizerFilesError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}  # fp64: exact CPU checks


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, type=Path,
                        help="diffusers SD1.5 folder or original .safetensors file (get one: python -m stemref.download)")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="for a single .safetensors file of another size: a diffusers folder with its "
                             "config.json files (default: SD1.5's configs)")
    add_device_arguments(parser)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on GPU, fp32 on CPU")


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype, else fp16 on a GPU and fp32 elsewhere."""
    return DTYPES[args.dtype] if args.dtype else (torch.float16 if str(args.device).startswith("cuda") else torch.float32)


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse an unusable --device or a missing --weights before any slow work."""
    check_device(args)
    if unfinished(Path(args.weights).expanduser()):
        raise UserError(f"--weights {args.weights} holds an unfinished download; finish it with "
                        f"`python -m stemref.download --to {args.weights}`")
    if not Path(args.weights).expanduser().exists():
        load(args.weights)  # raises the loader's message (how to get weights); cheap when the path is missing
    if getattr(args, "model_config", None) is not None and not args.model_config.is_dir():
        raise UserError(f"--model-config {args.model_config}: give a diffusers folder holding unet/config.json etc.")


def check_device(args: argparse.Namespace) -> None:
    """Refuse a --device this PyTorch cannot use."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {args.device}: not a device name ({e}); use cpu, cuda, cuda:1 or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: this PyTorch ({torch.__version__}) sees no CUDA GPU "
                            "(a CPU-only build, or no driver); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {args.device}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {args.device}: stemref runs on cpu, cuda or mps")


def load_model(args: argparse.Namespace, progress: Callable[[int, int], None] | None = None) -> StableDiffusion:
    check_model_arguments(args)
    try:
        return load(args.weights, dtype=chosen_dtype(args), device=args.device,
                    config=getattr(args, "model_config", None),
                    progress=progress)
    except (WeightsError, NotSD1Error, TokenizerFilesError) as e:
        raise UserError(str(e)) from e


def model_inputs(args: argparse.Namespace) -> list[Path]:
    """The files an output must never replace: the weights (and --model-config)."""
    return [p for p in (args.weights, getattr(args, "model_config", None)) if p is not None]

