"""Time and peak memory of one one-shot tuning step (Tune-A-Video, EI²) against the number of frames.

    python bench/tuning.py                                   # CPU fp32, 64 px, frames 1 2 4, both methods
    python bench/tuning.py --size 128 --frames 2 4 --methods ei2
    python bench/tuning.py --device cuda --size 512 --frames 8 16 24   # fp16 autocast, fp32 master weights

One step is `stemref.edit.tuning.Trainer.step`: forward and backward of the full-size inflated SD1.5 UNet
(random weights) on an F-frame clip, gradient clipping and AdamW over the tuned tensors only (74.35 M).
Each (method, checkpointing, F) runs in a fresh process; two steps run, since the first one also allocates
the gradients and AdamW's moments:
- time: wall time of the second step (CUDA: synchronised);
- memory: CPU, growth of the peak resident set (ru_maxrss) during the first step above the trainer with its
  weights built, minus the gradients and AdamW moments of the tuned tensors (12 bytes each, fp32), i.e. the
  step's working memory (activations kept for the backward, their gradients, temporaries); CUDA, the peak
  allocated during the second step above what was allocated before it.

The closing extrapolation fits working memory = a + b·F per method and checkpointing setting, scales b to a
512² clip (64² latent) in fp16, and adds the static memory of tuning on a GPU, printing every assumption.
The target (issue 11): 24 frames at 512² tune within 24 GB.

Dimension legend: F frames, h × w latent grid (size / 8).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from inversion_scaling import current_rss, fit_line, random_unet, run_process  # noqa: E402

METHODS = ("tune-a-video", "ei2")
UNET_PARAMS, TEMPORAL_PARAMS, TUNED_PARAMS = 859_520_964, 49_599_040, 74_354_880  # SD1.5; + Tune-A-Video; tuned
TEXT_VAE_FP16_BYTES = (123_060_480 + 83_653_863) * 2  # CLIP-L text encoder and VAE in fp16
GiB = 2**30


# ----------------------------------------------------------------------------------------------- child

def measure(method: str, checkpointing: bool, frames: int, a: argparse.Namespace) -> dict:
    import resource

    import torch

    from stemref.clip import CLIPTextModel
    from stemref.config import CLIPTextConfig
    from stemref.edit.tuning import METHODS as OPTIONS
    from stemref.edit.tuning import Trainer, TuneSettings
    from stemref.pipeline import StableDiffusion
    from stemref.scheduler import DDIMScheduler
    from stemref.tokenizer import CLIPTokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(a.device)) if cuda else (lambda: None)
    torch.manual_seed(a.seed)
    # the prompt's values do not matter here: a one-layer text encoder of CLIP-L's width stands in for CLIP
    text = CLIPTextModel(CLIPTextConfig(num_hidden_layers=1)).to(a.device).eval().requires_grad_(False)
    sd = StableDiffusion(CLIPTokenizer.openai(), text, None, random_unet(a.device, torch.float32, a.seed),
                         DDIMScheduler())
    settings = TuneSettings("a video", checkpointing=checkpointing, autocast="fp16" if cuda else None)
    trainer = Trainer(sd, method, OPTIONS[method], settings, frames)
    g = torch.Generator().manual_seed(a.seed + 1)
    side = a.size // 8
    x0, noise = (torch.randn(frames, 4, side, side, generator=g).to(a.device) for _ in range(2))
    t = torch.tensor([500])  # on the CPU, as tune() keeps it: ᾱ_t is looked up there, no device -> host read
    base = torch.cuda.memory_allocated(a.device) if cuda else current_rss()
    times = []
    for step in range(2):
        if cuda and step == 1:
            torch.cuda.reset_peak_memory_stats(a.device)
            base = torch.cuda.memory_allocated(a.device)
        sync()
        start = time.perf_counter()
        loss = trainer.step(x0, noise, t)
        sync()
        times.append(time.perf_counter() - start)
        if step == 0 and not cuda:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # Linux reports KiB
            peak -= TUNED_PARAMS * 12  # fp32 gradient + AdamW's two moments
    if cuda:
        peak = torch.cuda.max_memory_allocated(a.device) - base
    return {"method": method, "checkpointing": checkpointing, "frames": frames, "seconds": times[1],
            "first_seconds": times[0], "work_bytes": peak, "finite": loss == loss}


# ---------------------------------------------------------------------------------------------- parent

def run_child(method: str, checkpointing: bool, frames: int, a: argparse.Namespace) -> tuple[dict | None, str]:
    cmd = [sys.executable, __file__, "--child", method, str(int(checkpointing)), str(frames), "--device", a.device,
           "--size", str(a.size), "--seed", str(a.seed)] + (["--threads", str(a.threads)] if a.threads else [])
    return run_process(cmd, a)


def static_gpu_bytes() -> dict[str, float]:
    """Memory that does not grow with the clip, tuning on a GPU with fp16 autocast (Tune-A-Video's setup)."""
    weights = UNET_PARAMS + TEMPORAL_PARAMS
    return {"fp32 UNet (master weights, inflated)": weights * 4,
            "fp16 copies autocast makes of the weights (upper bound: all of them)": weights * 2,
            "fp32 gradients + AdamW moments of the tuned tensors": TUNED_PARAMS * 12,
            "fp16 text encoder and VAE": TEXT_VAE_FP16_BYTES}


def print_report(a: argparse.Namespace, rows: list[dict], skipped: list[str], device: str, torch_version: str) -> None:
    print(f"One tuning step (SD1.5 size, random weights), {a.size}×{a.size} px ({a.size // 8}×{a.size // 8} latent), "
          f"{'fp16 autocast, fp32 master weights' if a.device != 'cpu' else 'fp32'}, {device}, torch {torch_version}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("time = the second step; working memory = the step's peak above the weights "
          "(CPU: minus the tuned tensors' gradients and AdamW moments)\n")
    print("| method | checkpointing | frames | step (s) | first step (s) | working memory (GiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['frames']} | {r['seconds']:.2f} | "
              f"{r['first_seconds']:.2f} | {r['work_bytes'] / GiB:.3f} |")
    for line in skipped:
        print(f"| {line} |")
    static = static_gpu_bytes()
    print(f"\nExtrapolation to 512² (64² latent) in fp16 on a GPU. Assumptions: working memory grows linearly in "
          f"frames and in latent pixels (SDPA with flash/memory-efficient kernels keeps no score matrices); fp16 "
          f"halves the bytes of the measured fp32 working memory (factor 0.5; autocast keeps norm outputs in fp32, "
          f"so 0.6 is shown as a pessimistic bound); static memory ({sum(static.values()) / GiB:.2f} GiB):")
    for what, nbytes in static.items():
        print(f"  {what}: {nbytes / GiB:.2f} GiB")
    scale = (64 / (a.size // 8)) ** 2
    print("\n| method | checkpointing | GiB per frame measured | 8 frames (GiB) | 24 frames (GiB) "
          "| 24 frames ≤ 24 GB? |")
    print("|---|---|---:|---:|---:|---|")
    for method in a.methods:
        for ckpt in a.checkpointing:
            points = [r for r in rows if r["method"] == method and r["checkpointing"] == ckpt]
            if len(points) < 2:
                continue
            _, per_frame = fit_line(points, "work_bytes")
            if a.device != "cpu":  # measured in fp16 already
                total = {f: sum(static.values()) + per_frame * f * scale for f in (8, 24)}
                cells = [f"{total[f] / GiB:.1f}" for f in (8, 24)]
                fits = total[24] <= 24e9
            else:
                total = {(f, k): sum(static.values()) + per_frame * f * scale * k for f in (8, 24) for k in (0.5, 0.6)}
                cells = [f"{total[(f, 0.5)] / GiB:.1f}–{total[(f, 0.6)] / GiB:.1f}" for f in (8, 24)]
                fits = total[(24, 0.6)] <= 24e9
            print(f"| {method} | {'on' if ckpt else 'off'} | {per_frame / GiB:.3f} | {cells[0]} | {cells[1]} | "
                  f"{'yes' if fits else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (latent side = size / 8)")
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--checkpointing", type=int, nargs="+", choices=(0, 1), default=[0, 1],
                        help="1 = with gradient checkpointing, 0 = without (default: both)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--max-memory-gb", type=float, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "CHECKPOINTING", "FRAMES"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], bool(int(a.child[1])), int(a.child[2]), a)))
        return
    import torch

    device = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "CPU"
    rows, skipped = [], []
    for method in a.methods:
        for ckpt in a.checkpointing:
            for frames in a.frames:
                result, why = run_child(method, bool(ckpt), frames, a)
                if result:
                    rows.append(result)
                else:
                    skipped.append(f"{method} | {'on' if ckpt else 'off'} | {frames} | — | — | {why}")
                print(f"{method} checkpointing={ckpt} F={frames}: {result or why}", file=sys.stderr)
    print_report(a, rows, skipped, device, torch.__version__)


if __name__ == "__main__":
    main()
