"""Output folders and files that never lose data: `output_folder(out, overwrite, inputs)` writes into a hidden
partial folder that becomes `out` only at the end; `--overwrite` replaces only a folder that stemref wrote (it
holds the MARKER file), never one that holds or is an input, and stale partial folders of killed runs are
removed by the next run. `check_output_file` is the same check for commands that write one file."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import EXIT_INTERRUPTED, Interrupted, UserError

MARKER = ".stemref-output"  # written into every output folder; --overwrite replaces only folders holding it


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

