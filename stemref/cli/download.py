"""`python -m stemref.download`: fetch SD1.5 (or a CLIP) for stemref. The downloader itself is stemref/download/."""
from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import EXIT_INTERRUPTED, ArgumentParser, Interrupted, run
from .progress import progress_printer
from ..download import DEFAULT_BASE_URL, MODELS, VARIANTS, DownloadError, Progress, download


def stderr_progress(line: progress_printer) -> Callable[[Progress], None]:
    """One line per file, redrawn in place while it downloads."""
    def show(p: Progress) -> None:
        mb = 1e6
        if p.status == "skipped":
            line.end()
            print(f"{p.path}: already complete, skipped", file=sys.stderr, flush=True)
            return
        total = f"/{p.total / mb:.1f}" if p.total is not None else ""
        text = f"{p.path}: {p.done / mb:.1f}{total} MB"
        if p.status == "downloading":
            text += f"  {p.rate / mb:.1f} MB/s"
        line.show(f"{text:<90}")
        if p.status == "done":
            line.end()
    return show


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stemref.download",
                                     description="Fetch the files of Stable Diffusion 1.5 (or of a CLIP) that stemref "
                                                 "needs (see weights/README.md).")
    parser.add_argument("--model", choices=MODELS, default="sd15",
                        help="sd15 (default), or a CLIP for the editing metrics (python -m stemref.evaluate)")
    parser.add_argument("--to", type=Path, default=None, help="folder to fill (default weights/<model>)")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="sd15 only: fp16 (default) is half the size")
    parser.add_argument("--hub-url", default=DEFAULT_BASE_URL,
                        help=f"hub or mirror address (default {DEFAULT_BASE_URL})")
    parser.add_argument("--repo", default=None, help="hub repository (default: the model's)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    parser.add_argument("--token", default=None, help="hub access token (default: $HF_TOKEN)")
    parser.add_argument("--pin", action="append", default=[], metavar="PATH=SHA256",
                        help="the sha256 a file must have, e.g. for a mirror that sends none; repeat per file "
                             "(default: the hub's own)")
    args = parser.parse_args(argv)
    if args.variant is not None and args.model != "sd15":
        parser.error(f"--variant applies to sd15 only; {args.model} has one safetensors file")
    repo, files, to = MODELS[args.model]
    token = args.token or os.environ.get("HF_TOKEN") or None

    def body():
        if bad := [pin for pin in args.pin if "=" not in pin]:
            raise ValueError(f"--pin {bad[0]}: give PATH=SHA256, e.g. unet/config.json=<64 hex digits>")
        pins = dict(pin.split("=", 1) for pin in args.pin)
        try:
            with progress_printer("download") as line:
                folder = download(args.to or to, args.variant or "fp16", args.hub_url, args.repo or repo,
                                  args.revision, progress=stderr_progress(line), token=token, files=files,
                                  pins=pins)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the .part files stay for the next run
            raise Interrupted(getattr(e, "exit_code", EXIT_INTERRUPTED), "run the same command again to resume") from e
        if args.model != "sd15":
            print(f"CLIP ({args.model}) is in {folder}\nScore an edit with it:\n  python -m stemref.evaluate EDITED "
                  f"--source-video SOURCE --prompt \"...\" --source-prompt \"...\" --clip {shlex.quote(str(folder))}",
                  file=sys.stderr)
            return
        print(f"SD1.5 ({args.variant or 'fp16'}) is in {folder}\nTry it:\n  python -m stemref.txt2img --weights "
              f"{shlex.quote(str(folder))} --prompt \"a photograph of an astronaut riding a horse\"", file=sys.stderr)

    return run(body, failures=(DownloadError,))



if __name__ == "__main__":
    sys.exit(main())
