"""What the walkthrough scripts share: the tiny model, a few frames of the shipped clip, text pictures of maps."""
from __future__ import annotations

from pathlib import Path

import torch

import stemref
from stemref.video import read_video

CLIP = Path(__file__).resolve().parents[1] / "bunny.mp4"
PROMPT = "a big grey rabbit stretching on a grassy hill"
SHADES = " .:-=+*#%@"


def tiny(dtype: torch.dtype = torch.float64, gentle: bool = False) -> stemref.StableDiffusion:
    """A tiny random-weight SD1.5-layout model (stemref.tiny_model): the pipeline runs, the pictures mean nothing.

    `gentle` scales the UNet's output layer by 0.02. The random UNet's ε changes far faster with x than a
    trained UNet's, so DDIM steps of tens of steps are nowhere near small; scaled, it is in the small-step
    regime a trained model is in (the inversion tests do the same).
    """
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
    sd = stemref.tiny_model(seed=0, dtype=dtype)
    if gentle:
        with torch.no_grad():
            sd.unet.conv_out.weight.mul_(0.02)
            sd.unet.conv_out.bias.mul_(0.02)
    return sd


def frames(count: int = 4, size: int = 64) -> torch.Tensor:
    """`count` frames of examples/bunny.mp4, square, size × size: (F, 3, size, size) in [0, 1]."""
    return read_video(CLIP, stride=3, count=count, size=size, square=True)


def picture(m: torch.Tensor) -> list[str]:
    """A 2-D map (h, w) as h lines of characters, darkest = smallest, scaled to the map's own range."""
    m = m.double()
    m = (m - m.min()) / (m.max() - m.min() + 1e-12)
    index = (m * (len(SHADES) - 1)).round().long()
    return ["".join(SHADES[i] * 2 for i in row) for row in index.tolist()]


def side_by_side(titles: list[str], maps: list[torch.Tensor]) -> str:
    """Several maps of one size printed next to each other under their titles."""
    pictures = [picture(m) for m in maps]
    width = len(pictures[0][0])
    lines = ["   ".join(t[:width].ljust(width) for t in titles)]
    lines += ["   ".join(rows) for rows in zip(*pictures)]
    return "\n".join(lines)
