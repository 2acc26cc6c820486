"""Output folders and files that never lose data: `output_folder(out, overwrite, inputs)` writes into a hidden
partial folder that becomes `out` only at the end; `--overwrite` replaces only a folder that stemref wrote (it
holds the MARKER file), never one that holds or is an input, and stale partial folders of killed runs are
removed by the next run. `check_output_file` is the same check for commands that write one file."""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import EXIT_INTERRUPTED, Conflict, Interrupted, UserError

MARKER = ".stemref-output"  # written into every output folder; --overwrite replaces only folders holding it
PANEL_GAP = 8  # white pixels between the panels of side_by_side videos (even: H.264 needs an even width)
MAX_LISTED = 5  # files named in a refusal; the rest are counted


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
        _refuse_foreign(path, path)
    _check_writable_parent(path)


def _refuse_foreign(folder: Path, path: Path) -> None:
    """--overwrite deletes only what stemref wrote into `folder` (an old `path`): anything else is listed."""
    if not (folder / MARKER).is_file():
        raise UserError(f"--out {path} was not written by stemref (it has no {MARKER} file), so --overwrite "
                        "will not delete it; choose a new folder, or empty this one yourself")
    if added := _added(folder):
        shown = ", ".join(added[:MAX_LISTED]) + (f" and {len(added) - MAX_LISTED} more" if len(added) > MAX_LISTED
                                                 else "")
        raise UserError(f"--out {path} holds {len(added)} file(s) that stemref did not write or that were changed "
                        f"since ({shown}); --overwrite would delete them. Move them elsewhere first, or choose a new "
                        "folder")


def _added(folder: Path) -> list[str]:
    """The entries of an old output folder that its stemref run did not write (notes, renders, inputs).

    Its marker lists what it wrote; a marker from before that list (no "files") counts everything changed
    after the marker itself, which was written last."""
    info = _marker(folder)
    present = _entries(folder)
    if isinstance(info.get("files"), list):
        stamps = info.get("stamps") if isinstance(info.get("stamps"), dict) else {}
        changed = {name for name, stamp in stamps.items() if name in present and _stamp(folder / name) != stamp}
        return sorted(set(present) - set(info["files"]) | changed)
    written = (folder / MARKER).stat().st_mtime
    return [name for name in present if (folder / name).lstat().st_mtime > written]


def _entries(folder: Path) -> list[str]:
    """Every file and folder under `folder` but the marker, as relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != MARKER or p.parent != folder)


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
    `out` is refused unless `overwrite` and it holds the MARKER, and every file in it is one its run wrote
    (the MARKER lists them): files a user added are listed and refused, never deleted. An `out` that is or
    contains one of `inputs` (every path the run reads) is always refused.

    The check is made again when the result is moved into place: the rename replaces only a missing or
    empty `out`, or (with `overwrite`) the very folder the first check allowed, still holding only its own
    files. When something else took `out` meanwhile (a second run, a user's file), the result is kept
    under a new name printed in the `Conflict` error, and nothing is deleted.

    `resume` (the settings of the run, JSON-able): when interrupted, tmp is kept as `.NAME.resume`, and a
    later run with equal `resume` settings starts from its contents (commands skip what is complete).
    """
    if path.parent.is_dir():
        _remove_stale_partials(path.parent)  # first: it may put back an old `path` that the checks must see
    check_output_folder(path, overwrite, inputs)
    replaceable = _identity(path) if overwrite and path.is_dir() and any(path.iterdir()) else None
    created = [p for p in path.parents if not p.exists()]  # innermost first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    kept = path.with_name(f".{path.name}.resume")
    if resume is not None and _marker(kept).get("resume") == resume:
        os.replace(kept, tmp)
    else:
        tmp.mkdir()
    try:
        _write_marker(tmp, resume)  # inside: a full disk fails here already, and must leave nothing behind
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
    _write_marker(tmp, None, files=_entries(tmp))
    _put_in_place(tmp, path, replaceable)
    shutil.rmtree(kept, ignore_errors=True)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which folder is at `path` (device and inode: a rename keeps them, a new folder has others)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _put_in_place(tmp: Path, path: Path, replaceable: tuple[int, int] | None) -> None:
    """Rename `tmp` to `path`, replacing only the folder the first check allowed (see `output_folder`)."""
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    moved = False
    if replaceable is not None:
        try:
            os.rename(path, old)  # moved aside, not deleted, until the new folder is in place
            moved = True
        except FileNotFoundError:
            pass  # removed meanwhile: nothing left to replace
        if moved and (_identity(old) != replaceable or not (old / MARKER).is_file() or _added(old)):
            where = _restore(old, path)
            raise Conflict(f"--out {path} changed while this run worked (another run, or files added to it), so "
                           f"it was left as it is{where}; the result is in {_keep(tmp, path)}")
    try:
        os.rename(tmp, path)  # atomic; replaces only a missing or empty folder
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        where = _restore(old, path) if moved else ""
        raise Conflict(f"--out {path} was created while this run worked (another run, or a user), so it was left "
                       f"as it is{where}; the result is in {_keep(tmp, path)}") from None
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def _restore(old: Path, path: Path) -> str:
    """Put a moved-aside folder back; if `path` was taken meanwhile, keep it under a visible name and say where."""
    try:
        os.rename(old, path)
    except OSError:
        return f" (the folder that was there is in {_keep(old, path)})"
    return ""


def _keep(folder: Path, path: Path) -> Path:
    """Rename `folder` to the first free `NAME-2`, `NAME-3`, … beside `path` and return it."""
    for n in range(2, 10_000):
        candidate = path.with_name(f"{path.name}-{n}")
        if candidate.exists():
            continue
        try:
            os.rename(folder, candidate)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                continue  # taken in the meantime
            raise
        return candidate
    return folder


def free_name(path: Path) -> Path:
    """The first of `NAME-2.EXT`, `NAME-3.EXT`, … beside `path` that does not exist."""
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


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


def _write_marker(folder: Path, resume: dict | None, files: list[str] | None = None) -> None:
    """Who made the folder (a running process's partial folder is never taken for a stale one), and when it is
    finished, what it wrote (`files`: --overwrite deletes nothing else)."""
    info = {"written_by": "stemref", "host": socket.gethostname(), "pid": os.getpid(), "resume": resume}
    if files is not None:  # with each file's size and time, so that a file the user edited counts as theirs
        info |= {"files": files, "stamps": {name: _stamp(folder / name) for name in files
                                            if (folder / name).is_file() and not (folder / name).is_symlink()}}
    (folder / MARKER).write_text(json.dumps(info) + "\n")


def _stamp(path: Path) -> list[int] | None:
    """A file's size and modification time (ns): a rename keeps them, an edit changes them."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _marker(folder: Path) -> dict:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _remove_stale_partials(parent: Path) -> None:
    """Clean up after stemref runs on this machine whose process is gone: delete their `.*.partial` folders,
    and put back a `.NAME.xxxx.old` folder (an output moved aside for --overwrite by a run killed before its
    result took its place) where NAME is still free, so a killed run never loses the old result."""
    for folder in parent.glob(".*.*"):
        if folder.suffix not in (".partial", ".old") or not folder.is_dir():
            continue
        info = _marker(folder)
        if not (info.get("written_by") == "stemref" and info.get("host") == socket.gethostname()
                and isinstance(info.get("pid"), int) and not _alive(info["pid"])):
            continue
        if folder.suffix == ".old":
            original = folder.with_name(folder.name[1:].rsplit(".", 2)[0])  # .NAME.xxxx.old -> NAME
            try:
                os.rename(folder, original)  # fails if NAME was taken meanwhile: then the old copy is stale
                continue
            except OSError:
                pass
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

