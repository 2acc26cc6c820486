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
Time: the slowest rank's wall time of the timed forward / step. Memory: each rank's peak resident memory
above its resident memory with the weights and latents loaded (the weights are per process); the table shows
the largest rank's. The peak is the kernel's high-water mark (VmHWM), reset when the measured work starts, so
nothing before it (building the weights) counts. Every measurement runs twice, in fresh processes each time:
the time comes from a run on glibc's default heap; the memory from a run with glibc's mmap threshold fixed at
64 KiB (MALLOC_MMAP_THRESHOLD_), so that a freed tensor's memory goes back to the system at once. On the
default heap freed memory stays with the process and its resident size reflects the allocator's history
(which tensor freed what, when), not what the run holds; returning every tensor's pages costs page faults,
about a fifth more time, so that run is not timed. This is the CPU's stand-in for a GPU's
torch.cuda.max_memory_allocated.
The last columns compare with 1 process: speed-up (the issue's target: ≥ 1.7× with 2 processes) and peak
per rank (target: ≤ 0.6× with 2 processes). For TokenFlow the peaks of its two passes are shown apart: the
keyframe pass (3 rows per keyframe, K = F / 8 keyframes, split over the ranks) grows with the video; a batch
pass (3 rows per frame of one batch of 8) does not. `fixed` is the peak of a 1-frame UNet forward with plain
self-attention, what any forward costs whatever the frame count: on the CPU mostly oneDNN's copy of a
convolution's kernel into its own blocked layout, made at every call (at 128², 112.5 MiB for up_blocks.1's
2560 → 1280 3×3 kernel in fp32). The last column compares the peak above `fixed`, the part the frames add.
Prints a markdown table.

Dimension legend: F frames, P processes, K keyframes, h × w latent grid (size / 8).
"""
from __future__ import annotations

import argparse
import contextlib
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
MMAP_THRESHOLD = "65536"  # bytes: every larger allocation is its own mapping, returned to the system when freed


def reset_peak_rss() -> None:
    """Start a new high-water mark of this process's resident memory (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """The highest resident memory since the last reset_peak_rss (bytes)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def rank_main(rank: int, size: int, workload: str, frames: int, a: argparse.Namespace, folder: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    try:
        group = dist.group.WORLD if size > 1 else None
        result = run(workload, frames, a, group)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(workload: str, frames: int, a: argparse.Namespace, group) -> dict:
    """Timed seconds and peak memory above the loaded weights and latents of one workload on this rank's shard."""
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
    prompt = sd.encode_prompt(SOURCE_PROMPT)  # (1, 77, 768)
    if workload == "stem inversion step":
        shard = shard_frames(frames, group)
        x = torch.randn(frames, 4, side, side, generator=g)  # (F, 4, h, w)
        x = x if shard is None else x[shard.start:shard.stop]
        stem = context_processor("stem", generator=torch.Generator().manual_seed(a.seed))
        base = current_rss()
        reset_peak_rss()
        times = []
        with torch.inference_mode(), sd.unet.attention(lambda name: stem if name.endswith("attn1") else None):
            for step in range(2):  # the first is cold
                start = time.perf_counter()
                sd.unet(x, 500, prompt.expand(x.shape[0], -1, -1), RunInfo(frames=x.shape[0], step=step, shard=shard))
                times.append(time.perf_counter() - start)
        result = {"seconds": times[-1], "peak_bytes": peak_rss() - base}
    else:
        timesteps = sorted(sd.scheduler.timesteps(a.steps).tolist())
        path = torch.randn(a.steps + 1, frames, 4, side, side, generator=g)  # (S + 1, F, 4, h, w)
        inversion = Inversion(path, timesteps, InversionSettings(SOURCE_PROMPT, steps=a.steps)).local(group)
        passes = PassPeaks(current_rss())
        marks = [time.perf_counter()]

        def step_done(done: int, total: int) -> None:
            marks.append(time.perf_counter())
            passes.next_step()

        with passes.watching(sd.unet):
            edit_latents(sd, inversion, TARGET_PROMPT, batch=8, freeu=True, seed=a.seed, progress=step_done)
        steps = [t1 - t0 for t0, t1 in zip(marks, marks[1:])]
        result = {"seconds": sum(steps[1:]) / len(steps[1:]), "peak_bytes": passes.overall(),
                  "keyframe_bytes": passes.keyframe, "batch_bytes": passes.batch}
    base = current_rss()  # the fixed cost of any forward: one frame, plain self-attention
    reset_peak_rss()
    with torch.inference_mode():
        sd.unet(x[:1] if workload == "stem inversion step" else path[0, :1], 500, prompt, RunInfo(frames=1))
    return {**result, "fixed_bytes": peak_rss() - base}


class PassPeaks:
    """Peak memory above `base` of TokenFlow's keyframe passes (each step's first UNet call) and batch passes
    (the others), and overall, read from the high-water mark around every UNet call."""

    def __init__(self, base: int):
        self.base, self.keyframe, self.batch, self.between = base, 0, 0, 0
        self.first_of_step = True
        reset_peak_rss()

    def next_step(self) -> None:
        self.first_of_step = True

    def before(self, module, args) -> None:
        self.between = max(self.between, peak_rss() - self.base)  # what happened since the last call
        reset_peak_rss()

    def after(self, module, args, output) -> None:
        peak = peak_rss() - self.base
        if self.first_of_step:
            self.keyframe, self.first_of_step = max(self.keyframe, peak), False
        else:
            self.batch = max(self.batch, peak)
        reset_peak_rss()

    def overall(self) -> int:
        return max(self.keyframe, self.batch, self.between, peak_rss() - self.base)

    @contextlib.contextmanager
    def watching(self, unet):
        hooks = [unet.register_forward_pre_hook(self.before), unet.register_forward_hook(self.after)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def measure(workload: str, frames: int, processes: int, a: argparse.Namespace) -> dict:
    """Time from a run on glibc's default heap, memory from a run that returns freed memory at once (docstring)."""
    timed = run_processes(workload, frames, processes, a, {})
    measured = run_processes(workload, frames, processes, a, {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    return {**measured, "seconds": timed["seconds"]}


def run_processes(workload: str, frames: int, processes: int, a: argparse.Namespace, env: dict[str, str]) -> dict:
    """One run in `processes` fresh processes (spawned with `env` added to the environment): the slowest rank's
    time and each measurement's largest rank."""
    import torch.multiprocessing as mp

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # a spawned process's glibc reads its tuning variables at start-up
    try:
        with tempfile.TemporaryDirectory() as folder:
            mp.start_processes(rank_main, args=(processes, workload, frames, a, folder), nprocs=processes, join=True,
                               start_method="spawn")
            ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(processes)]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def above_fixed(r: dict) -> int:
    """The part of the peak that a 1-frame forward does not already cost: what the frames add."""
    return max(r["peak_bytes"] - r["fixed_bytes"], 0)


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
    print("| workload | F | processes | s | speed-up | peak per rank (MiB) | × 1 process | keyframe pass | batch pass "
          "| fixed | above fixed, × 1 process |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload in a.workloads:
        for frames in a.frames:
            one = None
            for processes in sorted(a.processes):
                r = measure(workload, frames, processes, a)
                one = one or r
                passes = [f"{r[k] / MiB:.0f}" if k in r else "—" for k in ("keyframe_bytes", "batch_bytes")]
                print(f"| {workload} | {frames} | {processes} | {r['seconds']:.1f} | {one['seconds'] / r['seconds']:.2f}× "
                      f"| {r['peak_bytes'] / MiB:.0f} | {r['peak_bytes'] / max(one['peak_bytes'], 1):.2f} "
                      f"| {' | '.join(passes)} | {r['fixed_bytes'] / MiB:.0f} "
                      f"| {above_fixed(r) / max(above_fixed(one), 1):.2f} |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"\nload average at the end: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
