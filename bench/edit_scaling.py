"""How a TokenFlow editing step scales with the number of frames: time per step and peak memory.

    python bench/edit_scaling.py                                    # fp32 on CPU, 128 px, frames 8 16 32 64
    python bench/edit_scaling.py --size 128 --frames 8 16 32 64 --threads 1 --steps 3
    python bench/edit_scaling.py --device cuda --dtype fp16 --size 512 --frames 8 16 32 64 128

Each F runs `stemref.edit.tokenflow.edit_latents` for --steps DDIM steps in its own fresh process, on:
- the full-size SD1.5 UNet with random weights (`random_unet` of bench/inversion_scaling.py);
- a `StableDiffusion` whose tokenizer is the real one (`CLIPTokenizer.openai()`) and whose text encoder is a
  stand-in, `FixedTextEncoder`: fixed random (B, 77, 768) embeddings, one per distinct token row, so the
  three prompts still differ. No VAE: edit_latents works on latents only;
- a synthetic `Inversion`: a random latents path (S + 1, F, 4, h, w) on the run's device and dtype, with the
  timesteps of an S-step DDIM path, so x_T and every source latent exist as after a real inversion.
The editor runs as `python -m stemref.edit` runs it: batch 8, guidance 7.5, PnP thresholds 0.5 / 0.8,
FreeU on (--no-freeu turns it off), keyframes drawn from the seed.

Reported per F:
- time per step: median wall time of the steps after the first (the first is cold on the CPU); per
  frame-step: that divided by F. One step runs the UNet on 3·(F + K) rows: the keyframe pass (3 branches ×
  K keyframes in one call) and the batch passes (3 × B rows each);
- memory: CPU, growth of the process's peak RSS (ru_maxrss) during the edit above the RSS with the weights
  and the latents path loaded; CUDA, torch.cuda.max_memory_allocated above the same (a 1-frame warm-up
  edit runs first, so one-off CUDA initialisation is not counted);
- the bytes the keyframe caches hold per keyframe (all 16 self-attention layers), measured on one extra
  keyframe pass with `KeyframeAttention` after the edit: the storages kept alive, and the tensors' own size.
A run that would exceed --max-seconds or --max-memory-gb is skipped ("—"): predicted from the smaller-F
runs, enforced by a timeout and, on the CPU, a resident-memory watchdog. Growth exponents are least-squares
slopes of log(value) vs log(F). The extrapolation to 300 frames at 512² in fp16 prints its assumptions.

Dimension legend: F frames, B frames per batch, K = ⌈F / B⌉ keyframes, S steps, h × w latent grid (size / 8).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stemref, even if another is installed
sys.path.insert(1, str(Path(__file__).resolve().parent))

from inversion_scaling import (FP16_WEIGHT_BYTES, GiB, MiB, current_rss, fit_line, fit_slope,  # noqa: E402
                               random_unet, run_process)

from stemref.edit.tokenflow import MATCH_CHUNK  # noqa: E402

TARGET_FRAMES, TARGET_SIZE, TARGET_STEPS, TARGET_BATCH, TARGET_GIB = 300, 512, 50, 8, 24.0  # the bar
SOURCE_PROMPT, TARGET_PROMPT = "a mallard floats on the pond", "a white swan floats on the pond"


# ----------------------------------------------------------------------------------------------- child

def fixed_text_encoder(seed: int, dtype):
    import torch

    class FixedTextEncoder(torch.nn.Module):
        """Stand-in for CLIP's text encoder: (B, 77) token ids -> fixed random (B, 77, 768) embeddings, the same
        for the same ids (seeded by them), so the source, negative and target prompts differ as they would."""

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            rows = [torch.randn(77, 768, generator=torch.Generator().manual_seed(seed + hash(tuple(r)) % 2**31))
                    for r in ids.tolist()]
            return torch.stack(rows).to(ids.device, dtype)  # (B, 77, 768)

    return FixedTextEncoder()


def measure(frames: int, a: argparse.Namespace) -> dict:
    import resource

    import torch

    from stemref.attention import RunInfo
    from stemref.edit.tokenflow import KeyframeAttention, edit_latents, resolve_freeu
    from stemref.inversion import Inversion, InversionSettings
    from stemref.pipeline import StableDiffusion
    from stemref.scheduler import DDIMScheduler
    from stemref.tokenizer import CLIPTokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[a.dtype]
    cuda = a.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(a.device)) if cuda else (lambda: None)
    sd = StableDiffusion(CLIPTokenizer.openai(), fixed_text_encoder(a.seed, dtype), None,
                         random_unet(a.device, dtype, a.seed), DDIMScheduler())
    timesteps = sorted(sd.scheduler.timesteps(a.steps).tolist())
    side = a.size // 8
    g = torch.Generator().manual_seed(a.seed + 1)
    path = torch.randn(a.steps + 1, frames, 4, side, side, generator=g).to(a.device, dtype)  # (S + 1, F, 4, h, w)
    inversion = Inversion(path, timesteps, InversionSettings(SOURCE_PROMPT, steps=a.steps))
    options = {"batch": a.batch, "freeu": a.freeu, "seed": a.seed}
    if cuda:
        warm = Inversion(path[:, :1], timesteps, inversion.settings)  # CUDA context, cuBLAS, kernel choice
        edit_latents(sd, warm, TARGET_PROMPT, **options)
        sync()
        torch.cuda.reset_peak_memory_stats(a.device)
        base = torch.cuda.memory_allocated(a.device)
    else:
        base = current_rss()

    marks = []
    progress = lambda done, total: (sync(), marks.append(time.perf_counter()))
    sync()
    marks.append(time.perf_counter())
    x = edit_latents(sd, inversion, TARGET_PROMPT, progress=progress, **options)
    peak = torch.cuda.max_memory_allocated(a.device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [t1 - t0 for t0, t1 in zip(marks, marks[1:])]

    cache = {}  # one keyframe's caches, from a keyframe pass as edit_latents runs it
    keyframe = KeyframeAttention(cache)
    context = torch.cat(sd.encode_prompt([SOURCE_PROMPT, "", TARGET_PROMPT]).split(1))  # (3, 77, 768)
    with torch.no_grad(), sd.unet.attention(lambda name: keyframe if name.endswith("attn1") else None):
        sd.unet(path[-1, :1].repeat(3, 1, 1, 1), timesteps[-1], context, RunInfo(1, 0), freeu=resolve_freeu(a.freeu))
    tensors = [t for f in cache.values() for t in (f.inputs, f.outputs)]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return {"frames": frames, "keyframes": math.ceil(frames / a.batch), "step_seconds": statistics.median(steps[1:]),
            "first_step_seconds": steps[0], "edit_seconds": sum(steps), "peak_bytes": peak - base,
            "total_bytes": peak, "path_bytes": path.numel() * path.element_size(),
            "cache_held_bytes": sum(held.values()), "cache_tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "finite": bool(x.isfinite().all())}


# ---------------------------------------------------------------------------------------------- parent

def forwarded_args(a: argparse.Namespace) -> list[str]:
    args = ["--device", a.device, "--dtype", a.dtype, "--size", str(a.size), "--steps", str(a.steps),
            "--batch", str(a.batch), "--seed", str(a.seed), "--freeu" if a.freeu else "--no-freeu"]
    return args + (["--threads", str(a.threads)] if a.threads else [])


def predicted_over(points: list[dict], frames: int, a: argparse.Namespace) -> str:
    """Why a run at `frames` would exceed the limits, judged from the measured smaller-F runs."""
    if not points:
        return ""
    last = points[-1]

    def extrapolate(key: str) -> float:
        slope = fit_slope(points[-2:], key) if len(points) > 1 else 1.0
        return last[key] * (frames / last["frames"]) ** max(slope, 1.0)  # at least linear: 3·(F + K) rows

    startup = last["run_seconds"] - last["edit_seconds"]  # imports, weights, cache probe: about the same at every F
    if startup + extrapolate("edit_seconds") > a.max_seconds:
        return f"over {a.max_seconds:.0f} s (predicted)"
    resident = last["total_bytes"] - last["peak_bytes"]  # weights, latents path and libraries
    if a.device == "cpu" and resident + extrapolate("peak_bytes") > a.max_memory_gb * GiB:
        return f"over {a.max_memory_gb:g} GiB (predicted)"
    return ""


def print_report(a: argparse.Namespace, results: list[dict], skipped: dict, device_name: str, torch_version: str,
                 load: tuple[float, float]) -> None:
    print(f"TokenFlow editing (stemref.edit.tokenflow.edit_latents; SD1.5-size UNet, random weights), {a.size}×{a.size} "
          f"px ({a.size // 8}×{a.size // 8} latent), {a.dtype}, {device_name}, torch {torch_version}")
    print(f"batch {a.batch} (K = ⌈F/{a.batch}⌉ keyframes), FreeU {'on' if a.freeu else 'off'}, {a.steps} steps per run: "
          f"time = median of steps 2–{a.steps}; memory = peak extra {'GPU memory' if a.device != 'cpu' else 'RSS'} "
          f"above the weights and the latents path; — = skipped (limit {a.max_seconds:.0f} s, {a.max_memory_gb:g} GiB "
          f"per run)")
    if a.device == "cpu":
        print(f"CPU load average (1 min): {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} "
              f"cores (above the threads used, other processes were sharing them)")
    print()
    print("| F | keyframes | UNet rows per step | s / step | s / frame-step | peak extra (MiB) | latents path (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    done = {r["frames"]: r for r in results}
    for f in a.frames:
        r = done.get(f)
        if not r:
            print(f"| {f} | {math.ceil(f / a.batch)} | {3 * (f + math.ceil(f / a.batch))} | — | — | — | — |")
            continue
        print(f"| {f} | {r['keyframes']} | {3 * (f + r['keyframes'])} | {r['step_seconds']:.1f} | "
              f"{r['step_seconds'] / f:.2f} | {r['peak_bytes'] / MiB:,.0f} | {r['path_bytes'] / MiB:,.1f} |"
              + ("" if r["finite"] else " output not finite"))
    for f, why in sorted(skipped.items()):
        print(f"- skipped F={f}: {why}")
    if len(results) < 2:
        return
    print(f"\nGrowth exponents (log-log slope vs F over F = {', '.join(str(r['frames']) for r in results)}; "
          f"1 = linear, 2 = quadratic): time per step {fit_slope(results, 'step_seconds'):.2f}, "
          f"peak memory {fit_slope(results, 'peak_bytes'):.2f}")
    print_extrapolation(a, results)


def print_extrapolation(a: argparse.Namespace, results: list[dict]) -> None:
    """Peak memory at 300 frames, 512², fp16, 50 steps, batch 8, from the measured per-keyframe trend.

    One step's peak is the larger of the keyframe pass (3·K rows, caches filling) and a batch pass (3·B rows,
    caches full): offset + c·K once K ≥ B, with c a keyframe's caches plus its three rows of keyframe-pass
    activations. At 300 frames K = 38 ≫ B = 8, so only runs with K ≥ B (keyframe-pass-bound) predict it.
    """
    K = math.ceil(TARGET_FRAMES / TARGET_BATCH)
    tokens = (TARGET_SIZE / a.size) ** 2
    scale = tokens * (0.5 if a.dtype == "fp32" else 1.0)
    side = TARGET_SIZE // 8
    path = (TARGET_STEPS + 1) * TARGET_FRAMES * 4 * side * side * 2
    match = MATCH_CHUNK * side * side * 4
    bound = [{"frames": r["keyframes"], "peak_bytes": r["peak_bytes"]} for r in results if r["keyframes"] >= a.batch]
    print(f"\nExtrapolation (not a measurement): editing {TARGET_FRAMES} frames at {TARGET_SIZE}² px in fp16 with "
          f"{TARGET_STEPS} steps, batch {TARGET_BATCH} (K = {K} keyframes: {3 * K} UNet rows in the keyframe pass, "
          f"{3 * TARGET_BATCH} in a batch pass); the issue's bar: peak linear in F, under {TARGET_GIB:.0f} GB\n")
    if len(bound) < 2:
        offset, per_frame = fit_line(results, "peak_bytes")
        low = (per_frame * TARGET_FRAMES + max(offset, 0.0)) * scale + match + path + FP16_WEIGHT_BYTES
        print(f"- no two measured runs are keyframe-pass-bound (K ≥ B = {a.batch}, i.e. F ≥ {a.batch ** 2}): their "
              f"peak is set by the batch passes, so their per-frame trend ({offset / MiB:,.0f} MiB + "
              f"{per_frame / MiB:,.2f} MiB per frame; {low / GiB:,.1f} GiB at the target by the same assumptions "
              f"as below) misses the keyframe pass's growth and predicts nothing. Measure the per-keyframe cost "
              f"with --batch 2 (K ≥ B from F = 4)")
        return
    offset, per_keyframe = fit_line(bound, "peak_bytes")  # "frames" holds K here: peak = offset + c·K
    held = results[-1]["cache_held_bytes"]
    activations = (per_keyframe * K + max(offset, 0.0)) * scale
    total = activations + path + match + FP16_WEIGHT_BYTES
    print(f"- measured at {a.size}², {a.dtype}, batch {a.batch}: peak extra ≈ {offset / MiB:,.0f} MiB + "
          f"{per_keyframe / MiB:,.1f} MiB per keyframe (least squares over the keyframe-pass-bound runs, K = "
          f"{', '.join(str(p['frames']) for p in bound)}; growth exponent in K {fit_slope(bound, 'peak_bytes'):.2f}); "
          f"a keyframe's caches hold {held / MiB:,.1f} MiB of it (measured), the rest is its 3 rows of keyframe-pass "
          f"activations and extended-attention keys and values")
    print(f"- assumptions: the per-keyframe cost is the same at batch {TARGET_BATCH} (caches and keyframe-pass rows do "
          f"not depend on B) and ∝ tokens per frame: ×{tokens:g} for {TARGET_SIZE}²; no N×N or K·N × K·N matrix is "
          f"formed (SDPA's fused kernels: flash on the CPU, flash or memory-efficient on CUDA); fp16 halves "
          f"activation bytes{' vs fp32 (×0.5 applied)' if a.dtype == 'fp32' else ''}; the offset (allocator and "
          f"kernel workspaces, the F-frame latents) is scaled the same way, an upper bound; plus the "
          f"nearest-neighbour similarity chunk ({MATCH_CHUNK} × {side * side} in fp32 = {match / MiB:,.0f} MiB), the "
          f"inversion's latents path kept in memory ({TARGET_STEPS + 1} × {TARGET_FRAMES} × 4 × {side} × {side} × 2 "
          f"bytes = {path / MiB:,.0f} MiB) and the UNet weights ({FP16_WEIGHT_BYTES / 1e9:.2f} GB in fp16); the text "
          f"encoder, the VAE and the CUDA context are not included")
    print(f"- ({per_keyframe / MiB:,.1f} MiB × {K} + {max(offset, 0.0) / MiB:,.0f} MiB) × {scale:g} = "
          f"{activations / GiB:,.1f} GiB (keyframe caches {held * K * scale / GiB:,.1f}, keyframe-pass activations "
          f"{(per_keyframe - held) * K * scale / GiB:,.1f}, offset {max(offset, 0.0) * scale / GiB:,.1f}) + "
          f"{match / GiB:.2f} GiB matching + {path / GiB:.2f} GiB path + {FP16_WEIGHT_BYTES / GiB:.2f} GiB weights "
          f"= **{total / GiB:,.1f} GiB** → {'within' if total < TARGET_GIB * 1e9 else 'exceeds'} "
          f"{TARGET_GIB:.0f} GB")
    views = results[-1]["cache_held_bytes"] - results[-1]["cache_tensor_bytes"]
    print(f"- of the caches, {views * K * scale / GiB:,.1f} GiB are storages the cached tensors are views of, "
          f"beyond the tensors themselves")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels, a multiple of 8 (latent: size/8)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64], help="video lengths F to measure")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per run (at least 2: the first is not timed)")
    parser.add_argument("--batch", type=int, default=8, help="frames per batch (one keyframe each)")
    parser.add_argument("--freeu", action=argparse.BooleanOptionalAction, default=True, help="FreeU as STEM edits")
    parser.add_argument("--max-seconds", type=float, default=1800, help="limit per run, process start included")
    parser.add_argument("--max-memory-gb", type=float, default=10, help="CPU: limit on a run's resident memory (GiB)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, metavar="FRAMES", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.size < 64 or a.size % 8:
        parser.error(f"--size must be a multiple of 8 of at least 64 (latent side size / 8), got {a.size}")
    if a.steps < 2:
        parser.error(f"--steps must be at least 2 (the first step is cold and not timed), got {a.steps}")
    if min([*a.frames, a.batch] + ([a.threads] if a.threads is not None else [])) < 1:
        parser.error("--frames, --batch and --threads must be positive")
    if a.device != "cpu" and not a.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda[:i], got {a.device!r}")
    if a.dtype == "fp16" and a.device == "cpu":
        parser.error("fp16 is for --device cuda; on the CPU use fp32")
    if a.child:
        print(json.dumps(measure(a.child, a)))
        return

    import torch

    a.frames = sorted(set(a.frames))
    load_before = os.getloadavg()[0]
    results, skipped = [], {}
    for f in a.frames:
        why = f"F={min(skipped)} was already skipped" if skipped else predicted_over(results, f, a)
        if not why:
            print(f"[F={f}] running", file=sys.stderr, flush=True)
            result, why = run_process([sys.executable, __file__, "--child", str(f)] + forwarded_args(a), a)
            if result:
                results.append(result)
                print(f"[F={f}] {result['step_seconds']:.1f} s per step, {result['peak_bytes'] / MiB:,.0f} MiB"
                      f"{'' if result['finite'] else ' (output not finite)'}", file=sys.stderr, flush=True)
        if why:
            skipped[f] = why
            print(f"[F={f}] skipped: {why}", file=sys.stderr, flush=True)
    device_name = (torch.cuda.get_device_name(a.device) if a.device != "cpu"
                   else f"CPU ({a.threads or torch.get_num_threads()} of {os.cpu_count()} cores used)")
    print_report(a, results, skipped, device_name, torch.__version__, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
