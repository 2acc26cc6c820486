"""Everything a GPU should measure, in one command (bench/gpu.sh runs this), within 8 minutes on one GPU.

    bench/gpu.sh                          # CUDA, fp16, 512², full-size SD1.5 with random weights
    bench/gpu.sh --device cpu --quick --time-scale 5   # every part on the CPU at toy sizes: checks the script

Parts, each in its own processes, each with its share of the time budget (a part over its share is stopped
and reported as such, and the next one starts):

    tests          the CUDA test subset, `pytest -m cuda` (tests/test_cuda.py)
    unet           stemref's UNet vs diffusers' in fp16: time, peak memory, output difference
    stem-targets   STEM's targets at 512² in fp16: EM vs per-frame attention, STEM vs the 1-frame forward
    edit-scaling   TokenFlow editing at 512² in fp16, F = 8, 16, 32, 64 while a run fits its share
    fatezero-store FateZero's attention store: bytes per step, memory, spill
    tuning         one Tune-A-Video / EI² tuning step at 512², with and without gradient checkpointing

Writes one markdown and one JSON report (bench/results/gpu-<time>.md/.json by default), prints where they are.
Without CUDA (and without --device cpu) it fails at once with one line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUDGET = 480  # seconds for all parts together: the 8 minutes
SHARES = {"tests": 60, "unet": 60, "stem-targets": 90, "edit-scaling": 120, "fatezero-store": 70, "tuning": 70}


def commands(device: str, quick: bool, scale: float) -> dict[str, list[str]]:
    """The command line of each part: GPU sizes, or toy sizes for checking on the CPU. A part that runs several
    processes gives each a limit that lets all of them finish within the part's share (× `scale`)."""
    limit = lambda part, runs: str(int(SHARES[part] * scale / runs) - 2)
    py = sys.executable
    dtype = "fp32" if device == "cpu" else "fp16"
    size = "64" if quick else "512"
    common = ["--device", device]
    return {
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
                  str(ROOT / "tests" / "test_cuda.py")],
        "unet": [py, str(BENCH / "unet_vs_diffusers.py"), *common, "--dtype", dtype, "--size", size, "--batch", "2",
                 "--repeats", "1" if quick else "5", "--rounds", "1" if quick else "2"],
        "stem-targets": [py, str(BENCH / "inversion_scaling.py"), "--targets", *common, "--dtype", dtype,
                         "--target-sizes", size, "--target-frames", "2" if quick else "8", "--options-size",
                         "0" if quick else size, "--em-rounds", "1" if quick else "3",
                         "--num-bases", "16" if quick else "256"],
        "edit-scaling": [py, str(BENCH / "edit_scaling.py"), *common, "--dtype", dtype, "--size", size,
                         "--frames", *(["2"] if quick else ["8", "16", "32", "64"]), "--steps", "2" if quick else "3",
                         "--max-seconds", limit("edit-scaling", 1 if quick else 4)],
        "fatezero-store": [py, str(BENCH / "fatezero_store.py"), *common, "--dtype", dtype, "--size", size,
                           "--frames", "2" if quick else "8",
                           "--contexts", *(["fatezero"] if quick else ["fatezero", "stem"]),
                           "--steps", "2" if quick else "10", "--max-seconds", limit("fatezero-store", 1 if quick else 2)],
        "tuning": [py, str(BENCH / "tuning.py"), *common, "--size", size, "--frames", "1" if quick else "8",
                   "--methods", *(["tune-a-video"] if quick else ["tune-a-video", "ei2"]), "--checkpointing", "0", "1",
                   "--max-seconds", limit("tuning", 2 if quick else 4)],
    }


def run_part(name: str, command: list[str], seconds: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"[{name}] {' '.join(command[1:])} (at most {seconds:.0f} s)", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(seconds, 1))
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        status = f"stopped at its {seconds:.0f} s share"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    elapsed = time.monotonic() - start
    print(f"[{name}] {status} in {elapsed:.0f} s", file=sys.stderr, flush=True)
    return {"part": name, "command": " ".join(command[1:]), "status": status, "seconds": round(elapsed, 1),
            "stdout": out, "stderr_tail": err[-4000:]}


def markdown(header: dict, parts: list[dict]) -> str:
    lines = [f"# bench/gpu.sh report, {header['started']}", "",
             f"{header['device']}; torch {header['torch']}; "
             f"{'quick check at toy sizes' if header['quick'] else 'fp16, 512²'}; "
             f"{header['seconds']:.0f} s in all (budget {BUDGET * header['time_scale']:.0f} s)", "",
             "| part | status | seconds |", "|---|---|---:|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']:.0f} |" for p in parts]
    for p in parts:
        lines += ["", f"## {p['part']}", "", f"`{p['command']}`: {p['status']}", "",
                  p["stdout"].strip() or "(no output)"]
        if p["status"] != "ok":
            lines += ["", "stderr (end):", "", "```", p["stderr_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:i; cpu only to check the script")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes (64², 1–2 frames, 2 steps): check every part")
    parser.add_argument("--parts", nargs="+", choices=list(SHARES), default=list(SHARES))
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every part's share of the 8 "
                        "minutes (a slow or shared CPU checking the script needs several times more)")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder for the two reports")
    a = parser.parse_args()
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/gpu.sh: no CUDA GPU visible to this PyTorch ({torch.__version__}); run it on a machine with "
              "one (to check the script on the CPU: bench/gpu.sh --device cpu --quick --time-scale 5)", file=sys.stderr)
        return 2
    if a.device != "cpu" and not a.device.startswith("cuda"):
        parser.error(f"--device must be cuda, cuda:i or cpu, got {a.device!r}")
    started = datetime.datetime.now()
    device = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    deadline = time.monotonic() + BUDGET * a.time_scale
    parts = []
    for name, command in commands(a.device, a.quick, a.time_scale).items():
        if name in a.parts:
            parts.append(run_part(name, command, min(SHARES[name] * a.time_scale, deadline - time.monotonic())))
    header = {"started": started.isoformat(timespec="seconds"), "device": device, "torch": torch.__version__,
              "quick": a.quick, "time_scale": a.time_scale, "seconds": round(sum(p["seconds"] for p in parts), 1),
              "load_average": os.getloadavg()}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"gpu-{started:%Y%m%d-%H%M%S}"
    stem.with_suffix(".md").write_text(markdown(header, parts))
    stem.with_suffix(".json").write_text(json.dumps({**header, "parts": parts}, indent=1))
    print(f"reports: {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return 0 if all(p["status"] == "ok" for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
