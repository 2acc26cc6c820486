"""Writing files so that a failure never leaves a partial one behind."""
from __future__ import annotations

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
