"""Frame sharding across processes: the shard description and the few collectives that cross it.

A video of F frames is split into contiguous shards, one per process of a torch.distributed group, of
possibly uneven length (the first F mod P ranks hold one frame more). Every per-frame layer (VAE, ResNets,
cross-attention, 1-frame attention, DDIM arithmetic) runs on the local shard alone. Only the few places
where one frame's result depends on another frame's tokens talk to the other processes, each through one
collective of this module:

    all_reduce_sum    STEM's M-step sums Σ_t z (K) and zᵀk, zᵀv (K × d) and the key statistics of its
                      initial bases: sums over tokens, so the sum of the shards' sums is the whole sum
    all_gather        all-frame attention's keys and values; TokenFlow's keyframe latents and keys/values
    gather_to_first   the results (latents, frames) on rank 0, which writes them
    broadcast_item    one frame to every rank: the first frame (2-frame), FateZero's middle frame
    broadcast_object  rank 0's decision (e.g. whether the cache holds the inversion) to every rank
    gather_objects    every rank's small value (a settings hash, a digest of the frames it read) on every rank
    fetch             contiguous ranges of items from whichever ranks hold them (point to point): the
                      previous frame from the left neighbour, TokenFlow's keyframe features for a batch

The processors reach the shard through `RunInfo.shard` (attention.py); nothing here is stored on a module
or in a global. Without a group (shard None) no function of this module is called.

Every rank must make the same collective calls in the same order: the layers run in the same order on every
rank, and every decision that leads to a collective depends on global facts (frame count, settings), never
on the local shard's length.

Dimension legend: P processes, F frames (items) in all, n items on this rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's contiguous share of F items (frames, or TokenFlow's keyframes) and the group it is in."""

    group: dist.ProcessGroup  # the processes sharing the items (dist.group.WORLD for the default group)
    rank: int  # this process's rank in `group`
    starts: tuple[int, ...]  # rank r holds items starts[r] to starts[r + 1] - 1; starts[-1] = F

    @property
    def size(self) -> int:
        return len(self.starts) - 1

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def stop(self) -> int:
        return self.starts[self.rank + 1]

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def total(self) -> int:
        return self.starts[-1]

    def range_of(self, rank: int) -> range:
        return range(self.starts[rank], self.starts[rank + 1])

    def owner(self, item: int) -> int:
        return next(r for r in range(self.size) if self.starts[r] <= item < self.starts[r + 1])

    def split(self, counts: Sequence[int]) -> "Shard":
        """The same group sharding other items: rank r holds counts[r] of them."""
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        return Shard(self.group, self.rank, tuple(starts))


def even_starts(total: int, parts: int) -> tuple[int, ...]:
    """Contiguous shards of `total` items over `parts` ranks; the first total mod parts hold one item more."""
    base, extra = divmod(total, parts)
    starts = [0]
    for r in range(parts):
        starts.append(starts[-1] + base + (r < extra))
    return tuple(starts)


def shard_frames(total: int, group: dist.ProcessGroup | None) -> Shard | None:
    """This rank's shard of `total` frames over `group`; None without a group or for a group of one process."""
    if group is None:
        return None
    size = dist.get_world_size(group)
    if size == 1:
        return None
    if total < size:
        raise ValueError(f"{size} processes cannot share {total} frame(s): every process needs at least one frame; "
                         f"start at most {total} processes")
    return Shard(group, dist.get_rank(group), even_starts(total, size))


def all_reduce_sum(tensors: list[torch.Tensor], shard: Shard) -> list[torch.Tensor]:
    """The sums over all ranks of same-shaped, same-dtype tensors, in one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=shard.group)
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_gather(x: torch.Tensor, shard: Shard, dim: int = 0) -> torch.Tensor:
    """Every rank's items along `dim` in rank order: x holds shard.count items -> shard.total items.

    One broadcast per rank, each piece copied to its place in the result as it arrives, this rank's own last:
    a rank holds at most the result, x and one other rank's piece, not every piece and their concatenation as
    torch's list all_gather does (which matters where the result is every frame's keys and values). Shards
    may be uneven; a rank with no items sends nothing.
    """
    out = x.new_empty((*x.shape[:dim], shard.total, *x.shape[dim + 1:]))
    for r in range(shard.size):
        rows = shard.range_of(r)
        if not rows:
            continue
        if r == shard.rank:
            dist.broadcast(x.contiguous(), src=dist.get_global_rank(shard.group, r), group=shard.group)
            continue
        piece = x.new_empty((*x.shape[:dim], len(rows), *x.shape[dim + 1:]))
        dist.broadcast(piece, src=dist.get_global_rank(shard.group, r), group=shard.group)
        out.narrow(dim, rows.start, len(rows)).copy_(piece)
        del piece  # before the next one arrives
    out.narrow(dim, shard.start, shard.count).copy_(x)  # last: on the CPU, out's pages are touched as it fills
    return out


def gather_to_first(x: torch.Tensor, shard: Shard, dim: int = 0) -> torch.Tensor | None:
    """Every rank's items along `dim` on rank 0 of the group (shard.total of them), None on the others.

    Shards may be uneven: each is padded to the longest for the collective and cut back after it.
    """
    padded = _padded(x, shard, dim)
    first = shard.rank == 0
    pieces = [torch.empty_like(padded) for _ in range(shard.size)] if first else None
    dist.gather(padded.contiguous(), pieces, dst=dist.get_global_rank(shard.group, 0), group=shard.group)
    if not first:
        return None
    return torch.cat([p.narrow(dim, 0, len(shard.range_of(r))) for r, p in enumerate(pieces)], dim=dim)


def broadcast_item(x: torch.Tensor, item: int, shard: Shard, dim: int = 0) -> torch.Tensor:
    """Global item `item` (its owner's x.narrow(dim, item - start, 1)) on every rank: (..., 1, ...)."""
    owner = shard.owner(item)
    if owner == shard.rank:
        out = x.narrow(dim, item - shard.start, 1).contiguous()
    else:
        out = torch.empty_like(x.narrow(dim, 0, 1), memory_format=torch.contiguous_format)
    dist.broadcast(out, src=dist.get_global_rank(shard.group, owner), group=shard.group)
    return out


def fetch(x: torch.Tensor, shard: Shard, wants: Sequence[range], dim: int = 0) -> torch.Tensor:
    """The items wants[shard.rank] (a contiguous range of global items), from whichever ranks hold them.

    Every rank passes the same `wants` (rank r's wish is wants[r]), so each knows what to send to whom; the
    transfers are point to point. x holds this rank's items along `dim`; the result holds the wanted ones
    in order (possibly none).
    """
    mine, ops, pieces = shard.range_of(shard.rank), [], []
    for r in range(shard.size):
        peer = dist.get_global_rank(shard.group, r)
        if r != shard.rank:
            send = _overlap(wants[r], mine)
            if send:
                ops.append(dist.P2POp(dist.isend, x.narrow(dim, send.start - mine.start, len(send)).contiguous(),
                                      peer, shard.group))
        receive = _overlap(wants[shard.rank], shard.range_of(r))
        if not receive:
            continue
        if r == shard.rank:
            pieces.append(x.narrow(dim, receive.start - mine.start, len(receive)))
        else:
            shape = (*x.shape[:dim], len(receive), *x.shape[dim + 1:])
            pieces.append(x.new_empty(shape))
            ops.append(dist.P2POp(dist.irecv, pieces[-1], peer, shard.group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    if not pieces:
        return x.narrow(dim, 0, 0)
    return torch.cat(pieces, dim=dim)


def left_neighbour(x: torch.Tensor, shard: Shard, dim: int = 0) -> torch.Tensor:
    """The item just before this shard (from the rank on the left); none (length 0 along dim) on rank 0."""
    wants = [range(s - 1, s) if s > 0 else range(0) for s in shard.starts[:-1]]
    return fetch(x, shard, wants, dim)


def broadcast_object(value: object, group: dist.ProcessGroup) -> object:
    """Rank 0's `value` (any picklable object) on every rank of `group`."""
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def gather_objects(value: object, group: dist.ProcessGroup) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank of `group`."""
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def check_same(value: str, group: dist.ProcessGroup) -> None:
    """Raise ValueError on every rank unless every rank of `group` passed the same string (e.g. a settings hash)."""
    values = gather_objects(value, group)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise ValueError(f"the processes disagree on the settings: rank(s) {', '.join(map(str, differing))} differ "
                         f"from rank 0; start every process with the same arguments and files")


def _padded(x: torch.Tensor, shard: Shard, dim: int) -> torch.Tensor:
    """x with zero items appended along `dim` up to the longest shard's length (collectives need equal shapes)."""
    longest = max(len(shard.range_of(r)) for r in range(shard.size))
    if x.shape[dim] == longest:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:dim], longest - x.shape[dim], *x.shape[dim + 1:])], dim=dim)


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop)) if a and b else range(0)

