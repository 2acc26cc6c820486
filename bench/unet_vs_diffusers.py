"""stemref's UNet vs diffusers' UNet2DConditionModel: forward time and peak memory on the same weights.

    python bench/unet_vs_diffusers.py                      # fp32 on CPU, 256 px, CFG batch 2
    python bench/unet_vs_diffusers.py --device cuda --dtype fp16 --size 512

Random full-size SD1.5 UNet weights are written once to a temporary safetensors file; each
implementation then runs in its own fresh process (so neither inherits the other's allocations), loads
that file, and runs the same inputs. CPU memory is the growth of the process's peak RSS during the
first forward; GPU memory is torch.cuda.max_memory_allocated above the loaded weights. Both use the
default SDPA attention.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(impl: str, folder: str, device: str, dtype_name: str, size: int, batch: int, repeats: int) -> dict:
    import resource

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
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = forward(x, 500, context)
        sync()
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            forward(x, 500, context)
            sync()
            times.append(time.perf_counter() - start)
    checksum = out.double().abs().mean().item()
    return {"impl": impl, "seconds": statistics.median(times), "peak_bytes": peak, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    parser.add_argument("--repeats", type=int, default=3)
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
        results = {}
        for impl in ("diffusers", "stemref"):
            cmd = [sys.executable, __file__, "--child", impl, folder, "--device", args.device, "--dtype", args.dtype,
                   "--size", str(args.size), "--batch", str(args.batch), "--repeats", str(args.repeats)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[impl] = json.loads(line)
    d, s = results["diffusers"], results["stemref"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"UNet forward, SD1.5 size, random weights, batch {args.batch}, {args.size}×{args.size} px, {args.dtype}, {device}")
    print(f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, median of {args.repeats}\n")
    print("| | diffusers | stemref | stemref / diffusers |")
    print("|---|---|---|---|")
    print(f"| forward time (s) | {d['seconds']:.3f} | {s['seconds']:.3f} | {s['seconds'] / d['seconds']:.2f}× |")
    print(f"| peak extra memory (MiB) | {d['peak_bytes'] / 2**20:.0f} | {s['peak_bytes'] / 2**20:.0f} | "
          f"{s['peak_bytes'] / max(d['peak_bytes'], 1):.2f}× |")
    print(f"\noutputs agree: |mean|ε| difference| = {abs(d['checksum'] - s['checksum']):.2e}")


if __name__ == "__main__":
    main()
