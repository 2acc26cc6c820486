"""Errors and exit codes, the same for every command: `run(body)` turns every failure a user can meet into one
line on stderr and an exit code (2 for bad input, 1 for a failing disk or network, 130 for Ctrl-C, 143 for
SIGTERM, which is handled like Ctrl-C); `warn` prints a warning line."""
from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import torch

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what shells report for a process ended by SIGTERM


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals (`--steps 2.5`, a missing option) are one line and exit code 2, like every other
    refusal, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


class UserError(Exception):
    """A problem with the command's input, reported as one line and exit code 2."""


class Conflict(Exception):
    """Something outside the run took its output's place meanwhile; the message says where the result is. Exit 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `note` says what was kept (e.g. finished --compare contexts) for the next run."""

    def __init__(self, exit_code: int = EXIT_INTERRUPTED, note: str = ""):
        super().__init__(note)
        self.exit_code, self.note = exit_code, note




def run(main: Callable[[], None], failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run a CLI body; turn every expected failure into one message on stderr and an exit code.

    User errors exit 2, OSError (disk full, permission denied) and `failures` exit 1, Ctrl-C 130 and
    SIGTERM 143; in both cases the body's `with` blocks clean up first, as for any exception.
    """
    with _sigterm_as_interrupt():
        try:
            main()
        except (UserError, ValueError, FileNotFoundError) as e:  # the library's bad-input errors
            return _fail(str(e), EXIT_USAGE)
        except OSError as e:
            return _fail(describe_os_error(e), EXIT_FAILURE)
        except (MemoryError, torch.OutOfMemoryError):
            return _fail("out of memory; use a smaller --size, fewer --frames, or fp16 on a GPU", EXIT_FAILURE)
        except (Conflict, *failures) as e:
            return _fail(str(e), EXIT_FAILURE)
        except KeyboardInterrupt as e:
            note = getattr(e, "note", "") or "partial output was removed"
            print(f"interrupted; {note}", file=sys.stderr, flush=True)
            return getattr(e, "exit_code", EXIT_INTERRUPTED)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (timeout, kill, schedulers, containers) raises Interrupted, so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_os_error(e: OSError) -> str:
    """One line naming the file and the fix for the OS errors that users meet."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full (writing{where}); free some space or write to another disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}; choose a location you can write to, or fix its permissions"
    if e.errno == errno.EROFS:
        return f"read-only file system:{where}; write somewhere else"
    if e.errno == errno.ENOTDIR:
        return f"a path component is a file, not a folder:{where}"
    return f"{e.strerror or e}:{where}" if e.strerror else str(e)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)

