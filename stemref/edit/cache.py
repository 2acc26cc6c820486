"""The on-disk cache of costly preparations (inversions, tuned weights), keyed by everything they depend on.

A second edit of the same video with another target prompt should not invert it again. An entry's key is
the SHA-256 of a canonical JSON description of its inputs: the frames themselves (content, selection
and size at once), the prompt, steps, context and its options, seeds, the weights' fingerprint and the
dtype. Any change gives another key, so an entry is never stale, only unused.

    <root>/<kind>/<key>.safetensors    the entry, written atomically (a temporary name, then a rename)
    <root>/<kind>/<key>.sha256         its checksum, written after it

An entry without a checksum file (a run killed between the two writes) or whose bytes no longer match it
(disk damage, a truncated copy) is deleted and recomputed: `get` returns None for it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..files import atomic_path
from ..pipeline import StableDiffusion

SAMPLES_PER_TENSOR = 256  # values read from each weight tensor for the fingerprint


def default_root() -> Path:
    """$XDG_CACHE_HOME/stemref, or ~/.cache/stemref."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stemref"


def key_of(description: dict) -> str:
    """SHA-256 of the canonical JSON of `description` (sorted keys; tensors enter as their `tensor_digest`)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: the identity of a video's frames."""
    x = x.detach().contiguous().cpu()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(sd: StableDiffusion) -> str:
    """The identity of a model's weights: every tensor's name and shape with a strided sample of its values.

    Reading all 1.1 billion values would take seconds and a copy; a fine-tune or another checkpoint changes
    nearly every value, so 256 evenly spaced values per tensor tell weights apart. The values are rounded to
    fp16, so the same checkpoint loaded in float32, float16 or float64 has one identity (bfloat16 rounds
    differently); the file layout (a diffusers folder or the single file) and the device do not matter.
    A tuned video model's temporal modules count too, so its inversions are cached apart from the base's.
    """
    h = hashlib.sha256()
    for part, model in (("unet", sd.unet), ("text_encoder", sd.text_encoder), ("vae", sd.vae)):
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
            h.update(f"{part}.{name}{tuple(tensor.shape)}".encode())
            h.update(sample.to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()


class Cache:
    """Entries of one `kind` (a sub-folder) under `root`; None as root disables caching."""

    def __init__(self, root: Path | None, kind: str):
        self.folder = None if root is None else Path(root) / kind

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def get(self, key: str, read: Callable[[Path], object]) -> object | None:
        """The entry read by `read(path)`, or None when absent, unverifiable or unreadable (then it is deleted)."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        checksum = path.with_suffix(".sha256")
        try:
            ok = checksum.read_text().strip() == _sha256_of(path)
        except OSError:
            ok = False
        if ok:
            try:
                return read(path)
            except (OSError, ValueError, KeyError, RuntimeError):
                pass
        self.discard(key)
        return None

    def put(self, key: str, write: Callable[[Path], None]) -> Path | None:
        """Write an entry with `write(tmp_path)` (atomically), then its checksum; returns its path."""
        path = self.path(key)
        if path is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".sha256").unlink(missing_ok=True)
        with atomic_path(path) as tmp:
            write(tmp)
        with atomic_path(path.with_suffix(".sha256")) as tmp:
            tmp.write_text(_sha256_of(path) + "\n")
        return path

    def discard(self, key: str) -> None:
        path = self.path(key)
        if path is not None:
            path.unlink(missing_ok=True)
            path.with_suffix(".sha256").unlink(missing_ok=True)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
