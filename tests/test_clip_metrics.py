"""CLIP score, frame accuracy and CLIP consistency against small numpy references written from their
definitions, and clip_metrics end to end against transformers' CLIP and image processor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stemref.clip_metrics import clip_consistency, clip_metrics, clip_score, frame_accuracy
from stemref.loading import load_clip
from test_clip import reference_pixels


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_clip_score(frames: np.ndarray, prompt: np.ndarray) -> float:
    return 100 * float(np.mean([cosine(f, prompt) for f in frames]))


def reference_frame_accuracy(frames: np.ndarray, target: np.ndarray, source: np.ndarray) -> float:
    return float(np.mean([cosine(f, target) > cosine(f, source) for f in frames]))


def reference_consistency(frames: np.ndarray) -> float:
    return float(np.mean([cosine(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]))


def embeddings(n: int, width: int = 16, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("seed", range(3))
def test_scores_match_numpy_references(seed):
    frames, (target, source) = embeddings(7, seed=seed), embeddings(2, seed=seed + 10)
    f, t, s = frames.numpy(), target.numpy(), source.numpy()
    assert clip_score(frames, target) == pytest.approx(reference_clip_score(f, t), rel=1e-12)
    assert frame_accuracy(frames, target, source) == reference_frame_accuracy(f, t, s)
    assert clip_consistency(frames) == pytest.approx(reference_consistency(f), rel=1e-12)


def test_frame_accuracy_counts_frames_closer_to_the_target():
    target, source = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    frames = torch.tensor([[2.0, 1.0], [1.0, 3.0], [5.0, 4.0], [1.0, 1.0]])  # closer: target, source, target, tie
    assert frame_accuracy(frames, target, source) == 0.5  # a tie does not count
    assert frame_accuracy(frames, source, target) == 0.25


def test_identical_frames_give_consistency_one():
    frame = embeddings(1, seed=3)
    assert clip_consistency(frame.expand(5, -1) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])[:, None]) == pytest.approx(1.0, abs=1e-15)


def test_identical_video_frames_give_consistency_one(tiny_clip_dir):
    clip = load_clip(tiny_clip_dir, dtype=torch.float64)
    frame = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    assert clip_metrics(clip, frame.expand(4, -1, -1, -1), "a cat")["clip_consistency"] == pytest.approx(1.0, abs=1e-15)


def test_scores_are_float32_for_half_embeddings():
    frames, prompt = embeddings(6, seed=4, dtype=torch.float16), embeddings(1, seed=5, dtype=torch.float16)[0]
    expected = reference_clip_score(frames.float().numpy().astype(np.float32), prompt.float().numpy().astype(np.float32))
    assert clip_score(frames, prompt) == pytest.approx(expected, rel=1e-6)
    assert clip_consistency(frames) == pytest.approx(reference_consistency(frames.float().numpy()), rel=1e-6)
    assert clip_consistency(frames.bfloat16()) == pytest.approx(reference_consistency(frames.bfloat16().float().numpy()), rel=1e-6)


def test_clip_metrics_against_transformers(tiny_clip_dir, tiny_clip_reference):
    """Embeddings from transformers (its image processor, its tokenizer ids via ours, its model), scores by numpy."""
    clip = load_clip(tiny_clip_dir)  # float32, as the commands run it on CPU
    frames = torch.rand(5, 3, 36, 50, generator=torch.Generator().manual_seed(6))
    prompt, source = "a watercolor painting of a swan", "a swan on a lake"
    result = clip_metrics(clip, frames, prompt, source, batch=2)
    with torch.no_grad():
        image = tiny_clip_reference.get_image_features(pixel_values=reference_pixels(frames, 30).double()).pooler_output
        text = tiny_clip_reference.get_text_features(input_ids=clip.tokenizer([prompt, source])).pooler_output
    f, (t, s) = image.numpy(), text.numpy()
    assert set(result) == {"clip_score", "frame_accuracy", "clip_consistency"}
    assert result["clip_score"] == pytest.approx(reference_clip_score(f, t), abs=1e-4)
    assert result["frame_accuracy"] == reference_frame_accuracy(f, t, s)
    assert result["clip_consistency"] == pytest.approx(reference_consistency(f), abs=1e-6)
    assert all(type(v) is float for v in result.values())


def test_clip_metrics_without_a_comparison(tiny_clip_dir):
    clip = load_clip(tiny_clip_dir)
    frames = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(7))
    result = clip_metrics(clip, frames, "a cat", source_prompt="a cat")
    assert result["frame_accuracy"] is None and result["clip_consistency"] is None
    assert result == {**clip_metrics(clip, frames, "a cat"), "frame_accuracy": None}


@pytest.mark.parametrize("call, match", [
    (lambda: clip_consistency(embeddings(1)), "at least 2 frames"),
    (lambda: clip_score(embeddings(3), embeddings(1, width=8)[0]), r"\(16,\)"),
    (lambda: clip_score(embeddings(3, width=16)[0], embeddings(1)[0]), r"\(F, P\)"),
    (lambda: frame_accuracy(embeddings(3), embeddings(2), embeddings(1)[0]), "one prompt's embedding"),
    (lambda: clip_score(embeddings(3) * float("nan"), embeddings(1)[0]), "finite"),
    (lambda: clip_score(np.zeros((3, 16)), embeddings(1)[0]), r"\(F, P\)"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
