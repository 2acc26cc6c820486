"""Video metrics: PSNR and SSIM between two videos, and temporal consistency of one video's UNet features.

Dimension legend:
  F  frames, C = 3 RGB channels, H x W frame size
  Inputs a, b: (F, 3, H, W) floating point, values in [0, 1] (data range 1).
  Features: (F, Cf, h, w), Cf feature channels on an h x w grid (the latent grid H/8 x W/8 or coarser).
  Flow: (F - 1, 2, H', W'), (dx, dy) in pixels of its own H' x W' grid.

Both metrics are computed per frame and then averaged over frames, as video-editing papers report them
(STEM's Tables A1-A3, FateZero, TokenFlow): a video's PSNR is the mean of its frames' PSNRs, not the PSNR
of the pooled error. All arithmetic is float64 whatever the input dtype: fp16 cannot even hold the squared
error of a good reconstruction (1e-5 is below its normal range), and SSIM subtracts nearly equal moments.

SSIM follows Wang et al. 2004 with the usual constants, and matches
skimage.metrics.structural_similarity(a, b, data_range=1, channel_axis=..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False):
  - local statistics under an 11x11 Gaussian window, sigma 1.5, normalised to sum 1 (applied as two 1-D
    passes, which is the same window because the Gaussian is separable);
  - 'valid' windows only (no padding): the SSIM map is (H - 10) x (W - 10);
  - population (biased) variances and covariance: E[x^2] - E[x]^2;
  - C1 = (0.01 * 1)^2, C2 = (0.03 * 1)^2;
  - a frame's SSIM is the mean of the map over positions and over the three channels.

Temporal consistency (STEM, Fig. 6 and Fig. A3): how similar each frame's features are to the previous
frame's, position by position. `unet_features` takes the features where the paper does, at the output of
the last decoder self-attention layer, and `temporal_consistency` averages the cosine similarity of
consecutive frames' feature vectors, optionally after warping the previous frame along optical flow so that
the same scene point is compared (without flow, motion alone lowers the score).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.nn.functional import conv2d

from .attention import RunInfo
from .frames import check_frames

if TYPE_CHECKING:
    from .pipeline import StableDiffusion

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# STEM's Fig. A3 layer: the self-attention of the last transformer block of the UNet's last decoder level
LAST_DECODER_SELF_ATTENTION = "up_blocks.3.attentions.2.transformer_blocks.0.attn1"
COSINE_EPS = 1e-8  # a zero feature vector has cosine 0 with everything instead of 0/0


@torch.no_grad()
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of the per-frame PSNR (dB, data range 1) between videos a and b (F, 3, H, W).

    A frame with zero error has infinite PSNR, so identical videos (or any identical frame) give inf.
    """
    _check_pair(a, b, "psnr")
    per_frame = []
    for x, y in zip(a, b):  # frame by frame: a float64 copy of one frame at a time
        mse = (x.double() - y.double()).square().mean()
        per_frame.append(-10 * torch.log10(mse))  # 10 log10(1² / mse); mse = 0 gives +inf
    return torch.stack(per_frame).mean().item()


@torch.no_grad()
def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of the per-frame SSIM (Gaussian 11x11 window, sigma 1.5, valid region, RGB averaged)."""
    _check_pair(a, b, "ssim")
    if min(a.shape[2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim: frames must be at least {SSIM_WINDOW}x{SSIM_WINDOW} (one full window), got {tuple(a.shape[2:])}"
        )
    window = _gaussian_window(a.device)
    per_frame = [_ssim_frame(x.double(), y.double(), window) for x, y in zip(a, b)]
    return torch.stack(per_frame).mean().item()


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian (SSIM_WINDOW,) in float64; its outer product is the 2-D window."""
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    weights = torch.exp(-offsets.square() / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()


def _local_mean(maps: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted mean over every full window: (N, 1, H, W) -> (N, 1, H - 10, W - 10)."""
    maps = conv2d(maps, window.view(1, 1, 1, -1))  # (N, 1, H, W - 10)
    return conv2d(maps, window.view(1, 1, -1, 1))  # (N, 1, H - 10, W - 10)


def _ssim_frame(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """SSIM of one frame pair x, y (3, H, W) float64: mean of the SSIM map over channels and positions."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    channels = x.shape[0]
    # one convolution call for the five local moments of every channel
    stacked = torch.cat([x, y, x * x, y * y, x * y]).unsqueeze(1)  # (5·3, 1, H, W)
    local = _local_mean(stacked, window)  # (5·3, 1, H', W'), H' = H - 10, W' = W - 10
    moments = local.view(5, channels, *local.shape[2:])  # (5, 3, H', W')
    mu_x, mu_y, e_xx, e_yy, e_xy = moments
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).mean()


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    check_frames(a, f"{name}: a", values=True, tolerance=0)
    check_frames(b, f"{name}: b", values=True, tolerance=0)
    if a.shape != b.shape:
        raise ValueError(f"{name}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name}: a is on {a.device} but b is on {b.device}; move both to one device")


@torch.no_grad()
def temporal_consistency(features: torch.Tensor, flow: torch.Tensor | None = None) -> float:
    """Mean cosine similarity between consecutive frames' feature vectors (F, C, h, w), in [-1, 1].

    For every pair (i, i + 1) the cosine of the C-vectors at each position is averaged over positions; the
    video's score is the mean over the F - 1 pairs. Identical frames score 1.

    `flow` (F - 1, 2, H', W'), optional, aligns frame i with frame i + 1 before the comparison (Fig. A3).
    flow[i] is the *backward* flow from frame i + 1 to frame i: the scene point at pixel p = (x, y) of frame
    i + 1 is at p + flow[i][:, y, x] in frame i ((dx, dy) in pixels of the flow's H' x W' grid). That is
    the direction backward warping needs (each position of frame i + 1 looks up where it came from), and what
    an optical-flow network returns when given (frame i + 1, frame i). The flow is resized to the feature
    grid with its displacements scaled by w / W' and h / H', frame i's features are sampled bilinearly there
    (grid_sample), and positions whose source falls outside frame i are left out of the average.
    Arithmetic is float32, or float64 for float64 input.
    """
    _check_features(features, flow)
    dtype = torch.promote_types(features.dtype, torch.float32)
    if flow is not None:
        flow = _flow_on_grid(flow.to(features.device, dtype), features.shape[-2:])  # (F - 1, 2, h, w)
    per_pair = []
    for i in range(features.shape[0] - 1):  # pair by pair: one warped copy of one frame at a time
        previous, current = features[i].to(dtype), features[i + 1].to(dtype)  # (C, h, w)
        valid = None
        if flow is not None:
            previous, valid = _warp(previous, flow[i])
        cosine = (previous * current).sum(0) / (previous.norm(dim=0) * current.norm(dim=0)).clamp_min(COSINE_EPS)
        if valid is None:
            per_pair.append(cosine.mean())
        elif not valid.any():
            raise ValueError(f"temporal_consistency: flow[{i}] moves every position of frame {i + 1} outside frame"
                             f" {i}; check the flow's direction (frame i + 1 -> frame i) and units (pixels)")
        else:
            per_pair.append(cosine[valid].mean())
    return torch.stack(per_pair).mean().item()


def _flow_on_grid(flow: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Resize a pixel flow (n, 2, H', W') to the grid (h, w), displacements rescaled to that grid's pixels."""
    h, w = size
    H, W = flow.shape[-2:]
    if (H, W) == (h, w):
        return flow
    flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)  # (n, 2, h, w)
    # with pixel centres at (x + 0.5) * w / W - 0.5, a displacement of dx image pixels is dx * w / W here
    scale = torch.tensor([w / W, h / H], dtype=flow.dtype, device=flow.device)
    return flow * scale.view(1, 2, 1, 1)


def _warp(x: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample x (C, h, w) at p + flow(p) for every position p; also which sources lie inside the frame (h, w)."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype, device=x.device),
                            torch.arange(w, dtype=x.dtype, device=x.device), indexing="ij")  # (h, w) each
    src_x, src_y = xs + flow[0], ys + flow[1]  # (h, w): pixel coordinates in the previous frame
    # grid_sample's [-1, 1] coordinates put pixel centres at (2x + 1) / w - 1 when align_corners=False
    grid = torch.stack([(2 * src_x + 1) / w - 1, (2 * src_y + 1) / h - 1], dim=-1)  # (h, w, 2)
    warped = F.grid_sample(x[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)
    valid = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
    return warped[0], valid  # (C, h, w), (h, w)


def _check_features(features: torch.Tensor, flow: torch.Tensor | None) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 4 or min(features.shape) == 0:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"temporal_consistency: features must be a tensor (F, C, h, w), got {shape};"
                         " unet_features(sd, frames, prompt) makes one")
    if features.shape[0] < 2:
        raise ValueError(f"temporal_consistency: needs at least 2 frames to compare, got {features.shape[0]}")
    if not features.is_floating_point() or not torch.isfinite(features).all():
        raise ValueError(f"temporal_consistency: features must be finite floating point values, got {features.dtype}"
                         " (or NaN/inf values)")
    if flow is None:
        return
    expected = (features.shape[0] - 1, 2)
    if not isinstance(flow, torch.Tensor) or flow.ndim != 4 or tuple(flow.shape[:2]) != expected or min(flow.shape) == 0:
        shape = tuple(flow.shape) if isinstance(flow, torch.Tensor) else type(flow).__name__
        raise ValueError(f"temporal_consistency: flow must be (F - 1, 2, H', W') = ({expected[0]}, 2, H', W') for"
                         f" {features.shape[0]} frames, got {shape}; flow[i] is (dx, dy) from frame i + 1 to frame i")
    if not flow.is_floating_point() or not torch.isfinite(flow).all():
        raise ValueError("temporal_consistency: flow must be finite floating point displacements in pixels")


@torch.no_grad()
def unet_features(sd: StableDiffusion, frames: torch.Tensor, prompt: str, layer: str = LAST_DECODER_SELF_ATTENTION,
                  t: int = 1, batch: int = 8, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The output of UNet module `layer` for each frame (F, C, h', w'), with h' x w' that layer's grid.

    Frames (F, 3, H, W) in [0, 1] are encoded to clean latents and the UNet runs once, `batch` frames per
    call, at timestep `t` with the prompt: no noise is added, and t = 1, the first timestep of the 50-step
    DDIM path (noise std sqrt(1 - alpha_bar_1) = 0.04), is the timestep at which clean latents are what the
    UNet expects. The UNet runs with whatever attention processors are installed (plain attention unless
    the caller is inside `sd.unet.attention(...)`), so the features describe the frames, not an inversion.
    `layer` is a module name of sd.unet whose output is tokens (B, h'·w', C) (attention layers, transformer
    blocks) or a map (B, C, h', w') (ResNets, Transformer2DModel). `progress(frames done, F)` follows the
    UNet calls.
    """
    try:
        module = sd.unet.get_submodule(layer)
    except AttributeError as e:
        raise ValueError(f"unet_features: the UNet has no module {layer!r}; attention layers are named like "
                         f"{LAST_DECODER_SELF_ATTENTION!r} (see sd.unet.attention_layers)") from e
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"unet_features: batch must be a positive number of frames per UNet call, got {batch!r}")
    latents = sd.encode_frames(frames)  # (F, 4, h, w)
    cond = sd.encode_prompt(prompt)  # (1, L, D)
    grid = latents.shape[-2:]
    outputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        outputs.append(_as_map(output, grid, layer))

    handle = module.register_forward_hook(keep)
    try:
        for chunk in latents.split(batch):
            sd.unet(chunk, t, cond.expand(chunk.shape[0], -1, -1), RunInfo(frames=chunk.shape[0]))
            if progress:
                progress(sum(map(len, outputs)), len(latents))
    finally:
        handle.remove()
    return torch.cat(outputs)  # (F, C, h', w')


def _as_map(output: torch.Tensor, grid: torch.Size, layer: str) -> torch.Tensor:
    """A layer's output as feature maps (B, C, h', w'); token outputs are unflattened onto their grid."""
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return output
    if not isinstance(output, torch.Tensor) or output.ndim != 3:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"unet_features: {layer!r} outputs {shape}, not tokens (B, N, C) or maps (B, C, h, w);"
                         " choose an attention layer, a transformer block or a ResNet")
    B, N, C = output.shape
    h, w = grid
    while h * w > N:  # each UNet level halves the grid with a stride-2, padding-1 conv: ceil(h / 2)
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != N:
        raise ValueError(f"unet_features: {layer!r} outputs {N} tokens, which is no level of a {grid[0]}x{grid[1]}"
                         " latent grid")
    return output.reshape(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h', w')
