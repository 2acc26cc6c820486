"""Gathering every frame's keys and values across processes: stemref's gather against torch's list all_gather.

    python bench/all_gather_memory.py                       # 2 processes, 16 frames of 4096 tokens (512²)
    python bench/all_gather_memory.py --processes 4 --frames 32

All-frame attention and TokenFlow's keyframe pass give every rank the keys and values of every frame, laid
out as attention reads them, (B, h, F·N, d + dv). Two ways, each in fresh gloo processes (1 thread each):
- "torch all_gather + cat": what stemref did before, the plain torch way: the rank's (B, n, h, N, d + dv)
  tokens, `torch.distributed.all_gather` into a list of pieces, `torch.cat` along the frames, then the
  re-layout to (B, h, F·N, ·).
- "stemref": `stemref.distributed.all_gather` of the tokens already in that layout, (B, h, n, N, ·), one
  broadcast per rank copied to its place as it arrives.
Both give the same tensor (checked). Time: the slowest rank's; memory: the largest rank's peak resident memory
above its memory before the gather (kernel high-water mark, reset there), with the rank's own tokens
already built.

Dimension legend: B branches (2), F frames, n frames on a rank, h heads (8), N tokens per frame, d + dv key
and value channels (2 · 40, SD's first level).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stemref, even if another is installed
sys.path.insert(1, str(Path(__file__).resolve().parent))

from distributed_scaling import peak_rss, reset_peak_rss  # noqa: E402
from inversion_scaling import MiB, current_rss  # noqa: E402

WAYS = ("torch all_gather + cat", "stemref")


def rank_main(rank: int, size: int, way: str, a: argparse.Namespace, folder: str) -> None:
    import torch
    import torch.distributed as dist

    from stemref import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    try:
        shard = distributed.shard_frames(a.frames, dist.group.WORLD)
        B, h, N, D = 2, 8, a.tokens, 80
        g = torch.Generator().manual_seed(rank)
        tokens = torch.randn(B, shard.count, h, N, D, generator=g)  # (B, n, h, N, d + dv)
        if way == "stemref":
            tokens = tokens.transpose(1, 2).contiguous()  # (B, h, n, N, ·): how attention reads them
        base = current_rss()
        reset_peak_rss()
        start = time.perf_counter()
        if way == "stemref":
            gathered = distributed.all_gather(tokens, shard, dim=2).flatten(2, 3)  # (B, h, F·N, ·)
        else:
            pieces = [torch.empty_like(tokens) for _ in range(size)]  # even shards: no padding needed
            dist.all_gather(pieces, tokens, group=dist.group.WORLD)
            every = torch.cat(pieces, dim=1)  # (B, F, h, N, ·)
            gathered = every.permute(0, 2, 1, 3, 4).reshape(B, h, a.frames * N, D)  # (B, h, F·N, ·)
        seconds = time.perf_counter() - start
        peak = peak_rss() - base
        check = float(gathered.double().sum())  # the same on every rank and for both ways
        Path(folder, f"rank{rank}.json").write_text(json.dumps(
            {"seconds": seconds, "peak_bytes": peak, "result_bytes": gathered.numel() * 4, "sum": check}))
    finally:
        dist.destroy_process_group()


def measure(way: str, a: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(a.processes, way, a, folder), nprocs=a.processes, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(a.processes)]
    assert len({r["sum"] for r in ranks}) == 1, "the ranks gathered different tensors"
    return {"seconds": max(r["seconds"] for r in ranks), "peak_bytes": max(r["peak_bytes"] for r in ranks),
            "result_bytes": ranks[0]["result_bytes"], "sum": ranks[0]["sum"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--frames", type=int, default=16, help="frames in all (a multiple of --processes)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per frame (4096: 512² at the first level)")
    a = p.parse_args()
    if a.processes < 2 or a.frames % a.processes:
        p.error("--processes must be at least 2 and divide --frames")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed memory leaves at once (distributed_scaling.py)
    print(f"{a.processes} gloo processes, 1 thread each; {a.frames} frames of {a.tokens} tokens, 2 branches, 8 heads, "
          "80 key + value channels, fp32\n")
    print("| way | s | peak per rank (MiB) | result (MiB) | peak / result |")
    print("|---|---:|---:|---:|---:|")
    results = {way: measure(way, a) for way in WAYS}
    if len({r["sum"] for r in results.values()}) != 1:
        raise SystemExit("the two ways gathered different tensors")
    for way, r in results.items():
        print(f"| {way} | {r['seconds']:.2f} | {r['peak_bytes'] / MiB:.0f} | {r['result_bytes'] / MiB:.0f} "
              f"| {r['peak_bytes'] / r['result_bytes']:.2f} |")


if __name__ == "__main__":
    main()
