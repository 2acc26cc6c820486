"""One process against several: wall time and per-rank peak memory of a STEM inversion step and a TokenFlow step.

    python bench/distributed_scaling.py                                   # 128 px, 16 and 32 frames, 1 and 2 processes
    python bench/distributed_scaling.py --size 64 --frames 8 --steps 2    # a quick look on a busy machine
    python bench/distributed_scaling.py --processes 1 2 4 --threads 1

Every (workload, F, P) runs in P fresh processes (torch.multiprocessing, a gloo group, --threads threads
each), which split the F frames into contiguous shards (stemref.distributed):
- "stem inversion step": one inversion UNet forward of the full-size SD1.5 UNet (random weights,
  `random_unet` of bench/inversion_scaling.py) on the F-frame video at guidance 1, STEM (K = 256 bases, EM
  sums all-reduced) in all 16 self-attention layers: what `stemref.invert(..., group=)` runs per step. The
  first forward is cold on the CPU; the second is timed.
- "tokenflow step": `stemref.edit.tokenflow.edit_latents(..., group=)` for --steps steps (the first is not
  timed) as `python -m stemref.edit` runs it (batch 8, guidance 7.5, PnP 0.5 / 0.8, FreeU on) on a synthetic
  inversion, with the stand-in text encoder of bench/edit_scaling.py.
Time: the slowest rank's wall time of the timed forward / step. Memory: each rank's peak RSS growth above its
RSS with the weights and latents loaded (the weights are per process); the table shows the largest rank's.
The last columns compare with 1 process: speed-up (the issue's target: ≥ 1.7× with 2 processes) and peak
per rank (target: ≤ 0.6× with 2 processes). Prints a markdown table.

Dimension legend: F frames, P processes, K keyframes, h × w latent grid (size / 8).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stemref, even if another is installed
sys.path.insert(1, str(Path(__file__).resolve().parent))

from edit_scaling import SOURCE_PROMPT, TARGET_PROMPT, fixed_text_encoder  # noqa: E402
from inversion_scaling import MiB, current_rss, random_unet  # noqa: E402

WORKLOADS = ("stem inversion step", "tokenflow step")


def rank_main(rank: int, size: int, workload: str, frames: int, a: argparse.Namespace, folder: str) -> None:
    import resource

    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    try:
        group = dist.group.WORLD if size > 1 else None
        step_seconds, base = run(workload, frames, a, group)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = {"seconds": step_seconds, "peak_bytes": peak - base}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(workload: str, frames: int, a: argparse.Namespace, group) -> tuple[float, int]:
    """(timed seconds, RSS before the measured work) of one workload on this rank's shard."""
    import torch

    from stemref.attention import RunInfo
    from stemref.context import context_processor
    from stemref.distributed import shard_frames
    from stemref.edit.tokenflow import edit_latents
    from stemref.inversion import Inversion, InversionSettings
    from stemref.pipeline import StableDiffusion
    from stemref.scheduler import DDIMScheduler
    from stemref.tokenizer import CLIPTokenizer

    sd = StableDiffusion(CLIPTokenizer.openai(), fixed_text_encoder(a.seed, torch.float32), None,
                         random_unet("cpu", torch.float32, a.seed), DDIMScheduler())
    side = a.size // 8
    g = torch.Generator().manual_seed(a.seed + 1)
    if workload == "stem inversion step":
        shard = shard_frames(frames, group)
        x = torch.randn(frames, 4, side, side, generator=g)  # (F, 4, h, w)
        x = x if shard is None else x[shard.start:shard.stop]
        prompt = sd.encode_prompt(SOURCE_PROMPT).expand(x.shape[0], -1, -1)
        stem = context_processor("stem", generator=torch.Generator().manual_seed(a.seed))
        base = current_rss()
        times = []
        with torch.inference_mode(), sd.unet.attention(lambda name: stem if name.endswith("attn1") else None):
            for step in range(2):  # the first is cold
                start = time.perf_counter()
                sd.unet(x, 500, prompt, RunInfo(frames=x.shape[0], step=step, shard=shard))
                times.append(time.perf_counter() - start)
        return times[-1], base
    timesteps = sorted(sd.scheduler.timesteps(a.steps).tolist())
    path = torch.randn(a.steps + 1, frames, 4, side, side, generator=g)  # (S + 1, F, 4, h, w)
    inversion = Inversion(path, timesteps, InversionSettings(SOURCE_PROMPT, steps=a.steps)).local(group)
    base = current_rss()
    marks = [time.perf_counter()]
    edit_latents(sd, inversion, TARGET_PROMPT, batch=8, freeu=True, seed=a.seed,
                 progress=lambda done, total: marks.append(time.perf_counter()))
    steps = [t1 - t0 for t0, t1 in zip(marks, marks[1:])]
    return sum(steps[1:]) / len(steps[1:]), base


def measure(workload: str, frames: int, processes: int, a: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(processes, workload, frames, a, folder), nprocs=processes, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(processes)]
    return {"seconds": max(r["seconds"] for r in ranks), "peak_bytes": max(r["peak_bytes"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128, help="frame side in pixels (default 128)")
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--steps", type=int, default=2, help="TokenFlow steps per run, at least 2 (the first is not timed)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.steps < 2 or 1 not in a.processes:
        p.error("--steps must be at least 2 and --processes must include 1 (the reference)")
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load} at the start; "
          f"{a.size}×{a.size} px, fp32, {a.threads} thread(s) per process\n")
    print("| workload | F | processes | s | speed-up | peak per rank (MiB) | × 1 process |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for workload in a.workloads:
        for frames in a.frames:
            one = None
            for processes in sorted(a.processes):
                r = measure(workload, frames, processes, a)
                one = one or r
                print(f"| {workload} | {frames} | {processes} | {r['seconds']:.1f} | {one['seconds'] / r['seconds']:.2f}× "
                      f"| {r['peak_bytes'] / MiB:.0f} | {r['peak_bytes'] / max(one['peak_bytes'], 1):.2f} |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"\nload average at the end: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
