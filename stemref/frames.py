"""The one frame convention of stemref's API, and its checks: (F, 3, H, W) floats in [0, 1], all finite."""
from __future__ import annotations

import torch

# Slack around [0, 1] for float noise (resampling, arithmetic): far below one 8-bit level (1/255 ≈ 0.004),
# far above what could hide 0–255 or [-1, 1] frames.
VALUE_TOLERANCE = 1e-3


class NonFiniteError(ValueError):
    """A result holds NaN or infinite values (e.g. fp16 overflow); it is refused rather than written."""


def check_frames(frames: object, what: str = "frames", values: bool = False,
                 tolerance: float = VALUE_TOLERANCE) -> None:
    """Raise ValueError unless `frames` is a floating (F, 3, H, W) tensor with F, H, W >= 1.

    `values=True` also requires finite values in [-tolerance, 1 + tolerance] (one pass over the tensor).
    """
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor (F, 3, H, W), got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[1] != 3 or min(frames.shape) == 0:
        raise ValueError(f"{what} must have shape (F, 3, H, W) with F, H, W >= 1, got {tuple(frames.shape)}; "
                         "add a frame axis with x[None] or move channels first with x.permute(0, 3, 1, 2)")
    if not frames.is_floating_point():
        raise ValueError(f"{what} must be floating point in [0, 1], got {frames.dtype}; use x.float() / 255")
    if not values:
        return
    check_finite(frames, what, "check the computation or file that produced them")
    low, high = frames.min().item(), frames.max().item()
    if low < -tolerance or high > 1 + tolerance:
        raise ValueError(f"{what} must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; divide 8-bit frames "
                         "by 255, map [-1, 1] frames with (x + 1) / 2")


def check_finite(x: torch.Tensor, what: str, hint: str) -> None:
    """Raise NonFiniteError naming `what` when x holds NaN or ±inf."""
    finite = torch.isfinite(x)
    if not finite.all():
        bad = (~finite).sum().item()
        raise NonFiniteError(f"{what} contain {bad} NaN or infinite values of {x.numel()}; {hint}")


def non_finite_hint(dtype: torch.dtype) -> str:
    """Why a result of a run in `dtype` holds NaN: half precision overflows; at full precision, advising fp32 would
    mislead, so the hint names what remains (extreme settings, the weights)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half precision can overflow: try --dtype fp32 (dtype=torch.float32), or check the weights"
    return (f"this run is {str(dtype).removeprefix('torch.')}, so not a half-precision overflow: check for extreme "
            "settings (guidance, reweight factors) and the weights")
