"""`python -m stemref.txt2img`: the first thing to run to see that your weights work.

The library function is `stemref.txt2img` (in sampling.py); this module is the command only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from . import UserError, add_model_arguments, load_model, progress_printer, run
from ..files import atomic_path
from ..sampling import txt2img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemref.txt2img", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs="+", default=[512], metavar="PX", help="side, or height width")
    parser.add_argument("--out", type=Path, default=Path("txt2img.png"))
    add_model_arguments(parser)
    args = parser.parse_args(argv)

    def body():
        if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            raise UserError(f"--out {args.out}: use a .png, .jpg or .webp name")
        if len(args.size) > 2:
            raise UserError("--size takes one side or height and width")
        sd = load_model(args)
        size = args.size[0] if len(args.size) == 1 else tuple(args.size)
        image = txt2img(sd, args.prompt, args.negative_prompt, args.steps, args.guidance, args.seed, size,
                        progress=progress_printer("denoising"))
        pixels = (image[0].permute(1, 2, 0) * 255).round().byte().cpu().numpy()  # (H, W, 3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out) as tmp:
            Image.fromarray(pixels).save(tmp, format=Image.registered_extensions()[args.out.suffix.lower()])
        print(f"wrote {args.out}", file=sys.stderr)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
