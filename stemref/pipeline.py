"""`StableDiffusion`: the five SD1.x parts together, with the conversions between pixels, prompts and latents.

Frames are (F, 3, H, W) floats in [0, 1] everywhere in stemref's API; latents are (F, 4, H/8, W/8),
already multiplied by the VAE's scaling factor (0.18215), i.e. in the space the UNet denoises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .clip import CLIPTextModel
from .frames import check_frames
from .scheduler import DDIMScheduler
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL


@dataclass
class StableDiffusion:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> CLIP last hidden states (B, 77, 768). Over-long prompts are refused, not silently cut."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) \
            else [prompts]
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r:.60}")
        self.tokenizer.refuse_long(prompts)
        ids = self.tokenizer(prompts).to(self.device)  # (B, 77)
        return self.text_encoder(ids)

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor, batch: int = 8,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Frames (F, 3, H, W) in [0, 1] -> scaled posterior means (F, 4, H/8, W/8), `batch` frames at a time.

        `progress(frames done, F)` is called after each batch.
        """
        check_encodable(frames)
        latents = []
        for chunk in frames.split(batch):
            x = chunk.to(self.device, self.dtype) * 2 - 1
            latents.append(self.vae.encode(x).mean * self.vae.config.scaling_factor)
            if progress:
                progress(sum(map(len, latents)), len(frames))
        # contiguous: convolutions may hand back channels-last strides, and a saved-and-reloaded inversion
        # must denoise bit for bit like the one in memory
        return torch.cat(latents).contiguous()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch: int = 8,
                       progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Scaled latents (F, 4, h, w) -> frames (F, 3, 8h, 8w) in [0, 1] (float32), `batch` at a time.

        `progress(frames done, F)` is called after each batch.
        """
        check_latents(latents, self.vae.config.latent_channels)
        frames = []
        for chunk in latents.split(batch):
            x = self.vae.decode(chunk.to(self.device, self.dtype) / self.vae.config.scaling_factor)
            frames.append(((x.float() + 1) / 2).clamp(0, 1))
            if progress:
                progress(sum(map(len, frames)), len(latents))
        return torch.cat(frames)


def check_latents(latents: object, channels: int = 4) -> None:
    """TypeError/ValueError unless `latents` is a floating (F, channels, h, w) tensor: SD1.x latents have 4 channels."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError(f"latents must be a floating torch.Tensor (F, {channels}, h, w), got "
                        f"{latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    if latents.ndim != 4 or latents.shape[1] != channels or min(latents.shape) == 0:
        raise ValueError(f"latents must have shape (F, {channels}, h, w) (SD1.x latents have {channels} channels), "
                         f"got {tuple(latents.shape)}")


def check_encodable(frames: torch.Tensor) -> None:
    """Frames the VAE can encode: the stemref convention (finite, in [0, 1]), with sides that are multiples of 8."""
    check_frames(frames, values=True)
    H, W = frames.shape[-2:]
    if H % 8 or W % 8:
        raise ValueError(f"frame size {W}×{H} is not a multiple of 8; resize or crop it (stemref.video.read_video does)")
