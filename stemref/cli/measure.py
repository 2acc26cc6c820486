"""What the commands measure and report besides their outputs: frame rate, wall time, peak memory, consistency."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import torch

from ..metrics import temporal_consistency, unet_features
from ..pipeline import StableDiffusion

DEFAULT_FPS = 8.0  # for image folders, which carry no frame rate
FEATURE_TIMESTEP = 1  # unet_features' default: clean latents at the first DDIM timestep
SCORED = ("the frames before encoding: written mp4 files are lossy H.264, so scores computed from them differ "
          "slightly (mkv files are lossless)")  # metrics.json's "scored"


def source_fps(path: Path, stride: int) -> float:
    """The clip's frame rate over the stride, so the outputs play at the input's speed; 8 for image folders."""
    if path.is_dir():
        return DEFAULT_FPS
    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
    except (av.FFmpegError, IndexError):
        return DEFAULT_FPS
    return min(float(rate) / stride, 1000.0) if rate else DEFAULT_FPS


def consistency(sd: StableDiffusion, frames: torch.Tensor, prompt: str,
                progress: Callable[[int, int], None] | None = None) -> float | None:
    """Temporal consistency of a video's UNet features (None for a single frame: nothing to compare)."""
    if len(frames) < 2:
        return None
    return temporal_consistency(unet_features(sd, frames, prompt, t=FEATURE_TIMESTEP, progress=progress))


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what was measured) since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated during the run"
    try:
        import resource  # Unix only
    except ImportError:
        return None, "not measured on this platform"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes; the peak cannot be reset, so it covers the whole process so far
    return (peak if sys.platform == "darwin" else peak * 1024), "peak resident memory of the process so far"
