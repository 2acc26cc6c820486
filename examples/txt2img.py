"""Text to image with stemref: load SD1.5, denoise from random noise, save a PNG.

    python examples/txt2img.py weights/sd15 "a watercolor painting of a fox" [--out fox.png]
"""
import argparse
from pathlib import Path

import torch
from PIL import Image

import stemref

parser = argparse.ArgumentParser()
parser.add_argument("weights", type=Path, help="SD1.5 folder or .safetensors file")
parser.add_argument("prompt")
parser.add_argument("--out", default="txt2img.png")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=512)
args = parser.parse_args()
if not args.weights.exists():
    raise SystemExit(f"no weights at {args.weights}; get them with: python -m stemref.download --to {args.weights}")

# fp16 halves memory and time on a GPU; CPUs are fastest (and only exact) in fp32
device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
sd = stemref.load(args.weights, dtype=dtype, device=device)
image = stemref.txt2img(sd, args.prompt, steps=args.steps, seed=0, size=args.size)  # (1, 3, H, W) in [0, 1]
pixels = (image[0].permute(1, 2, 0) * 255).round().byte().cpu().numpy()  # (H, W, 3): what PIL wants
Image.fromarray(pixels).save(args.out)
print(f"wrote {args.out}")
