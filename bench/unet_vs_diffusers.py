"""stemref's UNet vs diffusers' UNet2DConditionModel: forward time and peak memory on the same weights.

    python bench/unet_vs_diffusers.py                      # fp32 on CPU, 256 px, CFG batch 2
    python bench/unet_vs_diffusers.py --device cuda --dtype fp16 --size 512

Random full-size SD1.5 UNet weights are written once to a temporary safetensors file; each
implementation then runs in its own fresh process (so neither inherits the other's allocations), loads
that file, and runs the same inputs. After one warm-up forward (which pages in memory-mapped weights), CPU memory is the growth of
resident memory during the next forward (sampled every millisecond by a thread reading /proc/self/statm, because the process's
lifetime peak is set while loading); GPU memory is torch.cuda.max_memory_allocated above the loaded
weights. Both use the default SDPA attention.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


class RSSPeak:
    """Highest resident memory seen while the block runs, sampled every millisecond (Linux)."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def measure(impl: str, folder: str, device: str, dtype_name: str, size: int, batch: int, repeats: int) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(0)
    if impl == "diffusers":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        forward = lambda x, t, c: unet(x, t, c).sample
    else:
        from safetensors.torch import load_file

        from stemref.unet import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel()
        sd = {k: v.to(device, dtype) for k, v in load_file(f"{folder}/diffusion_pytorch_model.safetensors").items()}
        unet.load_state_dict(sd, strict=True, assign=True)
        del sd
        unet.eval()
        forward = unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    with torch.inference_mode():
        out = forward(x, 500, context)  # warm-up: pages in memory-mapped weights, picks kernels
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = forward(x, 500, context)
            sync()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with RSSPeak() as rss:
                out = forward(x, 500, context)
            peak = rss.peak - rss.start
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            forward(x, 500, context)
            sync()
            times.append(time.perf_counter() - start)
    checksum = out.double().abs().mean().item()
    from safetensors.torch import save_file

    save_file({"eps": out.float().cpu().contiguous()}, f"{folder}/{impl}-eps.safetensors")  # the parent compares them
    return {"impl": impl, "seconds": statistics.median(times), "peak_bytes": peak, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per process (median)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side, in ABBA order")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child[0], args.child[1], args.device, args.dtype, args.size, args.batch, args.repeats)
        print(json.dumps(result))
        return

    import torch
    from diffusers import UNet2DConditionModel

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).save_pretrained(folder)
        runs = {"diffusers": [], "stemref": []}
        # ABBA order over the rounds, so a machine that speeds up or slows down favours neither side
        order = [impl for r in range(args.rounds) for impl in (("diffusers", "stemref"), ("stemref", "diffusers"))[r % 2]]
        for impl in order:
            cmd = [sys.executable, __file__, "--child", impl, folder, "--device", args.device, "--dtype", args.dtype,
                   "--size", str(args.size), "--batch", str(args.batch), "--repeats", str(args.repeats)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[impl].append(json.loads(line))
        from safetensors.torch import load_file

        eps_d, eps_s = (load_file(f"{folder}/{impl}-eps.safetensors")["eps"].double() for impl in ("diffusers", "stemref"))
        max_difference = (eps_d - eps_s).abs().max().item()
        relative = max_difference / eps_d.abs().max().item()
    # per side, the fastest round's median time and the smallest round's peak: the least disturbed measurement
    d, s = ({"seconds": min(r["seconds"] for r in rs), "peak_bytes": min(r["peak_bytes"] for r in rs),
             "checksum": rs[0]["checksum"]} for rs in (runs["diffusers"], runs["stemref"]))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"UNet forward, SD1.5 size, random weights, batch {args.batch}, {args.size}×{args.size} px, {args.dtype}, {device}")
    print(f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, median of {args.repeats} forwards, best of {args.rounds} processes per side\n")
    print("| | diffusers | stemref | stemref / diffusers |")
    print("|---|---|---|---|")
    print(f"| forward time (s) | {d['seconds']:.3f} | {s['seconds']:.3f} | {s['seconds'] / d['seconds']:.2f}× |")
    print(f"| peak extra memory (MiB) | {d['peak_bytes'] / 2**20:.0f} | {s['peak_bytes'] / 2**20:.0f} | "
          f"{s['peak_bytes'] / max(d['peak_bytes'], 1):.2f}× |")
    print(f"\noutputs agree: max |ε difference| = {max_difference:.2e} ({relative:.2e} of max |ε|), "
          f"|mean|ε| difference| = {abs(d['checksum'] - s['checksum']):.2e}")


if __name__ == "__main__":
    main()
