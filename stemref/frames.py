"""The one frame convention of stemref's API, and its check: (F, 3, H, W) floats in [0, 1]."""
from __future__ import annotations

import torch


def check_frames(frames: object, what: str = "frames") -> None:
    """Raise ValueError unless `frames` is a floating (F, 3, H, W) tensor with F, H, W >= 1."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor (F, 3, H, W), got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[1] != 3 or min(frames.shape) == 0:
        raise ValueError(f"{what} must have shape (F, 3, H, W) with F, H, W >= 1, got {tuple(frames.shape)}; "
                         "add a frame axis with x[None] or move channels first with x.permute(0, 3, 1, 2)")
    if not frames.is_floating_point():
        raise ValueError(f"{what} must be floating point in [0, 1], got {frames.dtype}; use x.float() / 255")
