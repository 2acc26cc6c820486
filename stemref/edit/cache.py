"""The on-disk cache of costly preparations (inversions, tuned weights), keyed by everything they depend on.

A second edit of the same video with another target prompt should not invert it again. An entry's key is
the SHA-256 of a canonical JSON description of its inputs: the frames themselves (content, selection
and size at once), the prompt, steps, context and its options, seeds, the weights' fingerprint and the
dtype. Any change gives another key, so an entry is never stale, only unused.

    <root>/<kind>/<key>.safetensors    the entry, written atomically (a temporary name, then a rename)
    <root>/<kind>/<key>.sha256         its checksum, written after it

Every entry carries its identity inside the file (metadata "cache": its key and the inputs it was computed
from), so an entry copied over another key, with its checksum, is recognised as someone else's. `get`
trusts an entry only when all of these hold: a checksum file that matches the bytes, the identity inside
matching the key asked for, and the entry's own reader accepting it (for an inversion: the shape its
inputs imply and finite latents; for tuned weights: every tensor, of its shape, finite). Otherwise the
entry is deleted, one line through `notice` says why, and `get` returns None so that it is recomputed.
If writing an entry fails (a full disk, a read-only folder), `put` says so through `notice` and skips it:
the result it was asked to keep is unaffected.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError

from ..files import atomic_path, read_identity
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
    """SHA-256 of a tensor's dtype, shape and bytes (in row-major order): the identity of a video's frames.

    A non-contiguous tensor (read_video's frames are) is hashed one item of its first dimension at a time, so
    hashing thousands of frames never copies them all."""
    x = x.detach().cpu()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    for piece in [x] if x.is_contiguous() or x.dim() < 2 else x:
        h.update(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
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
    """Entries of one `kind` (a sub-folder) under `root`; None as root disables caching. `notice` receives one
    line whenever an entry is dropped or cannot be written (the command prints it; the library never does)."""

    def __init__(self, root: Path | None, kind: str, notice: Callable[[str], None] | None = None):
        self.folder = None if root is None else Path(root) / kind
        self.kind = kind
        self.notice = notice or (lambda message: None)

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def get(self, key: str, description: dict, read: Callable[[Path], object]) -> object | None:
        """The entry for `key` (computed from `description`) read by `read(path)`, or None when absent; an entry
        that fails any check is deleted, with one line to `notice`, and None returned."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        problem = self._problem(path, key, description)
        if problem is None:
            try:
                return read(path)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                problem = _problem_of(e, path)
        self.discard(key)
        self.notice(f"cache entry {path} dropped ({problem}); computing it again")
        return None

    def _problem(self, path: Path, key: str, description: dict) -> str | None:
        """Why the entry at `path` cannot be trusted as `key`'s, or None: checksum, then the identity inside."""
        try:
            if path.with_suffix(".sha256").read_text().strip() != _sha256_of(path):
                return "its bytes do not match its checksum"
        except OSError:
            return "it has no readable checksum"
        try:
            identity = read_identity(path)
        except (OSError, ValueError) as e:
            return f"unreadable: {e}"
        if identity is None:
            return "it does not say which inputs it was computed from"
        if identity.get("key") != key:
            return "it belongs to another key (copied from another entry)"
        inputs = identity.get("inputs")
        expected = canonical(description)
        if inputs != expected:
            differ = sorted(k for k in expected if not isinstance(inputs, dict) or inputs.get(k) != expected[k])
            return f"it was computed from other inputs ({', '.join(differ) or 'its description'})"
        return None

    def put(self, key: str, description: dict, entry: "Saveable") -> Path | None:
        """Write `entry` with its identity inside (atomically), then its checksum; its path, or None when caching is
        off or the write failed (said through `notice`; nothing partial is left)."""
        path = self.path(key)
        if path is None:
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".sha256").unlink(missing_ok=True)
            with atomic_path(path) as tmp:
                entry.save(tmp, cache={"key": key, "inputs": canonical(description)})
            with atomic_path(path.with_suffix(".sha256")) as tmp:
                tmp.write_text(_sha256_of(path) + "\n")
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            self.discard(key)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.notice(f"warning: could not write the {self.kind} cache entry in {self.folder} ({reason}); "
                        "the result is kept, only the cache write is skipped")
            return None
        return path

    def discard(self, key: str) -> None:
        path = self.path(key)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
                path.with_suffix(".sha256").unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache: the entry stays, and is checked again (and refused) next time


class Saveable(Protocol):
    """A cache entry: Inversion and Tuned write themselves, with the cache identity in their metadata."""

    def save(self, path: Path, cache: dict | None = None) -> Path: ...


def _problem_of(error: Exception, path: Path) -> str:
    """A reader's error as the reason an entry is dropped: its first line without the file's name and without
    the advice to make the file again (the cache does that itself)."""
    message = (str(error).splitlines() or [type(error).__name__])[0].removeprefix(f"{path}: ")
    parts = message.split("; ")
    while len(parts) > 1 and parts[-1].startswith(("make it again", "tune again")):
        parts.pop()
    return "; ".join(parts)


def canonical(description: dict) -> dict:
    """`description` as its JSON round trip: what an entry stores and what `key_of` hashes."""
    return json.loads(json.dumps(description, sort_keys=True, default=str))


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
