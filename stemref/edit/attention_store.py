"""FateZero's attention store, compact and bounded: what inversion records for the edit to fuse.

The official FateZero keeps every post-softmax map of every fused layer and every step in host memory, about
97 MB per frame per step at 512² in fp16, which is why eight frames need ≈ 39 GB. Maps are never stored here.
A map softmax(q kᵀ/√d) is recomputed at edit time, bit for bit, from what it is made of: the layer's input
tokens x, from which the layer's own projections give q and k back (for STEM also the K key bases; for
cross-attention the keys come from the fixed source prompt). The editor records only the layers and steps
that its windows fuse.

Memory: the store keeps whole steps in host memory up to `memory_budget` bytes; a step that does not fit is
written to disk, one safetensors file per step, and read back memory-mapped one layer at a time. Files are
written atomically (a temporary name, then a rename) and streamed tensor by tensor, so writing a step never
holds more than one tensor in host memory (safetensors' save_file would serialise the whole step first).
The folder is removed when the store is closed, also on errors and Ctrl-C, unless `keep` asks to keep it:
then every step is on disk with an index, and `AttentionStore.open` reads it back.

A step's record: {layer name: {"x": (F, N, C), "mu": (G, h, K, d)}} (any names and shapes), tensors in the
model dtype, keyed by the timestep t that inversion and edit share.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from ..files import atomic_path

INDEX = "store.json"
FORMAT = "stemref.attention_store/1"
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

Record = dict[str, dict[str, torch.Tensor]]  # layer name -> {"x": …, "mu": …}


class AttentionStore:
    """Per timestep, per layer, the tensors the edit recomputes attention maps from (see the module docstring)."""

    def __init__(self, memory_budget: int = 2**30, folder: str | Path | None = None, keep: bool = False):
        if not isinstance(memory_budget, int) or memory_budget < 0:
            raise ValueError(f"memory_budget must be a number of bytes ≥ 0 (0 puts every step on disk), "
                             f"got {memory_budget!r}")
        if folder is not None and not Path(folder).parent.is_dir():
            raise FileNotFoundError(f"cannot put the attention store in {folder}: {Path(folder).parent} does not "
                                    "exist; create it first")
        if folder is not None and Path(folder).exists() and any(Path(folder).iterdir()):
            raise FileExistsError(f"the attention store folder {folder} is not empty; name a new or empty folder")
        self.memory_budget, self.keep = memory_budget, keep
        self._folder_arg = Path(folder) if folder is not None else None
        self.folder: Path | None = None  # created on the first spill
        self.owns_folder = True  # False for a kept store opened again: never delete what an earlier edit kept
        self.resident: dict[int, Record] = {}
        self.on_disk: dict[int, Path] = {}
        self.pending: dict[int, Record] = {}
        self.resident_bytes = self.peak_resident_bytes = self.disk_bytes = 0
        # bytes of the step being recorded (on the model's device) and the most the store ever held in
        # memory at once, resident steps and the step being recorded together
        self.pending_bytes = self.peak_bytes = 0

    # ---- recording -------------------------------------------------------------------------------------
    def add(self, t: int, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Record `tensors` of layer `name` at timestep t; the step is complete once `end_step(t)` is called."""
        if t in self.resident or t in self.on_disk:
            raise ValueError(f"timestep {t} is already recorded in this store")
        self.pending.setdefault(t, {})[name] = {key: x.detach().contiguous() for key, x in tensors.items()}
        self.pending_bytes += sum(x.numel() * x.element_size() for x in tensors.values())
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes + self.pending_bytes)

    def end_step(self, t: int) -> None:
        """Keep step t in host memory if it fits the budget, else write it to its own file."""
        record = self.pending.pop(t, {})
        size = record_bytes(record)
        self.pending_bytes -= size
        if self.resident_bytes + size <= self.memory_budget:
            self.resident[t] = {name: {k: x.cpu() for k, x in ts.items()} for name, ts in record.items()}
            self.resident_bytes += size
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        else:
            self._spill(t, record)

    def _spill(self, t: int, record: Record) -> None:
        if self.folder is None:
            self.folder = self._folder_arg or Path(tempfile.mkdtemp(prefix="stemref-fatezero-"))
            self.folder.mkdir(exist_ok=True)
        if not self.owns_folder:
            raise ValueError(f"the attention store in {self.folder} was opened for reading; record into a new store")
        path = self.folder / f"step_{t:04d}.safetensors"
        tensors = {f"{name}/{key}": x for name, ts in record.items() for key, x in ts.items()}
        write_safetensors(path, tensors)
        self.on_disk[t] = path
        self.disk_bytes += record_bytes(record)

    # ---- reading ---------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted([*self.resident, *self.on_disk])

    @contextmanager
    def read(self, t: int) -> Iterator["StepReader"]:
        """`with store.read(t) as step: step.get(name, "x")` -- one step, its file (if any) open memory-mapped."""
        if t in self.resident:
            yield StepReader(self.resident[t], None)
        elif t in self.on_disk:
            with safe_open(str(self.on_disk[t]), framework="pt") as f:
                yield StepReader(None, f)
        else:
            yield StepReader({}, None)

    # ---- lifetime --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Delete the store's files, or with `keep` write every step to disk and an index beside them."""
        self.pending.clear()
        if self.keep:
            for t in list(self.resident):
                self._spill(t, self.resident.pop(t))
            self.resident_bytes = 0
            if self.folder is not None:
                index = {"format": FORMAT, "steps": {str(t): p.name for t, p in self.on_disk.items()}}
                with atomic_path(self.folder / INDEX) as tmp:
                    tmp.write_text(json.dumps(index))
            return
        self.resident.clear()
        self.resident_bytes = 0
        self.discard()

    def discard(self) -> None:
        """Remove the folder (an interrupted edit: nothing is left behind, kept or not)."""
        if self.folder is not None and self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.on_disk.clear()

    def __enter__(self) -> "AttentionStore":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.pending.clear()
            self.resident.clear()
            self.discard()

    @classmethod
    def open(cls, folder: str | Path) -> "AttentionStore":
        """A store kept by an earlier edit (`keep=True`), read from its folder; closing it keeps the files."""
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder} is not a kept attention store (no readable {INDEX}): {e}") from e
        if index.get("format") != FORMAT:
            raise ValueError(f"{folder / INDEX} is not a {FORMAT} index")
        store = cls(keep=True)
        store.folder, store.owns_folder = folder, False
        store.on_disk = {int(t): folder / name for t, name in index["steps"].items()}
        store.disk_bytes = sum(p.stat().st_size for p in store.on_disk.values())
        return store


class StepReader:
    """One step of a store: tensors from memory, or loaded one at a time from the memory-mapped file."""

    def __init__(self, record: Record | None, file):
        self.record, self.file = record, file

    def get(self, name: str, key: str) -> torch.Tensor | None:
        if self.record is not None:
            return self.record.get(name, {}).get(key)
        full = f"{name}/{key}"
        return self.file.get_tensor(full) if full in self.file.keys() else None


def record_bytes(record: Record) -> int:
    return sum(x.numel() * x.element_size() for ts in record.values() for x in ts.values())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` in the safetensors format, one tensor at a time, atomically.

    The format: an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets of each
    tensor, padded with spaces to 8 bytes), then the raw little-endian bytes back to back.
    """
    header, offset = {}, 0
    for name, x in tensors.items():
        if x.dtype not in DTYPES:
            raise ValueError(f"cannot store a {x.dtype} tensor ({name}); the store holds floating-point tensors")
        size = x.numel() * x.element_size()
        header[name] = {"dtype": DTYPES[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for x in tensors.values():
            f.write(x.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
