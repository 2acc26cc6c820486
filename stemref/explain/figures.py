"""From recorded runs to captioned pictures: what each method's report shows, and what to look for in it.

Each function turns a `Recorder` (or a tuning's losses) into `Picture`s: a title, a one-sentence caption,
and either an image (3, H, W) in [0, 1] (written as PNG) or an inline SVG plot. report.py lays them out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..edit.p2p import word_positions
from ..video import side_by_side
from .pictures import (basis_frames, correspondence_frames, heat, mask_frames, pca_rgb, position_colours, sheet,
                       similarity_frames, spaced, upscale)
from .plots import keyframe_chart, line_plot
from .recorder import Recorder

MAX_COLUMNS = 8  # frames shown side by side
MAX_ROWS = 6  # steps shown one below the other


@dataclass
class Picture:
    name: str  # file stem, unique within a report
    title: str
    caption: str  # one sentence: what the picture shows and what to look for
    image: torch.Tensor | None = None  # (3, H, W) in [0, 1]
    svg: str | None = None
    file: str | None = None  # an image already written, relative to the report's folder


def inversion_pictures(rec: Recorder, num_bases: int | None, context: str) -> list[Picture]:
    """STEM's bases (when the context is STEM), the PCA of the features and the similarity curve."""
    pictures = []
    for layer, labels in sorted(rec.assignments.items(), key=lambda item: -item[1].shape[-1]):
        h, w = labels.shape[-2:]
        frames = basis_frames(labels[:, 0], num_bases)  # head 0: every head has its own bases
        pictures.append(Picture(
            f"bases-{h}x{w}", f"STEM bases at the {h}×{w} level, step {rec.bases_step}",
            f"Each token of {layer} (head 0) has the colour of the basis it belongs to most; a basis that stays on "
            "the same object from frame to frame keeps its colour there, which is how STEM's few bases stand for "
            "the whole video.", image=_row(frames)))
    if rec.features is not None:
        pictures.append(Picture(
            "features-pca", f"Features ({context}), step {rec.feature_step}: PCA and frame-to-frame similarity",
            "Top: the last decoder self-attention layer's output, its 3 principal components (fitted on all frames "
            "at once) as RGB, so equal colours are similar features; bottom: per position, the cosine similarity "
            "of a frame's features to the previous frame's (white 1, black 0, no optical-flow warping), where "
            "bright means temporally consistent (STEM Fig. 6).",
            image=sheet(upscale(torch.stack(_columns(pca_rgb(rec.features)) + _columns(_padded(
                similarity_frames(rec.features)))).view(2, -1, 3, *rec.features.shape[-2:])))))
    if rec.similarity:
        pictures.append(similarity_plot({context: rec.similarity}))
    return pictures


def similarity_plot(curves: dict[str, dict[int, float]]) -> Picture:
    """One curve per context: mean cosine similarity of consecutive frames' features per inversion step."""
    svg = line_plot({label: sorted(curve.items()) for label, curve in curves.items()},
                    "Feature similarity of consecutive frames", "inversion step (0: clean frames)",
                    "mean cosine similarity")
    return Picture("similarity", "Temporal consistency per inversion step (cf. STEM Fig. A3)",
                   "The mean cosine similarity of consecutive frames' last-decoder-layer features at each inversion "
                   "step, higher is more consistent; unlike Fig. A3 the previous frame is not warped by optical flow "
                   "(stemref has no flow model), so motion alone lowers it.", svg=svg)


def tokenflow_pictures(rec: Recorder, frames: int) -> list[Picture]:
    """The keyframes chosen per step, and the correspondence field of one step."""
    pictures = []
    if rec.chosen_keyframes:
        pictures.append(Picture(
            "keyframes", "TokenFlow keyframes per denoising step",
            "Each row is a denoising step and the red squares its keyframes, one drawn at random per batch: the "
            "keyframes are edited jointly and every other frame takes its features from them, so a fresh draw "
            "per step spreads the edit evenly over the video.",
            svg=keyframe_chart(rec.chosen_keyframes, frames, rec.batches)))
    if rec.matches:
        h, w = rec.match_grid
        field = torch.cat([correspondence_frames(rec.matches[b], (h, w)) for b in sorted(rec.matches)])
        key = position_colours(h, w)[None]  # (1, 3, h', w')
        columns = _columns(torch.cat([key, field]))
        pictures.append(Picture(
            "correspondence", f"TokenFlow correspondence field, step {rec.match_step}",
            "The first image colours each keyframe token by its place (red: right, green: down); every other image "
            "is a frame whose tokens take the colour of the keyframe token they copy features from, so a smooth "
            "copy of the first image means the frame follows its keyframe, and jumbled colours mean poor matches.",
            image=sheet(upscale(torch.stack(columns)[None]))))
    return pictures


def fatezero_pictures(source: Recorder, edit: Recorder, tokenizer, source_prompt: str, target_prompt: str,
                      frames: torch.Tensor) -> list[Picture]:
    """Each word's cross-attention maps over the frames, in the inversion and in the edit; the blend mask."""
    pictures = []
    for name, rec, prompt, side in (("words-source", source, source_prompt, "inversion, source prompt"),
                                    ("words-edit", edit, target_prompt, "edit, target prompt")):
        rows, words = _word_rows(rec, tokenizer, prompt)
        if rows:
            cells = upscale(torch.stack(rows))  # (words, columns, 3, h, w)
            cells[:, 0] = torch.cat([side_by_side(row[:1], labels=[word]) for row, word in zip(cells, words)])
            pictures.append(Picture(
                name, f"Cross-attention of each word ({side})",
                f"One row per word ({', '.join(map(repr, words))}, top to bottom, written on its first frame), one "
                "column per frame: where the word's token attends, averaged over the 16×16-level layers, the heads "
                "and the steps (brighter is more); a word whose map stays on its object across the frames is one "
                "FateZero can edit there.", image=sheet(cells)))
    if edit.masks:
        steps = spaced(sorted(edit.masks), MAX_ROWS)
        small = F.interpolate(frames.float(), size=edit.masks[steps[0]].shape[-2:], mode="area")
        rows = [torch.stack(_columns(mask_frames(edit.masks[s], small))) for s in steps]
        pictures.append(Picture(
            "blend-mask", f"FateZero blend mask over the frames, steps {steps[0]}–{steps[-1]}",
            "Rows are edit steps and columns frames; the bright part is where the source words attend (their "
            "thresholded cross-attention), the only place the edit may change the self-attention or the latents.",
            image=sheet(upscale(torch.stack(rows)))))
    return pictures


def tuning_pictures(losses: list[float], method: str) -> list[Picture]:
    if not losses:
        return []
    window = len(losses) // 20  # a running mean over fewer than 2 steps would only redraw the loss
    curves = {"loss": list(enumerate(losses))}
    if window > 1:
        recent = [losses[max(0, i - window + 1): i + 1] for i in range(len(losses))]
        curves[f"mean of {window}"] = [(i, sum(r) / len(r)) for i, r in enumerate(recent)]
    svg = line_plot(curves, f"{method} tuning loss", "tuning step", "ε-prediction MSE")
    return [Picture("tuning-loss", f"{method} one-shot tuning loss",
                    "The diffusion loss at each tuning step (one random timestep each, so it jumps); the running mean "
                    "should fall as the tuned layers learn this video's motion, and a flat mean means the tuning "
                    "learnt little.", svg=svg)]


def _word_rows(rec: Recorder, tokenizer, prompt: str) -> tuple[list[torch.Tensor], list[str]]:
    """Per word of the prompt, its maps averaged over the recorded steps, as heat columns (C, 3, h', w'); the words."""
    if not rec.word_maps:
        return [], []
    mean = torch.stack(list(rec.word_maps.values())).mean(dim=0)  # (F, L', h', w')
    per_word, words = [], []
    for index, word in enumerate(prompt.split(" ")):
        positions = [p for p in word_positions(tokenizer, prompt, index) if p < mean.shape[1]]
        if word and positions:
            per_word.append(mean[:, positions].sum(dim=1))  # (F, h', w')
            words.append(word)
    if not per_word:
        return [], []
    maps = torch.stack(per_word)  # (words, F, h', w')
    return [torch.stack(_columns(heat(m, float(maps.max())))) for m in maps], words


def _columns(frames: torch.Tensor) -> list[torch.Tensor]:
    return list(frames[spaced(list(range(len(frames))), MAX_COLUMNS)])


def _padded(frames: torch.Tensor) -> torch.Tensor:
    """F − 1 pair pictures with a white first frame, so they line up under frames 1 … F − 1."""
    return torch.cat([torch.ones_like(frames[:1]), frames])


def _row(frames: torch.Tensor) -> torch.Tensor:
    return sheet(upscale(torch.stack(_columns(frames))[None]))
