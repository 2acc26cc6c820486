"""Writing files so that a failure never leaves a partial one behind, recognising a whole safetensors file, and
stemref's own safetensors files (tensors plus JSON metadata: inversions, tuned weights)."""
from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; rename it onto `path` on success, delete it on any error.

    The temporary name is hidden and ends in `.part`, so writers must name their format explicitly. An
    OSError about the temporary file (disk full, permission denied) is raised again naming `path` instead.
    With `replace=False` a file that appeared at `path` meanwhile is never replaced: FileExistsError.
    """
    # same folder: the final rename stays on one file system, so it is atomic
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        yield tmp
        # writers differ (safetensors makes 0600 files): give every output the mode open() would
        os.chmod(tmp, 0o666 & ~_umask())
        if replace:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is not None and str(tmp) in str(e.filename):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _place_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if no file has it: a hard link fails atomically on an existing name."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "a file appeared there while this was written; it was not replaced",
                              str(path)) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise FileExistsError(errno.EEXIST, "a file appeared there while this was written; it was not replaced",
                                  str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


# First bytes of files that are often found under a .safetensors name but are something else.
FOREIGN_FORMATS = ((b"PK\x03\x04", "a PyTorch pickle (the zip format of .ckpt/.bin/.pt files), renamed"),
                   (b"\x80", "a Python pickle, renamed"),
                   (b"version https://git-lfs", "a Git LFS pointer, not the weights (run `git lfs pull`)"),
                   (b"<", "an HTML or XML page, not weights (a failed download?)"),
                   (b"{", "a JSON file, not weights"))
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """None when `path` is a whole safetensors file (header parses, tensors end where the file ends);
    otherwise what it is instead, for an error message. Reads only the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        header = f.read(min(n, MAX_HEADER)) if 0 < n <= MAX_HEADER else f.read(32)
    if header[:1] == b"{" and 8 + n > size:
        return f"a safetensors file cut short (its header alone needs {8 + n} bytes, it has {size}): incomplete"
    try:
        tensors = json.loads(header) if header else None
        end = max((info["data_offsets"][1] for name, info in tensors.items() if name != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        end = None
    if end is not None:
        if 8 + n + end == size:
            return None
        return f"a safetensors file of the wrong length (its header promises {8 + n + end} bytes, it has {size}): " \
               "incomplete or damaged"
    for magic, what in FOREIGN_FORMATS:
        if (prefix + header).lstrip().startswith(magic):
            return what
    return f"not a safetensors file ({size} bytes that do not start with a safetensors header)"


def save_stemref_file(path: str | os.PathLike, tensors: dict, meta: dict, what: str) -> Path:
    """Tensors and the JSON `meta` (metadata key "stemref") in one .safetensors file, written atomically.

    `what` names the kind of file in messages ("inversion", "tuned-weights").
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save the {what} to {path}: folder {path.parent} does not exist; "
                                "create it first")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"stemref": json.dumps(meta)})
    return path


def read_stemref_file(path: str | os.PathLike, fmt: str, what: str, how_to_make: str) -> tuple[dict, dict]:
    """(meta, tensors) of a file written by save_stemref_file whose meta["format"] is `fmt`.

    FileNotFoundError (naming `how_to_make`) when there is no file; ValueError for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}; {how_to_make}")
    not_ours = f"{path} is not a stemref {what} file ({fmt})"
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{not_ours}: not safetensors ({e})") from e
    with f:
        raw = (f.metadata() or {}).get("stemref")
        try:
            meta = json.loads(raw) if raw is not None else None
        except ValueError as e:
            raise ValueError(f"{not_ours}: its metadata is not JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != fmt:
            raise ValueError(not_ours)
        return meta, {k: f.get_tensor(k) for k in f.keys()}


def read_identity(path: str | os.PathLike) -> dict | None:
    """The cache identity (metadata "stemref" → "cache": key and inputs) of a stemref file, or None without one.
    Reads only the header; ValueError when the file is not safetensors or its metadata is not JSON."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("stemref")
    except SafetensorError as e:
        raise ValueError(f"not safetensors ({e})") from e
    try:
        meta = json.loads(raw) if raw is not None else None
    except ValueError as e:
        raise ValueError(f"its metadata is not JSON ({e})") from e
    identity = meta.get("cache") if isinstance(meta, dict) else None
    return identity if isinstance(identity, dict) else None
