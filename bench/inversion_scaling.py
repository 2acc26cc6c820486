"""How one inversion UNet forward scales with the number of frames under each self-attention context.

    python bench/inversion_scaling.py                              # fp32 on CPU, 256 px, frames 8 16 32 64
    python bench/inversion_scaling.py --size 128 --frames 8 16 32 64 --max-seconds 300
    python bench/inversion_scaling.py --device cuda --dtype fp16 --size 512 --frames 8 16 32 64 128 --chunk 65536

One inversion step runs the full-size SD1.5 UNet (random weights) once on a whole F-frame video: F latent
rows, the same prompt embedding on every row (guidance 1, as in STEM's inversion), RunInfo(frames=F), and
the chosen context processor in all 16 self-attention layers (attn1). Contexts (stemref.context):
"1-frame" (each frame itself), "2-frame" (first + previous frame), "all-frame" (every token of every frame,
quadratic in F) and "stem" (K = 256 EM bases from every frame, linear in F).

Every (context, F) pair runs in its own fresh process, so no measurement inherits another's allocations:
- time: wall time of the forward (median of --repeats; on CPU the first, measured forward is cold; on
  CUDA a 1-frame warm-up forward runs first);
- memory: CPU, growth of the process's peak RSS (resource.getrusage ru_maxrss) during the first forward
  above the RSS with the weights loaded; CUDA, torch.cuda.max_memory_allocated above the weights;
- self-attention time: the wall time spent inside the 16 attn1 processors during that forward (the
  processor is wrapped in a timer), i.e. the context's own cost, free of the convs and linears around it.

A pair that would exceed --max-seconds or --max-memory-gb is skipped and shown as "—": predicted from the
same context's smaller-F runs (log-log trend of its last two points), enforced by a timeout and, on CPU,
by a resident-memory watchdog that stops the child. The fitted growth exponent is the least-squares slope
of log(value) vs log(F). The closing extrapolation scales STEM's measured memory to 128 frames at 512² in
fp16 and compares it with the issue's bar: "128 frames at 512² must fit on one 24 GB GPU in fp16".

Dimension legend: F frames, h × w latent grid (size / 8), K EM bases.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stemref, even if another is installed

from stemref.context import DEFAULT_CHUNK  # noqa: E402
from stemref.em import em_bases  # noqa: E402

CONTEXTS = ("1-frame", "2-frame", "all-frame", "stem")
TARGET_FRAMES, TARGET_SIZE, TARGET_GIB = 128, 512, 24.0  # the bar
FP16_WEIGHT_BYTES = 859_520_964 * 2  # SD1.5 UNet parameters in fp16: 1.72 GB
GiB, MiB = 2**30, 2**20


# ----------------------------------------------------------------------------------------------- child

def random_unet(device: str, dtype, seed: int):
    """Full-size SD1.5 UNet with random weights: built on meta, then filled in place on the device.

    Matrices and kernels are uniform in ±1/√fan_in (PyTorch's default bound), norm scales 1, biases 0: a
    well-scaled network whose activations stay finite in fp16, without paying for nn.init on 860 M
    parameters on the CPU.
    """
    import torch

    from stemref.unet import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, p in unet.state_dict().items():
        w = torch.empty(p.shape, device=device, dtype=dtype)
        if p.dim() > 1:
            bound = (p[0].numel()) ** -0.5  # fan_in = in_channels · kernel area
            w.uniform_(-bound, bound, generator=g)
        else:
            w.fill_(1.0 if name.endswith("weight") else 0.0)  # 1-d weights are GroupNorm/LayerNorm scales
        state[name] = w
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval()


class TimedProcessor:
    """A processor that times the processor it wraps; `seconds` sums the wall time of its calls, `levels` the
    same per tokens per frame (N = h·w of the layer) with `calls` counting them, and `outputs` keeps each
    layer's last output if asked."""

    def __init__(self, inner, sync, keep_outputs: bool = False):
        self.inner, self.sync, self.keep_outputs = inner, sync, keep_outputs
        self.seconds, self.levels, self.calls, self.outputs = 0.0, {}, {}, {}

    def __call__(self, q, k, v, call):
        self.sync()
        start = time.perf_counter()
        out = self.inner(q, k, v, call)
        self.sync()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.levels[q.shape[-2]] = self.levels.get(q.shape[-2], 0.0) + seconds
        self.calls[q.shape[-2]] = self.calls.get(q.shape[-2], 0) + 1
        if self.keep_outputs:
            self.outputs[call.name] = out.clone()
        return out

    def reset(self):
        self.seconds, self.levels, self.calls, self.outputs = 0.0, {}, {}, {}


def current_rss() -> int:
    """Resident bytes now (Linux /proc); the peak's baseline, since ru_maxrss only ever grows."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(context: str, frames: int, a: argparse.Namespace) -> dict:
    import resource

    import torch

    from stemref.attention import RunInfo
    from stemref.context import context_processor

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[a.dtype]
    cuda = a.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(a.device)) if cuda else (lambda: None)
    unet = random_unet(a.device, dtype, a.seed)
    options = {"stem": {"num_bases": a.num_bases, "chunk": a.chunk}, "all-frame": {"chunk_frames": a.all_frame_chunk}}
    generator = torch.Generator(a.device).manual_seed(a.seed)
    timed = TimedProcessor(context_processor(context, generator=generator, **options.get(context, {})), sync)

    g = torch.Generator().manual_seed(a.seed + 1)
    side = a.size // 8
    x = torch.randn(frames, 4, side, side, generator=g).to(a.device, dtype)  # (F, 4, h, w)
    prompt = torch.randn(1, 77, 768, generator=g).to(a.device, dtype)  # (1, L, D), one prompt for every frame
    times, attn_times = [], []
    with torch.inference_mode(), unet.attention(lambda name: timed if name.endswith("attn1") else None):
        forward = lambda n: unet(x[:n], 500, prompt.expand(n, -1, -1), RunInfo(frames=n))
        if cuda:
            forward(1)  # CUDA context, cuBLAS handles and kernel selection are one-off costs, not the context's
            sync()
            torch.cuda.reset_peak_memory_stats(a.device)
            base = torch.cuda.memory_allocated(a.device)
        else:
            base = current_rss()
        for i in range(a.repeats):
            timed.reset()
            sync()
            start = time.perf_counter()
            out = forward(frames)
            sync()
            times.append(time.perf_counter() - start)
            attn_times.append(timed.seconds)
            if i == 0:
                peak = (torch.cuda.max_memory_allocated(a.device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
                finite = bool(out.isfinite().all())
            del out
    total = (torch.cuda.max_memory_allocated(a.device) if cuda
             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"context": context, "frames": frames, "seconds": statistics.median(times),
            "attn_seconds": statistics.median(attn_times), "peak_bytes": peak - base, "total_bytes": total,
            "finite": finite}


# ---------------------------------------------------------------------------------------------- parent

def run_child(context: str, frames: int, a: argparse.Namespace) -> tuple[dict | None, str]:
    """One (context, F) measurement in a fresh process; (result, "") or (None, why it has none)."""
    return run_process([sys.executable, __file__, "--child", context, str(frames)] + forwarded_args(a), a)


def run_process(cmd: list[str], a: argparse.Namespace) -> tuple[dict | None, str]:
    """Run a measuring child that prints its result as JSON on its last line, within a.max_seconds and (CPU)
    a.max_memory_gb of resident memory; (result with its run_seconds, "") or (None, why it has none)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        start, peak_rss, why = time.monotonic(), 0, ""
        while child.poll() is None:
            time.sleep(0.1)
            if a.device == "cpu":
                peak_rss = max(peak_rss, rss_of(child.pid))
            if time.monotonic() - start > a.max_seconds:
                why = f"over {a.max_seconds:.0f} s"
            elif peak_rss > a.max_memory_gb * GiB:
                why = f"over {a.max_memory_gb:g} GiB"
            if why:
                child.kill()
                child.wait()
                return None, why
        out.seek(0), err.seek(0)
        lines = out.read().strip().splitlines()
        if child.returncode or not lines:
            message = err.read().strip().splitlines()
            oom = any("out of memory" in line.lower() for line in message)
            return None, "out of memory" if oom else f"failed: {message[-1] if message else child.returncode}"
        return {**json.loads(lines[-1]), "run_seconds": time.monotonic() - start}, ""


def rss_of(pid: int) -> int:
    """Resident bytes of a live process (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def forwarded_args(a: argparse.Namespace) -> list[str]:
    args = ["--device", a.device, "--dtype", a.dtype, "--size", str(a.size), "--num-bases", str(a.num_bases),
            "--all-frame-chunk", str(a.all_frame_chunk), "--repeats", str(a.repeats), "--seed", str(a.seed)]
    return args + (["--chunk", str(a.chunk)] if a.chunk else []) + (["--threads", str(a.threads)] if a.threads else [])


def predicted_over(points: list[dict], frames: int, a: argparse.Namespace) -> str:
    """Why a run at `frames` would exceed the limits, judged from the context's measured smaller-F runs."""
    if not points:
        return ""

    def extrapolate(key: str) -> float:
        last = points[-1]
        slope = fit_slope(points[-2:], key) if len(points) > 1 else 1.0
        return last[key] * (frames / last["frames"]) ** max(slope, 1.0)  # at least linear: F rows of work

    startup = points[-1]["run_seconds"] - a.repeats * points[-1]["seconds"]  # imports, weights: the same at every F
    if startup + a.repeats * extrapolate("seconds") > a.max_seconds:
        return f"over {a.max_seconds:.0f} s (predicted)"
    resident = points[-1]["total_bytes"] - points[-1]["peak_bytes"]  # weights and libraries
    if a.device == "cpu" and resident + extrapolate("peak_bytes") > a.max_memory_gb * GiB:
        return f"over {a.max_memory_gb:g} GiB (predicted)"
    return ""


def fit_slope(points: list[dict], key: str) -> float:
    """Least-squares slope of log(value) vs log(F): the growth exponent (1 linear, 2 quadratic)."""
    xs = [math.log(p["frames"]) for p in points]
    ys = [math.log(max(p[key], 1e-9)) for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fit_line(points: list[dict], key: str) -> tuple[float, float]:
    """Least-squares value = a + b·F."""
    xs, ys = [p["frames"] for p in points], [p[key] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def print_report(a: argparse.Namespace, results: dict, skipped: dict, device_name: str, torch_version: str,
                 load: tuple[float, float]) -> None:
    contexts = [c for c in CONTEXTS if c in a.contexts]
    stem_opts = f"K={a.num_bases}, chunk={a.chunk} tokens"
    print(f"One inversion UNet forward (SD1.5 size, random weights), {a.size}×{a.size} px "
          f"({a.size // 8}×{a.size // 8} latent), {a.dtype}, {device_name}, torch {torch_version}")
    print(f"stem: {stem_opts}; all-frame: {a.all_frame_chunk} query frame(s) per attention call; "
          f"time = {'median of ' + str(a.repeats) if a.repeats > 1 else 'one'} forward(s); memory = peak extra "
          f"{'GPU memory' if a.device != 'cpu' else 'RSS'} above the weights; — = skipped "
          f"(limit {a.max_seconds:.0f} s, {a.max_memory_gb:g} GiB per run)")
    if a.device == "cpu":
        print(f"CPU load average (1 min): {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} "
              f"cores (above the threads used, other processes were sharing them)")
    print()

    def cell(c: str, f: int, fmt) -> str:
        r = results.get((c, f))
        return fmt(r) if r else "—"

    print("| F | " + " | ".join(f"{c} time (s) | {c} mem (MiB)" for c in contexts) + " |")
    print("|---:|" + "---:|" * (2 * len(contexts)))
    for f in a.frames:
        cells = [x for c in contexts for x in (cell(c, f, lambda r: f"{r['seconds']:.1f}"),
                                               cell(c, f, lambda r: f"{r['peak_bytes'] / MiB:,.0f}"))]
        print(f"| {f} | " + " | ".join(cells) + " |")

    print("\nSelf-attention (16 attn1 layers) time in s, and its share of the forward:\n")
    print("| F | " + " | ".join(contexts) + " |")
    print("|---:|" + "---:|" * len(contexts))
    for f in a.frames:
        cells = [cell(c, f, lambda r: f"{r['attn_seconds']:.2f} ({100 * r['attn_seconds'] / r['seconds']:.0f} %)")
                 for c in contexts]
        print(f"| {f} | " + " | ".join(cells) + " |")

    print("\nGrowth exponents (log-log slope vs F over the measured points; 1 = linear, 2 = quadratic):\n")
    print("| context | frames fitted | forward time | peak memory | self-attention time |")
    print("|---|---|---:|---:|---:|")
    for c in contexts:
        points = [results[(c, f)] for f in a.frames if (c, f) in results]
        if len(points) < 2:
            print(f"| {c} | {', '.join(str(p['frames']) for p in points) or '—'} | — | — | — |")
            continue
        slopes = [f"{fit_slope(points, k):.2f}" for k in ("seconds", "peak_bytes", "attn_seconds")]
        print(f"| {c} | {', '.join(str(p['frames']) for p in points)} | " + " | ".join(slopes) + " |")

    for (c, f), why in sorted(skipped.items(), key=lambda kv: (CONTEXTS.index(kv[0][0]), kv[0][1])):
        print(f"- skipped {c} at F={f}: {why}")
    print_extrapolation(a, [results[("stem", f)] for f in a.frames if ("stem", f) in results])


def print_extrapolation(a: argparse.Namespace, stem: list[dict]) -> None:
    """STEM's peak memory at 128 frames, 512², fp16, from the measured per-frame trend."""
    if len(stem) < 2:
        return
    offset, per_frame = fit_line(stem, "peak_bytes")
    scale = (TARGET_SIZE / a.size) ** 2 * (0.5 if a.dtype == "fp32" else 1.0)
    activations = per_frame * scale * TARGET_FRAMES + max(offset, 0.0)
    total = activations + FP16_WEIGHT_BYTES
    print(f"\nExtrapolation: STEM at {TARGET_FRAMES} frames, {TARGET_SIZE}² px, fp16 (the issue's bar: fits on one "
          f"{TARGET_GIB:.0f} GB GPU)\n")
    print(f"- measured at {a.size}², {a.dtype}: peak extra ≈ {offset / MiB:,.0f} MiB + {per_frame / MiB:,.1f} MiB "
          f"per frame (least squares over F = {', '.join(str(p['frames']) for p in stem)}; growth exponent "
          f"{fit_slope(stem, 'peak_bytes'):.2f})")
    print(f"- assumptions: the per-frame cost ∝ tokens per frame (convs, linears, cross-attention and attention to "
          f"K bases are all linear in tokens; STEM forms no N×N or T×T matrix): ×{(TARGET_SIZE / a.size) ** 2:g} "
          f"for {TARGET_SIZE}²; fp16 halves activation bytes"
          f"{' vs fp32 (×0.5 applied)' if a.dtype == 'fp32' else ''}, except the EM's fp32 upcast of one token "
          f"chunk, which --chunk bounds; the F-independent offset (allocator, kernel workspaces) is kept "
          f"as measured; weights {FP16_WEIGHT_BYTES / 1e9:.2f} GB in fp16; CUDA context not included")
    print(f"- {per_frame * scale / MiB:,.0f} MiB per frame × {TARGET_FRAMES} + {max(offset, 0.0) / MiB:,.0f} MiB "
          f"= {activations / GiB:,.1f} GiB activations + {FP16_WEIGHT_BYTES / GiB:.1f} GiB weights = "
          f"**{total / GiB:,.1f} GiB** → {'fits within' if total < TARGET_GIB * GiB else 'exceeds'} "
          f"{TARGET_GIB:.0f} GiB")

# --------------------------------------------------------------------------------------------- targets
# Issue 10's targets, each ratio measured side by side in this one process (both sides under the same load):
# em_bases + attention to the bases vs per-frame SDPA, and the whole STEM forward vs the 1-frame forward.

SD15_LEVELS = ((4096, 40), (1024, 80), (256, 160), (64, 160))  # (tokens per frame at 512², head dim)
EM_TARGET, FORWARD_TARGET = 1.0, 1.2  # issue 10's bars: STEM / per-frame at 4096 tokens, STEM / 1-frame forward


def timed_stem(sync, **options):
    """An EMAttention that also sums the time of its two parts per tokens per frame: parts[N] = {em, attention}."""
    from stemref.context import EMAttention

    class TimedStem(EMAttention):
        def __call__(self, q, k, v, call):
            self.level = q.shape[-2]  # N: tokens per frame of this layer
            return super().__call__(q, k, v, call)

        def bases(self, k, v, call, group=0):
            return self._timed("em", lambda: super(TimedStem, self).bases(k, v, call, group))

        def attend_to_bases(self, q, mu, nu):
            return self._timed("attention", lambda: super(TimedStem, self).attend_to_bases(q, mu, nu))

        def _timed(self, part: str, run):
            sync()
            start = time.perf_counter()
            out = run()
            sync()
            level = self.parts.setdefault(self.level, {"em": 0.0, "attention": 0.0})
            level[part] += time.perf_counter() - start
            return out

    stem = TimedStem(**options)
    stem.parts = {}
    return stem


def best_of(rounds: int, runs: dict, sync=lambda: None) -> dict:
    """Minimum wall time of each named run over `rounds` rounds; every other round runs them in reverse (ABBA).

    `sync` waits for the device (torch.cuda.synchronize on a GPU) before the clock starts and before it stops."""
    best = {name: math.inf for name in runs}
    for r in range(rounds):
        for name, run in (list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))):
            sync()
            start = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def device_sync(device: str):
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def target_dtype(a: argparse.Namespace):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16}[a.dtype]


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}× ({'meets' if ratio <= target else 'misses'} ≤ {target:g}×)"


def em_targets(a: argparse.Namespace, frames: int, heads: int = 8) -> None:
    """em_bases + attention to the bases vs per-frame SDPA at each SD1.5 level, and bf16 inputs at the top."""
    import torch
    import torch.nn.functional as F

    from stemref.context import EMAttention

    print(f"\n**EM attention vs per-frame attention**: {frames} frames, {heads} heads, K={a.num_bases}, 5 EM "
          f"iterations, chunk {a.chunk} tokens, {a.dtype} on {a.device}; minimum of {a.em_rounds} interleaved rounds\n")
    print("| tokens per frame | head dim | per-frame SDPA | `em_bases` | attend to bases | STEM / per-frame |")
    print("|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(a.seed)
    top = None
    for n_tokens, d in SD15_LEVELS:
        q, k, v = (torch.randn(frames, heads, n_tokens, d, generator=g).to(a.device, target_dtype(a))
                   for _ in range(3))  # (F, h, N, d)
        qv, kv, vv = (x.transpose(0, 1).reshape(1, heads, frames * n_tokens, d) for x in (q, k, v))  # (1, h, F·N, d)
        stem = EMAttention(a.num_bases, chunk=a.chunk)
        mu, nu = em_bases(kv, vv, a.num_bases, chunk=a.chunk, generator=g)
        best = best_of(a.em_rounds, {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                                     "em": lambda: em_bases(kv, vv, a.num_bases, chunk=a.chunk, generator=g),
                                     "attend": lambda: stem.attend_to_bases(qv, mu, nu)}, device_sync(a.device))
        ratio = (best["em"] + best["attend"]) / best["sdpa"]
        cell = verdict(ratio, EM_TARGET) if n_tokens == 4096 else f"{ratio:.2f}×"
        print(f"| {n_tokens} | {d} | {best['sdpa'] * 1e3:,.0f} ms | {best['em'] * 1e3:,.0f} ms | "
              f"{best['attend'] * 1e3:,.0f} ms | {cell} |")
        top = top or (qv, kv, vv, stem)
    low_precision_table(a, *top)


def low_precision_table(a: argparse.Namespace, q, k, v, stem) -> None:
    """The top level's EM on bf16 keys and values: fp32 products (the default) vs bf16 products, against the
    fp32 EM of the same bf16-rounded keys and values (the inputs' own rounding moves the bases far more)."""
    import torch

    kb, vb = k.bfloat16(), v.bfloat16()
    ref_mu, ref_nu = em_bases(kb.float(), vb.float(), a.num_bases, chunk=a.chunk,
                              generator=torch.Generator().manual_seed(a.seed))
    ref = stem.attend_to_bases(q, ref_mu, ref_nu)
    runs = {name: (lambda lp=lp: em_bases(kb, vb, a.num_bases, chunk=a.chunk, low_precision_products=lp,
                                          generator=torch.Generator().manual_seed(a.seed)))
            for name, lp in (("bf16 keys/values, fp32 products (default)", False),
                             ("bf16 keys/values, bf16 products (`low_precision_products`)", True))}
    best = best_of(a.em_rounds, runs, device_sync(a.device))
    print(f"\nThe top level's ({SD15_LEVELS[0][0]} tokens per frame) EM on bf16 keys and values, against the fp32 "
          "EM of the same rounded inputs with the same initial draw (CPU: no bf16 matrix units, so this shows what "
          "the option does to the bases, not a GPU's speed); distance = max |attention output − fp32's| / "
          "max |fp32's|\n")
    print("| EM | time | μ max abs diff to fp32 | attention output distance |")
    print("|---|---:|---:|---:|")
    mu16, nu16 = ref_mu.bfloat16().float(), ref_nu.bfloat16().float()
    print(f"| fp32 bases rounded to bf16 (rounding alone) | — | {(mu16 - ref_mu).abs().max():.1e} | "
          f"{relative(stem.attend_to_bases(q, mu16, nu16), ref):.1e} |")
    for name, run in runs.items():
        mu, nu = run()
        print(f"| {name} | {best[name] * 1e3:,.0f} ms | {(mu.float() - ref_mu).abs().max():.1e} | "
              f"{relative(stem.attend_to_bases(q, mu.float(), nu.float()), ref):.1e} |")


def relative(x, ref) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def forward_targets(a: argparse.Namespace, unet, size: int, frames: int) -> None:
    """Whole forward, STEM vs 1-frame, ABBA; then where STEM's self-attention time goes, level by level."""
    import torch

    from stemref.attention import RunInfo
    from stemref.context import per_frame

    sync = device_sync(a.device)
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(frames, 4, size // 8, size // 8, generator=g).to(a.device, target_dtype(a))  # (F, 4, h, w)
    prompt = torch.randn(1, 77, 768, generator=g).to(a.device, target_dtype(a)).expand(frames, -1, -1)  # (F, L, D)
    one = TimedProcessor(per_frame, sync)
    stem_parts = timed_stem(sync, num_bases=a.num_bases, chunk=a.chunk,
                            generator=torch.Generator().manual_seed(a.seed))
    stem = TimedProcessor(stem_parts, sync)
    forwards = {}
    for name, timed in (("1-frame", one), ("stem", stem)):
        def forward(timed=timed):
            timed.reset()
            stem_parts.parts = {}
            with unet.attention(lambda layer: timed if layer.endswith("attn1") else None):
                unet(x, 500, prompt, RunInfo(frames=frames))
            timed.last = (timed.seconds, dict(timed.levels), dict(stem_parts.parts), dict(timed.calls))
        forwards[name] = forward
    with unet.attention(lambda layer: per_frame if layer.endswith("attn1") else None):
        unet(x[:1], 500, prompt[:1], RunInfo(frames=1))  # one-off allocations and kernel choices, for neither side
    best = best_of(a.repeats, forwards, sync)  # A B, then B A, ...
    ratio = best["stem"] / best["1-frame"]
    attn_one, levels_one, _, _ = one.last
    attn_stem, levels_stem, parts, layers = stem.last
    print(f"\n**Whole inversion forward, {size}² px ({size // 8}×{size // 8} latent), {frames} frames**: "
          f"{'minimum of ' + str(a.repeats) + ' forwards' if a.repeats > 1 else 'one forward'} each after a warm-up, "
          f"order A B, B A, …; self-attention = the 16 attn1 processors (last forward)\n")
    print("| context | forward | self-attention | share |")
    print("|---|---:|---:|---:|")
    for name, seconds, attn in (("1-frame", best["1-frame"], attn_one), ("stem", best["stem"], attn_stem)):
        print(f"| {name} | {seconds:.2f} s | {attn:.2f} s | {100 * attn / seconds:.0f} % |")
    print(f"\nSTEM / 1-frame: {verdict(ratio, FORWARD_TARGET)}\n")
    print(f"STEM's self-attention by level ({size}², {frames} frames; time summed over the level's layers, "
          f"share of the STEM forward):\n")
    print("| tokens per frame | layers | EM | attend to bases | STEM total | share | 1-frame SDPA |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sorted(levels_stem, reverse=True):
        p = parts.get(n, {"em": 0.0, "attention": 0.0})
        print(f"| {n} | {layers[n]} | {p['em']:.2f} s | {p['attention']:.2f} s | {levels_stem[n]:.2f} s | "
              f"{100 * levels_stem[n] / best['stem']:.1f} % | {levels_one.get(n, 0.0):.2f} s |")


def option_effects(a: argparse.Namespace, unet, size: int, frames: int) -> None:
    """What STEM's optional speed-ups change, at the second step of an inversion (step 1, t = 21).

    Step 0 runs once with warm-start bookkeeping (its EM is the default's); step 1 then runs the default
    (two seeds: the method's own randomness), warm starts from step 0's bases, and all-frame attention
    where a level holds no more tokens than bases. Distances are to the default's (same seed) self-attention
    output of each layer, max |Δ| / max |default| (worst layer and mean over layers), and of the UNet's ε.
    """
    import torch

    from stemref.attention import RunInfo
    from stemref.context import EMAttention
    from stemref.scheduler import DDIMScheduler

    sync = device_sync(a.device)
    scheduler = DDIMScheduler()
    t0, t1 = scheduler.timesteps(50).flip(0).tolist()[:2]
    g = torch.Generator().manual_seed(a.seed + 1)
    x0 = torch.randn(frames, 4, size // 8, size // 8, generator=g).to(a.device, target_dtype(a))  # (F, 4, h, w)
    prompt = torch.randn(1, 77, 768, generator=g).to(a.device, target_dtype(a)).expand(frames, -1, -1)  # (F, L, D)

    def stem(seed=a.seed, **options):
        return EMAttention(a.num_bases, chunk=a.chunk, generator=torch.Generator().manual_seed(seed), **options)

    def forward(processor, x, t, step):
        timed = TimedProcessor(processor, sync, keep_outputs=True)
        with unet.attention(lambda layer: timed if layer.endswith("attn1") else None):
            sync()
            start = time.perf_counter()
            eps = unet(x, t, prompt, RunInfo(frames=frames, step=step))
            sync()
            return eps, time.perf_counter() - start, timed

    warm2, warm1 = stem(warm_start_iters=2), stem(warm_start_iters=1)
    eps0, _, _ = forward(warm2, x0, t0, 0)
    warm1.previous = dict(warm2.previous)  # both continue from the same step-0 bases
    x1 = scheduler.inverse_step(eps0, t0, x0, 50)
    variants = {"default (5 iterations, fresh draw)": stem(), "default, another seed": stem(seed=a.seed + 1),
                "`warm_start_iters=2`": warm2, "`warm_start_iters=1`": warm1,
                "`all_frame_if_few_tokens`": stem(all_frame_if_few_tokens=True)}
    runs = {name: forward(p, x1, t1, 1) for name, p in variants.items()}
    ref_eps, _, ref = runs["default (5 iterations, fresh draw)"]
    print(f"\n**Optional speed-ups** (off by default; {size}², {frames} frames, inversion step 1 at t = {t1} "
          f"after step 0 at t = {t0}; one forward each)\n")
    print("| variant | self-attention | forward | worst layer distance | mean layer distance | ε distance |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (eps, seconds, timed) in runs.items():
        d = [relative(timed.outputs[layer], out) for layer, out in ref.outputs.items()]
        print(f"| {name} | {timed.seconds:.2f} s | {seconds:.2f} s | {max(d):.1e} | {statistics.fmean(d):.1e} | "
              f"{relative(eps, ref_eps):.1e} |")


def run_targets(a: argparse.Namespace) -> None:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    frames = a.target_frames
    load_before = os.getloadavg()
    where = (torch.cuda.get_device_name(a.device) if a.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} of {os.cpu_count()} cores")
    print(f"Issue 10's targets: {where}, {a.dtype}, torch "
          f"{torch.__version__}; STEM K={a.num_bases}, chunk {a.chunk} tokens")
    with torch.inference_mode():
        em_targets(a, frames)
        unet = random_unet(a.device, target_dtype(a), a.seed)
        for size in a.target_sizes:
            forward_targets(a, unet, size, frames)
        if a.options_size:
            option_effects(a, unet, a.options_size, frames)
    load_after = os.getloadavg()
    print(f"\nLoad average (1, 5, 15 min) at the start {', '.join(f'{x:.1f}' for x in load_before)}; at the end "
          f"{', '.join(f'{x:.1f}' for x in load_after)} ({os.cpu_count()} cores, shared with other work)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels, a multiple of 8 (latent: size/8)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64], help="video lengths F to measure")
    parser.add_argument("--contexts", nargs="+", choices=CONTEXTS, default=list(CONTEXTS))
    parser.add_argument("--num-bases", type=int, default=256, help="STEM's K")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="STEM's token chunk for the EM and the "
                        f"attention (default: stemref's {DEFAULT_CHUNK})")
    parser.add_argument("--all-frame-chunk", type=int, default=1, help="all-frame: query frames per attention call")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per run (memory is from the first)")
    parser.add_argument("--max-seconds", type=float, default=600, help="limit per run, process start included")
    parser.add_argument("--max-memory-gb", type=float, default=10, help="CPU: limit on a run's resident memory (GiB)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", action="store_true", help="instead of the scaling runs: issue 10's speed "
                        "targets, STEM vs per-frame attention and vs the 1-frame forward, side by side in one process")
    parser.add_argument("--target-sizes", type=int, nargs="*", default=[256, 512], help="--targets: frame sides "
                        "for the whole-forward comparison (--repeats ABBA pairs each)")
    parser.add_argument("--target-frames", type=int, default=8, help="--targets: frames per video")
    parser.add_argument("--em-rounds", type=int, default=3, help="--targets: rounds of the EM-vs-SDPA table")
    parser.add_argument("--options-size", type=int, default=256, help="--targets: frame side for measuring the "
                        "optional speed-ups (0: skip)")
    parser.add_argument("--child", nargs=2, metavar=("CONTEXT", "FRAMES"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.size < 64 or a.size % 8:
        parser.error(f"--size must be a multiple of 8 of at least 64 (latent side size / 8), got {a.size}")
    counts = [*a.frames, a.repeats, a.num_bases, a.all_frame_chunk] + [n for n in (a.chunk, a.threads) if n is not None]
    if min(counts) < 1:
        parser.error("--frames, --repeats, --num-bases, --chunk, --all-frame-chunk and --threads must be positive")
    if a.device != "cpu" and not a.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda[:i], got {a.device!r}")
    if a.dtype == "fp16" and a.device == "cpu":
        parser.error("fp16 is for --device cuda; on the CPU use fp32")
    if a.child:
        print(json.dumps(measure(a.child[0], int(a.child[1]), a)))
        return
    if a.targets:
        if any(n < 64 or n % 8 for n in a.target_sizes + ([a.options_size] if a.options_size else [])):
            parser.error("--target-sizes and --options-size must be multiples of 8 of at least 64")
        run_targets(a)
        return

    import torch

    a.frames = sorted(set(a.frames))
    load_before = os.getloadavg()[0]
    results, skipped = {}, {}
    for c in [c for c in CONTEXTS if c in a.contexts]:
        for f in a.frames:
            points = [results[(c, g)] for g in a.frames if (c, g) in results]
            earlier = [g for g in a.frames if g < f and (c, g) in skipped]
            why = f"F={earlier[0]} was already skipped" if earlier else predicted_over(points, f, a)
            if not why:
                print(f"[{c} F={f}] running", file=sys.stderr, flush=True)
                result, why = run_child(c, f, a)
                if result:
                    results[(c, f)] = result
                    print(f"[{c} F={f}] {result['seconds']:.1f} s, {result['peak_bytes'] / MiB:,.0f} MiB"
                          f"{'' if result['finite'] else ' (output not finite)'}", file=sys.stderr, flush=True)
            if why:
                skipped[(c, f)] = why
                print(f"[{c} F={f}] skipped: {why}", file=sys.stderr, flush=True)
    device_name = (torch.cuda.get_device_name(a.device) if a.device != "cpu"
                   else f"CPU ({a.threads or torch.get_num_threads()} of {os.cpu_count()} cores used)")
    print_report(a, results, skipped, device_name, torch.__version__, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
