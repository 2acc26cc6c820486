"""Several processes under torchrun: the process group of a command, its checks, and who writes.

    torchrun --nproc-per-node 2 -m stemref.edit VIDEO --source ... --target ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m stemref.invert ...

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or with WORLD_SIZE 1) a command runs as one process
and nothing here does anything. With them, `start` joins the group (NCCL for --device cuda, each rank on
cuda:LOCAL_RANK; gloo on the CPU) with a collective timeout (--timeout), and every rank works on its shard of
the frames (stemref.distributed). Rank 0 alone reads and writes the cache, writes the output folder and prints
progress; the other ranks print nothing but errors and wait for it at the end.

Failures: a collective that cannot complete (a rank died, or hangs past --timeout) raises on the others; the
command names the ranks that no longer answer (a monitored barrier on a gloo group) in one line, and rank 0's
hidden partial output folder is removed as for any failure. Under torchrun the agent also stops the others
as soon as one rank exits with an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError
from ..distributed import Shard, check_same

DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait: rank 0 writes videos and metrics while the others wait
PROBE_SECONDS = 20  # how long the monitored barrier waits for each rank after a failure


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: the group (None for a single process), its rank and the group's size."""

    group: dist.ProcessGroup | None = None
    rank: int = 0
    size: int = 1
    monitor: dist.ProcessGroup | None = None  # a gloo group: host-memory gathers, naming failed ranks (NCCL cannot)

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
    return Launch(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), monitor), device


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


def failed_ranks(launch: Launch) -> str:
    """After a failed collective: one line naming the ranks that no longer answer (as far as this rank can tell)."""
    try:
        dist.monitored_barrier(group=launch.monitor, timeout=timedelta(seconds=PROBE_SECONDS), wait_all_ranks=True)
    except RuntimeError as e:
        found = re.search(r"[Rr]anks? ([\d, ]+) failed", str(e))
        if found:
            return f"rank(s) {found.group(1).strip(' ,')} failed or were killed; this run was stopped"
        if launch.rank != 0:
            return "rank 0 (or the connection to it) failed or was killed; this run was stopped"
        return f"another process failed or was killed; this run was stopped ({str(e).splitlines()[0]})"
    return "a collective failed although every rank still answers (see the other ranks' errors)"
