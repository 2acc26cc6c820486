"""`python -m stemref.txt2img`: the first thing to run to see that your weights work.

    python -m stemref.txt2img --weights W --prompt "..." --out OUT.png
        OUT.png (or .jpg, .webp)   one image; an existing file is replaced only with --overwrite

The library function is `stemref.txt2img` (in sampling.py); this module is the command only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from .checks import check_prompt, check_seed, check_steps, checked, warn_if_large
from .errors import ArgumentParser, Conflict, UserError, run
from .model import add_model_arguments, check_model_arguments, load_model, model_inputs
from .output import check_output_file, free_name
from .progress import progress_printer
from ..files import atomic_path
from ..sampling import check_guidance, check_size, txt2img

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stemref.txt2img", description=__doc__.split("\n\nThe")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="what the image shows")
    parser.add_argument("--negative-prompt", default="", help="what it should not show (default: none)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the starting noise (default 0)")
    parser.add_argument("--size", type=int, nargs="+", default=[512], metavar="PX",
                        help="side, or height width, multiples of 8 (default 512)")
    parser.add_argument("--out", type=Path, default=Path("txt2img.png"),
                        help="image file: .png, .jpg or .webp (default txt2img.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_arguments(parser)
    args = parser.parse_args(argv)

    def body():
        # every argument is checked before the weights are loaded
        if args.out.suffix.lower() not in SUFFIXES:
            raise UserError(f"--out {args.out}: use a .png, .jpg or .webp name")
        if len(args.size) > 2:
            raise UserError("--size takes one side or height and width")
        size = args.size[0] if len(args.size) == 1 else tuple(args.size)
        checked("--size", check_size, size)
        checked("--guidance", check_guidance, args.guidance)
        warn_if_large(max(args.size))
        check_steps(args.steps)
        check_seed(args.seed)
        check_prompt(args.prompt)
        check_prompt(args.negative_prompt, "--negative-prompt")
        check_output_file(args.out, args.overwrite, model_inputs(args))
        check_model_arguments(args)
        with progress_printer("loading weights", "part") as report:
            sd = load_model(args, progress=report)
        with progress_printer("denoising") as report:
            image = txt2img(sd, args.prompt, args.negative_prompt, args.steps, args.guidance, args.seed, size,
                            progress=report)
        pixels = (image[0].permute(1, 2, 0) * 255).round().byte().cpu().numpy()  # (H, W, 3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image_format = Image.registered_extensions()[args.out.suffix.lower()]
        try:
            with atomic_path(args.out, replace=args.overwrite) as tmp:
                Image.fromarray(pixels).save(tmp, format=image_format)
        except FileExistsError:  # --out appeared during the run: keep it, and keep the image too
            kept = free_name(args.out)
            with atomic_path(kept, replace=False) as tmp:
                Image.fromarray(pixels).save(tmp, format=image_format)
            raise Conflict(f"--out {args.out} was created while this run worked, so it was left as it is; the "
                           f"image is in {kept}") from None
        print(f"wrote {args.out}", file=sys.stderr)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
