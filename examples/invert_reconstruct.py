"""STEM inversion of a clip, then the reconstruction that shows how much of the video the inversion kept.

    python examples/invert_reconstruct.py weights/sd15 examples/bunny.mp4 "a big grey rabbit stretching on a grassy hill"

Inversion runs DDIM backwards, frames -> noise x_T; reconstruction runs it forwards again, x_T -> frames.
A perfect inversion gives back the input; PSNR and SSIM say how close we got (STEM's Table A3).
"""
import argparse
from pathlib import Path

import torch

import stemref
from stemref.metrics import psnr, ssim
from stemref.video import read_video, side_by_side, write_video

parser = argparse.ArgumentParser()
parser.add_argument("weights", type=Path, help="SD1.5 folder or .safetensors file")
parser.add_argument("video", type=Path, help="any video file, or a folder of images")
parser.add_argument("prompt", help="a caption of the video: inversion is conditioned on it")
parser.add_argument("--frames", type=int, default=8)
parser.add_argument("--size", type=int, default=512)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--out", default="side_by_side.mp4")
args = parser.parse_args()
if not args.weights.exists():
    raise SystemExit(f"no weights at {args.weights}; get them with: python -m stemref.download --to {args.weights}")

device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
sd = stemref.load(args.weights, dtype=dtype, device=device)

# (F, 3, H, W) floats in [0, 1]; square crops of side `size` (a multiple of 8, as the VAE needs)
frames = read_video(args.video, count=args.frames, size=args.size, square=True)

# context="stem": every frame's self-attention looks at 256 bases estimated by EM from *all* frames
inversion = stemref.invert(sd, frames, args.prompt, steps=args.steps, context="stem")
print(f"inverted {len(frames)} frames: latents {tuple(inversion.latents.shape)} (steps + 1, F, 4, h, w)")

# the same prompt, context and steps, run forwards from x_T
recon = stemref.reconstruct(sd, inversion).cpu()
print(f"PSNR {psnr(recon, frames):.2f} dB, SSIM {ssim(recon, frames):.4f} (higher is closer to the input)")

write_video(args.out, side_by_side(frames, recon), fps=8)  # input | reconstruction
print(f"wrote {args.out}")
