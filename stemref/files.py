"""Writing files so that a failure never leaves a partial one behind, and recognising a whole safetensors file."""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; rename it onto `path` on success, delete it on any error.

    The temporary name is hidden and ends in `.part`, so writers must name their format explicitly.
    """
    # same folder: the final rename stays on one file system, so it is atomic
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        header = f.read(min(n, MAX_HEADER)) if 0 < n <= MAX_HEADER else b""
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
        if prefix.lstrip().startswith(magic):
            return what
    return f"not a safetensors file ({size} bytes that do not start with a safetensors header)"
