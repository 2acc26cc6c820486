"""`CLIP`: the CLIP model with its tokenizer and image preprocessing, turning frames and prompts into embeddings.

CLIP's image preprocessing is that of transformers' CLIPImageProcessor (OpenAI's, in PIL terms), which the
papers' metric scripts run on the saved frames:

    8-bit RGB frame ─bicubic resize, shorter side to S─► centre crop S×S ─/255─► (x - mean) / std

The resize is Pillow's, on the 8-bit frames, as in the processor. torch's antialiased bicubic uses the same
kernel, but Pillow rounds and clips to 8 bits between its horizontal and vertical passes (choosing their
order itself), which moves edge pixels by up to several levels; scores made with it would not be the
papers' scores. Frames are therefore scored as the 8-bit images they are saved as.

Dimension legend: F frames, H x W frame size, S = 224 CLIP's input side, B prompts, P embedding width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .clip import CLIPModel
from .frames import check_frames
from .tokenizer import CLIPTokenizer
from .video import to_uint8

# OpenAI CLIP's normalisation (its training images' per-channel mean and std), used by every CLIP checkpoint
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Frames (F, 3, H, W) in [0, 1] -> CLIP's input (F, 3, size, size) float32 on the CPU.

    Equal to transformers' CLIPImageProcessor on the 8-bit frames: shorter side to `size` (bicubic), the
    longer side to int(size · long / short) (truncated, as transformers computes it), a centre crop whose
    odd pixel goes to the bottom/right, then CLIP's mean and std.
    """
    check_frames(frames, "clip_pixels: frames", values=True)
    H, W = frames.shape[-2:]
    long_side = int(size * max(H, W) / min(H, W))
    h, w = (size, long_side) if H <= W else (long_side, size)
    resized = [np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC))
               for frame in to_uint8(frames, "clip_pixels")]  # F × (h, w, 3) uint8
    top, left = (h - size) // 2, (w - size) // 2
    pixels = torch.from_numpy(np.stack(resized)[:, top:top + size, left:left + size])  # (F, S, S, 3)
    x = pixels.permute(0, 3, 1, 2).double() / 255  # (F, 3, S, S)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


@dataclass
class CLIP:
    model: CLIPModel
    tokenizer: CLIPTokenizer

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> text embeddings (B, P), float32 (float64 for a float64 model), not normalised."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.tokenizer.refuse_long(prompts)
        ids = self.tokenizer(prompts).to(self.device)  # (B, L)
        return self.model.encode_text(ids).to(self._out_dtype)

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor, batch: int = 32) -> torch.Tensor:
        """Frames (F, 3, H, W) in [0, 1] -> image embeddings (F, P), float32 (float64 for a float64 model),
        not normalised; `batch` frames per forward."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"encode_frames: batch must be a positive number of frames, got {batch!r}")
        pixels = clip_pixels(frames, self.model.config.vision.image_size)  # (F, 3, S, S)
        return torch.cat([self.model.encode_image(chunk.to(self.device, self.dtype)).to(self._out_dtype)
                          for chunk in pixels.split(batch)])

    @property
    def _out_dtype(self) -> torch.dtype:
        return torch.promote_types(self.dtype, torch.float32)  # fp16/bf16 models hand back float32 embeddings
