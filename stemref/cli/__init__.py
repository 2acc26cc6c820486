"""What the command-line tools share, so that every command behaves the same way:

- `run(body)`: one line on stderr and a non-zero exit code for every failure a user can meet (2 for bad
  input, 1 for a failing disk or network, 130 for Ctrl-C, 143 for SIGTERM, which is handled like Ctrl-C);
- `output_folder(out, overwrite, inputs)`: write into a hidden partial folder that becomes `out` only at the
  end; `--overwrite` replaces only a folder that stemref wrote (it holds the MARKER file), never one that
  holds or is an input, and stale partial folders of killed runs are removed by the next run;
- `check_output_file` for commands that write one file; `progress_printer` for every slow stage;
- `add_model_arguments` / `check_model_arguments` / `load_model`: --weights, --device, --dtype
  (`add_device_arguments` / `check_device` / `chosen_dtype` for commands that load no SD weights).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import DDIMConfig, NotSD1Error
from ..loading import WeightsError, load
from ..pipeline import StableDiffusion
from ..scheduler import DDIMScheduler
from ..tokenizer import TokenizerFilesError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}  # fp64: exact CPU checks
HEAVY_SIDE = 1024  # pixels; above this, warn before work that the run will take very long or run out of memory
MARKER = ".stemref-output"  # written into every output folder; --overwrite replaces only folders holding it
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what shells report for a process ended by SIGTERM


class UserError(Exception):
    """A problem with the command's input, reported as one line and exit code 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `note` says what was kept (e.g. finished --compare contexts) for the next run."""

    def __init__(self, exit_code: int = EXIT_INTERRUPTED, note: str = ""):
        super().__init__(note)
        self.exit_code, self.note = exit_code, note


# ---------------------------------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------------------------------


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
        except failures as e:
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


# ---------------------------------------------------------------------------------------------------
# Model arguments
# ---------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, type=Path,
                        help="diffusers SD1.5 folder or original .safetensors file (get one: python -m stemref.download)")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="for a single .safetensors file of another size: a diffusers folder with its "
                             "config.json files (default: SD1.5's configs)")
    add_device_arguments(parser)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on GPU, fp32 on CPU")


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype, else fp16 on a GPU and fp32 elsewhere."""
    return DTYPES[args.dtype] if args.dtype else (torch.float16 if str(args.device).startswith("cuda") else torch.float32)


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse an unusable --device or a missing --weights before any slow work."""
    check_device(args)
    if not Path(args.weights).expanduser().exists():
        load(args.weights)  # raises the loader's message (how to get weights); cheap when the path is missing
    if getattr(args, "model_config", None) is not None and not args.model_config.is_dir():
        raise UserError(f"--model-config {args.model_config}: give a diffusers folder holding unet/config.json etc.")


def check_device(args: argparse.Namespace) -> None:
    """Refuse a --device this PyTorch cannot use."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {args.device}: not a device name ({e}); use cpu, cuda, cuda:1 or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: this PyTorch ({torch.__version__}) sees no CUDA GPU "
                            "(a CPU-only build, or no driver); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {args.device}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {args.device}: stemref runs on cpu, cuda or mps")


def load_model(args: argparse.Namespace, progress: Callable[[int, int], None] | None = None) -> StableDiffusion:
    check_model_arguments(args)
    try:
        return load(args.weights, dtype=chosen_dtype(args), device=args.device,
                    config=getattr(args, "model_config", None),
                    progress=progress)
    except (WeightsError, NotSD1Error, TokenizerFilesError) as e:
        raise UserError(str(e)) from e


def model_inputs(args: argparse.Namespace) -> list[Path]:
    """The files an output must never replace: the weights (and --model-config)."""
    return [p for p in (args.weights, getattr(args, "model_config", None)) if p is not None]


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def check_output_folder(path: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Every reason to refuse `--out` before any work: see `output_folder`."""
    if path.name in ("", ".", ".."):
        raise UserError(f"--out {path}: name a new folder, such as {path / 'run'}")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a folder name")
    _refuse_inputs(path, inputs, "folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"--out {path} exists and is not empty; choose a new folder or pass --overwrite")
        if not (path / MARKER).is_file():
            raise UserError(f"--out {path} was not written by stemref (it has no {MARKER} file), so --overwrite "
                            "will not delete it; choose a new folder, or empty this one yourself")
    _check_writable_parent(path)


def check_output_file(path: Path, overwrite: bool, inputs: Iterable[Path] = (), flag: str = "--out") -> None:
    """Refuse a file output that exists (unless `overwrite`), is a folder, is an input or cannot be written."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name such as {path / 'image.png'}")
    _refuse_inputs(path, inputs, "file")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; choose another name or pass --overwrite")
    _check_writable_parent(path, flag)


def _refuse_inputs(path: Path, inputs: Iterable[Path], what: str) -> None:
    out = path.expanduser().resolve()
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if out == source or out in source.parents:
            raise UserError(f"--out {path} {'is' if out == source else 'contains'} the input {source}; writing "
                            f"there could destroy it. Choose an output {what} outside your inputs")


def _check_writable_parent(path: Path, flag: str = "--out") -> None:
    """The nearest existing ancestor must be a folder we may create entries in."""
    ancestor = path.expanduser().absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, so no folder can be made under it; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {ancestor}; choose a folder you can write to")


@contextmanager
def output_folder(path: Path, overwrite: bool = False, inputs: Iterable[Path] = (),
                  resume: dict | None = None) -> Iterator[Path]:
    """`with output_folder(out) as tmp:` write into tmp; it becomes `out` only when the block succeeds.

    tmp is a hidden sibling `.NAME.xxxx.partial` of `out` (same file system, so the final rename is atomic)
    holding the MARKER file. On any error, Ctrl-C and SIGTERM included, tmp is deleted, with any parent
    folders this call created, so a failed run leaves nothing behind; partial folders left by killed runs
    (SIGKILL, power loss) are deleted by the next run in the same parent folder. An existing non-empty
    `out` is refused unless `overwrite` and it holds the MARKER; then it is replaced whole. An `out` that
    is or contains one of `inputs` is always refused.

    `resume` (the settings of the run, JSON-able): when interrupted, tmp is kept as `.NAME.resume`, and a
    later run with equal `resume` settings starts from its contents (commands skip what is complete).
    """
    check_output_folder(path, overwrite, inputs)
    created = [p for p in path.parents if not p.exists()]  # innermost first
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    kept = path.with_name(f".{path.name}.resume")
    if resume is not None and _marker(kept).get("resume") == resume:
        os.replace(kept, tmp)
    else:
        tmp.mkdir()
    _write_marker(tmp, resume)
    try:
        yield tmp
    except KeyboardInterrupt as e:
        if resume is not None:
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(tmp, kept)
            raise Interrupted(getattr(e, "exit_code", EXIT_INTERRUPTED),
                              f"finished parts are kept in {kept}; run the same command again to resume") from e
        _discard(tmp, created)
        raise
    except BaseException as e:
        _discard(tmp, created)
        raise _renamed(e, tmp, path)
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    if path.exists():
        os.replace(path, old)  # moved aside, not deleted, until the new folder is in place
    _write_marker(tmp, None)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(kept, ignore_errors=True)


def _discard(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for parent in created:
        try:
            parent.rmdir()
        except OSError:  # something else wrote there meanwhile: leave it
            break


def _renamed(e: BaseException, tmp: Path, path: Path) -> BaseException:
    """The same error, naming `path` where it named the internal partial folder."""
    if isinstance(e, OSError) and e.filename and str(tmp) in str(e.filename):
        return OSError(e.errno, e.strerror, str(e.filename).replace(str(tmp), str(path)))
    if isinstance(e, (UserError, ValueError)) and str(tmp) in str(e):
        return UserError(str(e).replace(str(tmp), str(path)))
    return e


def _write_marker(folder: Path, resume: dict | None) -> None:
    """Who made the folder: a running process's partial folder is never taken for a stale one."""
    info = {"written_by": "stemref", "host": socket.gethostname(), "pid": os.getpid(), "resume": resume}
    (folder / MARKER).write_text(json.dumps(info) + "\n")


def _marker(folder: Path) -> dict:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _remove_stale_partials(parent: Path) -> None:
    """Delete `.*.partial` / `.*.old` folders of stemref runs on this machine whose process is gone."""
    for folder in parent.glob(".*.*"):
        if folder.suffix not in (".partial", ".old") or not folder.is_dir():
            continue
        info = _marker(folder)
        if info.get("written_by") == "stemref" and info.get("host") == socket.gethostname() \
                and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


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


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def warn_if_large(side: int, flag: str = "--size") -> None:
    """SD1.5 was trained at 512 px: far above, every step costs many times more time and memory."""
    if side > HEAVY_SIDE:
        warn(f"{flag} {side}: SD1.5 was trained at 512 px; each frame costs about {(side / 512) ** 2:.0f}× the time "
             "of a 512 px frame, and attention over all frames much more memory: expect hours")


# ---------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------


class progress_printer:  # noqa: N801 (a function to its callers: progress=progress_printer("denoising"))
    """`report(done, total)` draws `label: 7/50 steps, 1.23 s/step, ETA 0:53` on one stderr line.

    Use it as `with progress_printer("denoising") as report:` so that the line is ended when the stage
    ends for any reason, before any message is printed; it also ends the line itself when done == total.
    """

    def __init__(self, label: str, unit: str = "step"):
        self.label, self.unit = label, unit
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, done) of the first report
        self.open = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        self.first = self.first or (now, done)
        since, before = self.first
        # the rate from the first report on: the time before it may include another stage (a VAE encode)
        per = (now - since) / (done - before) if done > before else (now - self.started) / max(done, 1)
        text = f"{self.label}: {done}/{total} {self.unit}s"
        if done:
            text += f", {per:.2f} s/{self.unit}, " + (f"ETA {_duration(per * (total - done))}" if done < total
                                                      else f"{_duration(now - self.started)} in all")
        self.show(text)
        if done >= total:
            self.end()

    def show(self, text: str) -> None:
        """Redraw the line with any text (the downloader shows bytes and rates)."""
        print(f"\r{text:<79}", end="", file=sys.stderr, flush=True)
        self.open = True

    def end(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False

    def __enter__(self) -> "progress_printer":
        return self

    def __exit__(self, *exc) -> None:
        self.end()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"
