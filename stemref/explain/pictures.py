"""Pictures of what each method computes: pure functions from recorded tensors to frames (F, 3, h, w) in [0, 1].

The frames are at the grid of the layer they come from (a token is a pixel); `upscale` enlarges them for
display without blurring tokens together. Plots (loss, similarity, keyframes) are SVG: plots.py.

Dimension legend: F frames, h heads, h' × w' a layer's token grid, C feature channels, K bases, L text tokens.
"""
from __future__ import annotations

import colorsys
import math

import torch
import torch.nn.functional as F

GOLDEN = (math.sqrt(5) - 1) / 2  # hue step: consecutive bases get far-apart hues


def palette(n: int) -> torch.Tensor:
    """(n, 3) fixed, distinct colours: hues by the golden ratio, three alternating lightness/saturation bands,
    so colour k is the same in every frame, layer and run."""
    bands = ((0.95, 0.85), (0.75, 0.55), (0.55, 0.95))  # (value, saturation)
    rgb = [colorsys.hsv_to_rgb((k * GOLDEN) % 1.0, bands[k % 3][1], bands[k % 3][0]) for k in range(n)]
    return torch.tensor(rgb, dtype=torch.float32)


def basis_frames(assignments: torch.Tensor, num_bases: int) -> torch.Tensor:
    """STEM bases made visible: each token (F, h', w') painted in its basis' palette colour -> (F, 3, h', w')."""
    if assignments.dtype.is_floating_point or assignments.ndim != 3:
        raise ValueError(f"assignments must be integer basis indices (F, h', w'), got {tuple(assignments.shape)} "
                         f"{assignments.dtype}")
    if assignments.numel() and not 0 <= int(assignments.min()) <= int(assignments.max()) < num_bases:
        raise ValueError(f"assignments must lie in [0, {num_bases}); got {int(assignments.min())}…"
                         f"{int(assignments.max())}")
    return palette(num_bases)[assignments.long()].permute(0, 3, 1, 2)  # (F, 3, h', w')


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """STEM Fig. 6: the first three principal components of features (F, C, h', w') as RGB (F, 3, h', w').

    One PCA is fitted jointly on the tokens of all frames (so a colour means the same in every frame), in
    float64, from the C × C scatter matrix (its size does not grow with the video); each component is scaled to
    [0, 1] by its minimum and maximum over the video. A component's sign is fixed so that its largest loading
    is positive (the decomposition alone leaves it arbitrary).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (F, C, h', w'), got {tuple(features.shape)}")
    frames, channels, h, w = features.shape
    tokens = features.double().permute(0, 2, 3, 1).reshape(-1, channels)  # (F·h'·w', C)
    centred = tokens - tokens.mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # columns: directions, by ascending variance
    axes = vectors.flip(1)[:, :3].T  # (≤3, C): the largest first
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))  # (≤3, 1)
    scores = centred @ (axes * signs).T  # (F·h'·w', ≤3)
    if scores.shape[1] < 3:  # fewer than 3 channels: pad with grey
        scores = torch.cat([scores, scores.new_zeros(len(scores), 3 - scores.shape[1])], dim=1)
    low, high = scores.min(dim=0).values, scores.max(dim=0).values
    rgb = (scores - low) / (high - low).clamp_min(1e-12)  # (F·h'·w', 3)
    return rgb.float().view(frames, h, w, 3).permute(0, 3, 1, 2)  # (F, 3, h', w')


def similarity_frames(features: torch.Tensor) -> torch.Tensor:
    """Per position, the cosine of frame i's and frame i + 1's feature vectors (F, C, h', w') -> grey
    (F − 1, 3, h', w'), black at 0 or less, white at 1 (STEM Fig. 6's last column, without flow warping)."""
    a, b = features[:-1].double(), features[1:].double()
    cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)  # (F − 1, h', w')
    return cosine.clamp(0, 1).float()[:, None].expand(-1, 3, -1, -1)


def heat(maps: torch.Tensor, peak: float | None = None) -> torch.Tensor:
    """Maps (..., h', w') ≥ 0 as colours (..., 3, h', w'): black, red, yellow, white as the value rises to `peak`
    (default: the maximum of all maps, so maps compare across frames and steps)."""
    peak = float(maps.max()) if peak is None else peak
    x = (maps.float() / max(peak, 1e-12)).clamp(0, 1)
    return torch.stack([(3 * x).clamp(max=1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)], dim=-3)


def mask_frames(masks: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean masks (F, 1, h, w) as white on black, or, given frames (F, 3, H, W), the frames darkened outside
    the mask (the mask resized to the frames with nearest neighbours)."""
    m = masks.float()
    if frames is None:
        return m.expand(-1, 3, -1, -1)
    m = F.interpolate(m, size=frames.shape[-2:], mode="nearest")  # (F, 1, H, W)
    return frames.float().cpu() * (0.25 + 0.75 * m)


def position_colours(h: int, w: int) -> torch.Tensor:
    """(3, h, w): a token's colour names its place: red grows to the right, green downwards, blue towards
    the top left."""
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    return torch.stack([xs, ys, 1 - (xs + ys) / 2])


def correspondence_frames(nearest: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """TokenFlow's correspondence field: each token of each frame (F, h', w') holds the index of a keyframe token
    on the keyframe's grid (h', w'); paint it with that token's `position_colours` -> (F, 3, h', w')."""
    h, w = grid
    colours = position_colours(h, w).flatten(1)  # (3, h'·w')
    if nearest.numel() and not 0 <= int(nearest.min()) <= int(nearest.max()) < h * w:
        raise ValueError(f"nearest must index a {h}×{w} grid")
    return colours[:, nearest.long()].permute(1, 0, 2, 3)  # (F, 3, h', w')


def upscale(frames: torch.Tensor, min_side: int = 96) -> torch.Tensor:
    """Frames (..., 3, h, w) enlarged by a whole factor (nearest neighbours: a token stays a square) until the
    shorter side is at least `min_side`."""
    factor = max(1, math.ceil(min_side / min(frames.shape[-2:])))
    if factor == 1:
        return frames
    lead = frames.shape[:-3]
    big = F.interpolate(frames.reshape(-1, *frames.shape[-3:]).float(), scale_factor=factor, mode="nearest")
    return big.view(*lead, *big.shape[-3:])


def sheet(rows: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """A grid of pictures (R, C, 3, h, w) as one image (3, R·(h+gap)−gap, C·(w+gap)−gap) on white."""
    R, C, _, h, w = rows.shape
    out = torch.ones(3, R * (h + gap) - gap, C * (w + gap) - gap)
    for r in range(R):
        for c in range(C):
            out[:, r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = rows[r, c]
    return out


def spaced(items: list, count: int) -> list:
    """At most `count` items, evenly spaced, the first and the last included."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]
