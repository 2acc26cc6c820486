"""Checks of settings that every command shares, made before any slow work: prompts, step counts, seeds, frame
rates, STEM's number of bases, the input video's path, a cache folder, one library check reported under its
flag, and a warning for sizes far above SD1.5's."""
from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError, warn
from ..config import DDIMConfig
from ..scheduler import DDIMScheduler
from ..video import MAX_FPS, MIN_FPS

HEAVY_SIDE = 1024  # pixels; above this, warn before work that the run will take very long or run out of memory
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; the metadata and JSON of every output hold 63 bits


def check_prompt(text: str, flag: str = "--prompt") -> None:
    """Refuse text that is not valid UTF-8 (the shell passed bytes that do not decode) before any work."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{flag} is not valid UTF-8 text (bad byte at character {e.start}); retype {flag} "
                        "or set a UTF-8 locale (e.g. LANG=C.UTF-8)") from e


def checked(flag: str, check: Callable[[object], object], value: object) -> None:
    """A library check of one argument's value, its ValueError reported as a user error naming the flag."""
    try:
        check(value)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from e


def check_steps(steps: int, flag: str = "--steps") -> None:
    """Refuse a step count SD1.x's 1000-step schedule cannot take, before any slow work."""
    try:
        DDIMScheduler(DDIMConfig()).timesteps(steps)
    except ValueError as e:
        raise UserError(f"{flag} {steps}: {e}") from e


def warn_if_large(side: int, flag: str = "--size") -> None:
    """SD1.5 was trained at 512 px: far above, every step costs many times more time and memory."""
    if side > HEAVY_SIDE:
        warn(f"{flag} {side}: SD1.5 was trained at 512 px; each frame costs about {(side / 512) ** 2:.0f}× the time "
             "of a 512 px frame, and attention over all frames much more memory: expect hours")



def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{flag} {seed}: use a whole number from 0 to {MAX_SEED}")


def check_fps(fps: float | None, flag: str = "--fps") -> None:
    """None (the input's rate) or a rate the video writers store as given."""
    if fps is not None and not MIN_FPS <= fps <= MAX_FPS:
        raise UserError(f"{flag} {fps}: use a frame rate from {MIN_FPS} to {MAX_FPS}")


def check_num_bases(num_bases: int, frames: int, height: int, width: int, scope: int | None = None,
                    flag: str = "--num-bases") -> None:
    """STEM's K cannot exceed the tokens of one set of frames in its largest attention layer (latent h × w per
    frame): more bases than tokens are not an estimate of anything, and cost memory in K."""
    per_set = min(scope or frames, frames)
    tokens = per_set * (height // 8) * (width // 8)
    if num_bases > tokens:
        raise UserError(f"{flag} {num_bases}: a set of {per_set} frame(s) of {width}×{height} has {tokens} tokens in "
                        f"STEM's largest attention layer, so use at most {tokens} bases (STEM uses 256)")


def check_video_path(path: Path, flag: str = "VIDEO") -> None:
    """The video must be a regular file or a folder: a FIFO, device or socket would block reading forever."""
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file or folder; check the path (relative paths start at "
                        f"{Path.cwd()})")
    if not (path.is_file() or path.is_dir()):
        raise UserError(f"{flag} {path} is not a regular file or a folder (a pipe, device or socket); save the "
                        "video to a file first")


def check_cache_folder(path: Path, flag: str = "--cache") -> None:
    """A cache folder that exists as a folder (or can be made) and takes a new file, before any work: a run must
    not find out after an hour of inversion or tuning that it cannot keep the result."""
    ancestor = path.expanduser().absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a folder; give a folder, or pass --no-reuse")
    try:
        with tempfile.TemporaryFile(dir=ancestor):  # os.access says yes to root even on a read-only mount
            pass
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else "no permission to write" \
            if e.errno in (errno.EACCES, errno.EPERM) else "the disk is full" if e.errno == errno.ENOSPC \
            else e.strerror or str(e)
        raise UserError(f"{flag} {path}: cannot write in {ancestor} ({why}); choose another --cache, or pass "
                        "--no-reuse") from e


def check_free_space(path: Path, needed: int, what: str, flag: str = "--cache") -> None:
    """Refuse before the work when the disk holding `path` (or its nearest existing parent) has less than
    `needed` bytes free."""
    ancestor = path.expanduser().absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    if free < needed:
        raise UserError(f"{flag} {path}: the disk has {_amount(free)} free and {what} needs about "
                        f"{_amount(needed)}; free some space, choose another --cache, or pass --no-reuse")


def _amount(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} TB"
