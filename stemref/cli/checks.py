"""Checks of settings that every command shares, made before any slow work: prompts, step counts, one library
check reported under its flag, and a warning for sizes far above SD1.5's."""
from __future__ import annotations

from collections.abc import Callable

from .errors import UserError, warn
from ..config import DDIMConfig
from ..scheduler import DDIMScheduler

HEAVY_SIDE = 1024  # pixels; above this, warn before work that the run will take very long or run out of memory


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

