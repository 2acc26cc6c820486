"""Several processes under torchrun: the process group of a command, its checks, and who writes.

    torchrun --nproc-per-node 2 -m stemref.edit VIDEO --source ... --target ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m stemref.invert ...

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or with WORLD_SIZE 1) a command runs as one process
and nothing here does anything. With them, `start` joins the group (NCCL for --device cuda, each rank on
cuda:LOCAL_RANK; gloo on the CPU) with a collective timeout (--timeout), and every rank works on its shard of
the frames (stemref.distributed). Rank 0 alone reads and writes the cache, writes the output folder and prints
progress; the other ranks print nothing but errors and wait for it at the end.

Reading the video (`read_shared`): rank 0 decodes every frame (it writes source.mp4 and the metrics, and the
cache key is the digest of all frames, so 1 and N processes share cache entries); every other rank decodes
only its shard, in half the time and host memory or less (bench/README.md, "Decoding"), and checks it against
rank 0's frames by digest, so that a different file at the same path on another machine stops the run at once.

Failures: a collective that cannot complete (a rank died, or hangs past --timeout) raises on the others; each
survivor marks itself alive in torchrun's key-value store and, after a few seconds, names the ranks that did
not (one line, exit 1), and rank 0's hidden partial output folder is removed as for any failure. Under
torchrun the agent also stops the others as soon as one rank exits with an error, and names it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from .errors import UserError
from ..distributed import Shard, broadcast_object, check_same, even_starts, gather_objects
from ..edit.cache import tensor_digest

DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait: rank 0 writes videos and metrics while the others wait
PROBE_SECONDS = 5.0  # how long a survivor waits for the others to say they are alive, after a failure


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: the group (None for a single process), its rank and the group's size."""

    group: dist.ProcessGroup | None = None
    rank: int = 0
    size: int = 1
    monitor: dist.ProcessGroup | None = None  # a gloo group for gathers in host memory (NCCL's stay on the GPU)
    store: dist.Store | None = None  # torchrun's key-value store: who is still alive after a failure

    @property
    def main(self) -> bool:
        """Whether this process writes outputs and prints progress."""
        return self.rank == 0

    def on_cpu(self, shard: Shard) -> Shard:
        """The same shard over the gloo group: results gathered for writing travel in host memory, not the GPU's."""
        return Shard(self.monitor, shard.rank, shard.starts)

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str, timeout: float) -> tuple[Launch, str]:
    """Join torchrun's group (a no-op outside torchrun); returns the launch and this rank's device."""
    if not under_torchrun():
        return Launch(), device
    if not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout}")
    cuda = str(device).startswith("cuda")
    if cuda and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise UserError(f"--device {device} under torchrun needs NCCL and a CUDA GPU, and this PyTorch "
                        f"({torch.__version__}) has {'no CUDA GPU' if not torch.cuda.is_available() else 'no NCCL'}; "
                        "use --device cpu (gloo)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} GPU(s) here; start at most that "
                            "many processes per machine (--nproc-per-node)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    monitor = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    # a client of the store torchrun (or rank 0) serves at MASTER_ADDR:MASTER_PORT, under a prefix of our own
    store = dist.PrefixStore("stemref-alive/", dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=timedelta(seconds=PROBE_SECONDS)))
    return Launch(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), monitor, store), device


def finish(launch: Launch) -> None:
    if launch.group is not None and dist.is_initialized():
        dist.destroy_process_group()


def check_settings_agree(launch: Launch, settings: dict[str, Any]) -> None:
    """Exit 2 on every rank unless all ranks resolved the same settings (a hash of them, compared at start-up)."""
    if launch.group is None:
        return
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    try:
        check_same(digest, launch.group)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_frames(launch: Launch, frames: int) -> None:
    if launch.size > frames:
        raise UserError(f"{launch.size} processes cannot share {frames} frame(s): every process needs at least one; "
                        f"start at most {frames} (torchrun --nproc-per-node)")


@dataclass(frozen=True)
class SharedFrames:
    """The video's frames as this process holds them: every frame on rank 0 (and in one process), only its shard
    (distributed.shard_frames) on the other ranks."""

    frames: torch.Tensor  # (F, 3, H, W) in [0, 1], or this rank's shard (n, 3, H, W)
    total: int  # F, the video's frame count
    digest: str  # tensor_digest of all F frames (rank 0's): the cache key's, the same in 1 and N processes


def read_shared(launch: Launch, read: Callable[[int, int | None], torch.Tensor], start: int, stride: int,
                count: int | None) -> SharedFrames:
    """Frames start, start + stride, ... (at most `count`; None: to the end), read by `read(first, count)` (the
    same stride and geometry), as `SharedFrames`; every rank exits 2 when rank 0 cannot read them, when they are
    too few for the processes, or when another rank reads other frames than rank 0 (e.g. another file)."""
    if launch.group is None:
        frames = read(start, count)
        return SharedFrames(frames, len(frames), tensor_digest(frames))

    def shard_of(total: int) -> torch.Tensor | Exception:  # the frames, or why they could not be read
        a, b = even_starts(total, launch.size)[launch.rank:launch.rank + 2]
        try:
            return read(start + a * stride, b - a)
        except (UserError, ValueError, FileNotFoundError) as e:
            return e

    # the count is usually --frames: the other ranks read their shard of that while rank 0 reads every frame,
    # and read again only if the video turns out shorter
    guess = count if not launch.main and count is not None and count >= launch.size else None
    if launch.main:
        try:
            frames = read(start, count)
        except (UserError, ValueError, FileNotFoundError) as e:
            broadcast_object(str(e), launch.group)  # the other ranks fail with the same message
            raise
        told = broadcast_object((len(frames), tensor_digest(frames)), launch.group)
    else:
        frames = None if guess is None else shard_of(guess)
        told = broadcast_object(None, launch.group)
    if isinstance(told, str):
        raise UserError(told)
    total, digest = told
    check_frames(launch, total)
    if not launch.main and total != guess:
        frames = shard_of(total)
    _check_same_frames(launch, frames, total)
    return SharedFrames(frames, total, digest)


def _check_same_frames(launch: Launch, frames: torch.Tensor | Exception, total: int) -> None:
    """Exit 2 on every rank unless each rank's frames are rank 0's frames of its shard (compared by digest)."""
    if launch.main:  # what each rank should have read
        starts = even_starts(total, launch.size)
        mine = [None, *(tensor_digest(frames[starts[r]:starts[r + 1]]) for r in range(1, launch.size))]
    else:
        mine = f"unreadable: {frames}" if isinstance(frames, Exception) else tensor_digest(frames)
    digests = gather_objects(mine, launch.group)
    differing = [r for r in range(1, launch.size) if digests[r] != digests[0][r]]
    if differing:
        errors = "".join(f"; rank {r}: {digests[r]}" for r in differing if digests[r].startswith("unreadable"))
        raise UserError(f"rank(s) {', '.join(map(str, differing))} read other frames of the video than rank 0 "
                        f"(another file at the same path?); give every machine the same video file{errors}")


def failed_ranks(launch: Launch, wait: float = PROBE_SECONDS) -> str:
    """After a failed collective: one line naming the ranks that did not say they were alive within `wait` s."""
    try:
        launch.store.set(str(launch.rank), "alive")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(launch.size) if not launch.store.check([str(r)])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except (RuntimeError, OSError):  # the store went with the process that served it
        return "the process serving the run's store (rank 0 or torchrun) failed or was killed; this run was stopped"
    if not missing:
        return "a collective failed although every rank is alive (see the other ranks' errors); this run was stopped"
    return f"rank(s) {', '.join(map(str, missing))} failed or were killed; this run was stopped"
