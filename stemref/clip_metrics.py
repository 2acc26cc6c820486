"""The CLIP metrics video-editing papers report for an edit (FateZero, TokenFlow, Tune-A-Video, EI², STEM).

    clip_score        100 × mean over frames of cos(frame, prompt): how well the frames match the prompt
    frame_accuracy    fraction of frames with cos(frame, target prompt) > cos(frame, source prompt)
    clip_consistency  mean over consecutive pairs of cos(frame i, frame i + 1): how steady the video is

Cosines are between CLIP embeddings (image tower of each frame, text tower of each prompt). Frame accuracy
is FateZero's: a frame counts when CLIP's softmax over (source, target) prefers the target, which is the
same as the larger cosine because CLIP's logit scale is positive; a tie does not count. Consistency compares
consecutive frames, as FateZero's script does (Tune-A-Video averages over all pairs instead).

The scores take embeddings (F, P) for frames and (P,) for a prompt, in any dtype and on any device, and
compute in float32 (float64 for float64 input); `clip_metrics` takes frames and prompts and returns all of
them. Dimension legend: F frames, P embedding width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .clip_pipeline import CLIP

CLIP_SCORE_SCALE = 100  # papers print cosine similarities × 100


@torch.no_grad()
def clip_score(frames: torch.Tensor, prompt: torch.Tensor) -> float:
    """100 × the mean cosine similarity between each frame's embedding (F, P) and a prompt's (P,)."""
    frames = _unit(frames, "clip_score: frames")
    prompt = _unit_prompt(prompt, frames, "clip_score")
    return (CLIP_SCORE_SCALE * (frames @ prompt).mean()).item()


@torch.no_grad()
def frame_accuracy(frames: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> float:
    """Fraction of frames (F, P) whose embedding is strictly closer (cosine) to `target` (P,) than to `source` (P,)."""
    frames = _unit(frames, "frame_accuracy: frames")
    target, source = (_unit_prompt(p, frames, f"frame_accuracy: {name}") for name, p in (("target", target), ("source", source)))
    return (frames @ target > frames @ source).sum().item() / frames.shape[0]


@torch.no_grad()
def clip_consistency(frames: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frames' embeddings (F, P), F >= 2; identical frames give 1."""
    frames = _unit(frames, "clip_consistency: frames")
    if frames.shape[0] < 2:
        raise ValueError(f"clip_consistency: needs at least 2 frames to compare, got {frames.shape[0]}")
    return (frames[:-1] * frames[1:]).sum(dim=-1).mean().item()


def clip_metrics(clip: CLIP, frames: torch.Tensor, prompt: str, source_prompt: str | None = None,
                 batch: int = 32) -> dict[str, float | None]:
    """All CLIP metrics of one video (F, 3, H, W) in [0, 1]: a dict with

        clip_score        against `prompt` (the target prompt of an edit, or the caption of a source video)
        frame_accuracy    `prompt` against `source_prompt`; None without a source prompt, or when the two
                          are the same text (a reconstruction: no frame can prefer either)
        clip_consistency  None for a single frame

    Frames are embedded `batch` at a time on the model's device; the scores are float32.
    """
    compare = source_prompt is not None and source_prompt != prompt
    embeddings = clip.encode_frames(frames, batch)  # (F, P)
    prompts = clip.encode_prompts([prompt, source_prompt] if compare else [prompt])  # (1 or 2, P)
    return {
        "clip_score": clip_score(embeddings, prompts[0]),
        "frame_accuracy": frame_accuracy(embeddings, prompts[0], prompts[1]) if compare else None,
        "clip_consistency": clip_consistency(embeddings) if len(embeddings) > 1 else None,
    }


def _unit(x: torch.Tensor, what: str) -> torch.Tensor:
    """Embeddings (F, P) as unit vectors in float32 (float64 stays float64)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or min(x.shape) == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be embeddings (F, P), got {shape}; CLIP.encode_frames(frames) makes them")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise ValueError(f"{what} must be finite floating point embeddings, got {x.dtype} (or NaN/inf values)")
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def _unit_prompt(x: torch.Tensor, frames: torch.Tensor, what: str) -> torch.Tensor:
    """One prompt's embedding (P,) or (1, P) as a unit vector (P,) matching the frames' width, dtype and device."""
    if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.shape[0] != frames.shape[1]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be one prompt's embedding ({frames.shape[1]},) like the frames', got {shape};"
                         " CLIP.encode_prompts(prompt)[0] makes one")
    if x.device != frames.device:
        raise ValueError(f"{what} is on {x.device} but the frames' embeddings are on {frames.device}; move both to one device")
    return _unit(x[None], what)[0].to(frames.dtype)
