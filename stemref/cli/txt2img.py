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
    parser.add_argument("--negative", default="", help="negative prompt: what it should not show (default: none)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the starting noise (default 0)")
    parser.add_argument("--size", type=int, default=None, metavar="PX",
                        help="a square image's side, a multiple of 8 (default 512)")
    parser.add_argument("--width", type=int, default=None, metavar="PX",
                        help="width, a multiple of 8; with --height, instead of --size (default: --size)")
    parser.add_argument("--height", type=int, default=None, metavar="PX",
                        help="height, a multiple of 8; with --width, instead of --size (default: --size)")
    parser.add_argument("--out", type=Path, default=Path("txt2img.png"),
                        help="image file: .png, .jpg or .webp (default txt2img.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_arguments(parser)
    args = parser.parse_args(argv)

    def body():
        # every argument is checked before the weights are loaded
        if args.out.suffix.lower() not in SUFFIXES:
            raise UserError(f"--out {args.out}: use a .png, .jpg or .webp name")
        size = _size(args)  # (height, width), as the library takes it; the flags name width and height
        flag = "--size" if args.width is None else "--width" if size[1] >= size[0] else "--height"
        checked("--size" if args.width is None else "--width/--height", check_size, size)
        checked("--guidance", check_guidance, args.guidance)
        warn_if_large(max(size), flag)
        check_steps(args.steps)
        check_seed(args.seed)
        check_prompt(args.prompt)
        check_prompt(args.negative, "--negative")
        check_output_file(args.out, args.overwrite, model_inputs(args))
        check_model_arguments(args)
        with progress_printer("loading weights", "part") as report:
            sd = load_model(args, progress=report)
        for text, flag in ((args.prompt, "--prompt"), (args.negative, "--negative")):
            checked(flag, sd.tokenizer.refuse_long, [text])
        with progress_printer("denoising") as report:
            image = txt2img(sd, args.prompt, args.negative, args.steps, args.guidance, args.seed, size,
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


def _size(args: argparse.Namespace) -> tuple[int, int]:
    """(height, width) from --size or from --width and --height, never both: one size order, width first, as
    in every other command."""
    if (args.width is None) != (args.height is None):
        raise UserError("--width and --height go together; or give one --size for a square image")
    if args.width is not None:
        if args.size is not None:
            raise UserError("give --size (a square) or --width and --height, not both")
        return args.height, args.width
    side = 512 if args.size is None else args.size
    return side, side
