"""FateZero's attention store: bytes per frame per step, peak host memory and editing time against frames.

    python bench/fatezero_store.py                                   # fp32 on CPU, 128 px, frames 2 4 8, 10 steps
    python bench/fatezero_store.py --size 256 --frames 2 4 8 16 --contexts fatezero stem --steps 10
    python bench/fatezero_store.py --device cuda --dtype fp16 --size 512 --frames 8 16 32 64 --steps 50

Each (context, F) runs in its own fresh process: the full-size SD1.5 UNet and CLIP text encoder with random
weights, a random F-frame inversion path (what the store records does not depend on the latents' values), the
store recorded by replaying the inversion's UNet calls (`fatezero.replay_inversion`) and the edit
(`fatezero.denoise`, CFG with guidance 7.5) with both windows over every step, so that every step stores
what a step inside both windows stores. The fused layers are those the official rule picks at 512² (query
length ≤ 1024 there, i.e. all but the top level): at other sizes the limit scales with the pixel count.

Reported per run:
- store bytes per frame per step: the recorded bytes / (F · steps), and scaled to 512² fp16 with 64 frames
  (the layers' input tokens grow with the pixels; the prompt keys and STEM's bases are per layer and step),
  compared with the official code's 97 MB (fp16, 512², 'mid' context: post-softmax maps of 11 self- and
  11 cross-attention layers);
- peak store memory: the most the store held in memory at once (its resident steps under the budget plus
  the step being recorded, which lives on the model's device), and the process's peak resident set growth
  (ru_maxrss, CPU) over the run, weights excluded;
- time: recording (replay) and editing, seconds per step.

The closing lines extrapolate to the issue's bar: 64 frames at 512², 50 steps, fp16 (store size on disk, and
the most the store holds in host memory with the given --memory-budget).

Dimension legend: F frames, N tokens of a layer, C its channels, K STEM bases, S steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# The official store per frame per step (fp16, 512², 8 heads, 'mid' context): the self-attention maps of the
# 5 layers at 32² (8·1024²·2 B = 16.8 MB each, 83.9 MB) and the 5 at 16² (5.2 MB), the cross-attention maps
# of those layers (6.3 + 1.6 MB) and the 8² layers (≈0.15 MB): ≈ 97 MB.
OFFICIAL_BYTES = 97e6
TARGET_FRAMES, TARGET_SIZE, TARGET_STEPS, TARGET_HOST = 64, 512, 50, 4e9
MB, GiB = 1e6, 2**30
SOURCE, TARGET = "a silver jeep driving down a curvy road in the countryside", \
    "watercolor painting of a silver jeep driving down a curvy road in the countryside"


def build(device: str, dtype):
    import torch

    from inversion_scaling import random_unet
    from stemref.clip import CLIPTextModel
    from stemref.config import CLIPTextConfig
    from stemref.pipeline import StableDiffusion
    from stemref.scheduler import DDIMScheduler
    from stemref.tokenizer import CLIPTokenizer

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig()).to(device, dtype).eval()
    return StableDiffusion(CLIPTokenizer.openai(), text, None, random_unet(device, dtype, 0), DDIMScheduler())


def measure(context: str, frames: int, a: argparse.Namespace) -> dict:
    import torch

    from stemref.edit import fatezero
    from stemref.edit.attention_store import AttentionStore
    from stemref.inversion import SELF_ATTENTION, Inversion, InversionSettings

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[a.dtype]
    sd = build(a.device, dtype)
    rss_weights = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    latent = a.size // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(a.steps + 1, frames, 4, latent, latent, generator=g).to(dtype)
    options = {"fatezero": {"mode": "mid", "min_channels": 640}, "stem": {"chunk": a.chunk}}.get(context, {})
    inv = Inversion(latents, sd.scheduler.timesteps(a.steps).flip(0).tolist(),
                    InversionSettings(SOURCE, a.steps, context, 1.0, SELF_ATTENTION, 0, options))
    max_tokens = 1024 * a.size**2 // TARGET_SIZE**2
    settings = fatezero.FateZeroSettings(cross_window=1.0, self_window=1.0, controller="refine",
                                         reweight={"watercolor": 10}, max_tokens=max_tokens)
    plan = fatezero.Plan.make(sd, settings, a.steps, SOURCE, TARGET)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    with AttentionStore(memory_budget=int(a.memory_budget * GiB)) as store:
        sync()
        t0 = time.perf_counter()
        fatezero.replay_inversion(sd, inv, plan, store)
        sync()
        t1 = time.perf_counter()
        fatezero.denoise(sd, inv, plan, store)
        sync()
        t2 = time.perf_counter()
        stored = store.resident_bytes + store.disk_bytes
        kinds = stored_bytes(store)
        peak_store = store.peak_bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_weights
    return {"context": context, "frames": frames, "bytes_per_frame_step": stored / (frames * a.steps),
            "kinds": kinds, "peak_store": peak_store, "peak_rss_growth": rss,
            "record_s": (t1 - t0) / a.steps, "edit_s": (t2 - t1) / a.steps}


def stored_bytes(store) -> dict:
    """Bytes in the store by kind: x (the layers' input tokens, per frame, growing with the pixels), k (the
    source prompt's keys of cross-attention layers) and mu (STEM's bases): per layer and step, fixed."""
    out = {"x": 0, "k": 0, "mu": 0}
    for t in store.steps():
        with store.read(t) as step:
            names = store.resident[t] if t in store.resident else {k.split("/")[0] for k in step.file.keys()}
            for name in names:
                for key in out:
                    x = step.get(name, key)
                    out[key] += 0 if x is None else x.numel() * x.element_size()
    return out


def run_child(context: str, frames: int, a: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--child", context, str(frames), *forwarded(a)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)} if a.threads else os.environ
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.max_seconds, env=env)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode:
        sys.stderr.write(done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def forwarded(a: argparse.Namespace) -> list[str]:
    return ["--device", a.device, "--dtype", a.dtype, "--size", str(a.size), "--steps", str(a.steps),
            "--memory-budget", str(a.memory_budget), "--chunk", str(a.chunk)]


def at_512(r: dict, steps: int, scale: float) -> float:
    """Store bytes per frame per step at 512² with TARGET_FRAMES frames: x grows with the pixels, the prompt keys
    and STEM's bases are per layer and step whatever the frames and the size."""
    kinds = r["kinds"]
    return kinds["x"] / (r["frames"] * steps) * scale + (kinds["k"] + kinds["mu"]) / (steps * TARGET_FRAMES)


def report(rows: list[dict], a: argparse.Namespace) -> str:
    scale = (TARGET_SIZE / a.size) ** 2
    unit = 2 if a.dtype == "fp32" else 1  # fp32 -> fp16 bytes at the target
    load = os.getloadavg()[0]
    import torch

    lines = [f"## FateZero store: {a.dtype} on {a.device}, {a.size}², {a.steps} steps, torch {torch.__version__}, "
             f"load average {load:.1f}", "",
             "| context | F | store / frame / step | → at 512² fp16 | official 97 MB ÷ | peak store memory | "
             "peak RSS growth | record s/step | edit s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    at_target = {}
    for r in rows:
        if r is None:
            continue
        per_frame = r["bytes_per_frame_step"]
        target = at_512(r, a.steps, scale) / unit
        at_target[r["context"]] = target
        lines.append(f"| {r['context']} | {r['frames']} | {per_frame / MB:.2f} MB | {target / MB:.1f} MB | "
                     f"{OFFICIAL_BYTES / target:.1f}× | {r['peak_store'] / MB:.1f} MB | "
                     f"{r['peak_rss_growth'] / MB:.0f} MB | {r['record_s']:.2f} | {r['edit_s']:.2f} |")
    lines += ["", f"Extrapolation to {TARGET_FRAMES} frames at {TARGET_SIZE}², {TARGET_STEPS} steps, fp16, memory "
              f"budget {a.memory_budget:g} GiB (target: ≤ 1/4 of 97 MB per frame per step, ≤ 4 GB host memory):", ""]
    for context, per_frame in at_target.items():
        total = per_frame * TARGET_FRAMES * TARGET_STEPS
        step = per_frame * TARGET_FRAMES
        budget = min(a.memory_budget * GiB, total)
        lines.append(f"- {context}: {per_frame / MB:.1f} MB per frame per step ({OFFICIAL_BYTES / per_frame:.1f}× "
                     f"below the official 97 MB); every step stored: {total / 1e9:.1f} GB (official "
                     f"{OFFICIAL_BYTES * TARGET_FRAMES * TARGET_STEPS / 1e9:.0f} GB); one step {step / 1e9:.2f} GB; "
                     f"store in host memory at most {budget / 1e9:.2f} GB on a GPU (the step being recorded stays "
                     f"on the device, disk reads are one layer at a time), {(budget + step) / 1e9:.2f} GB on a CPU.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--size", type=int, default=128, help="frame side in pixels (a multiple of 64)")
    p.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--contexts", nargs="+", default=["fatezero", "stem"], choices=("fatezero", "stem", "1-frame",
                                                                                   "2-frame"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--memory-budget", type=float, default=1.0, help="GiB of store kept in memory (default 1)")
    p.add_argument("--chunk", type=int, default=16_384, help="STEM's token chunk")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    p.add_argument("--max-seconds", type=float, default=1200)
    p.add_argument("--child", nargs=2, metavar=("CONTEXT", "FRAMES"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], int(a.child[1]), a)))
        return
    rows = []
    for context in a.contexts:
        for frames in a.frames:
            rows.append(run_child(context, frames, a))
            print(f"{context} F={frames}: {'done' if rows[-1] else 'failed or over --max-seconds'}",
                  file=sys.stderr, flush=True)
    print(report(rows, a))


if __name__ == "__main__":
    main()
