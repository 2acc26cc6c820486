"""What the index.html pictures cost: each method's run with and without its recorder, and the pictures' drawing.

    python bench/explain_cost.py                                  # fp32 on CPU, 128 px, 8 frames, 4 steps
    python bench/explain_cost.py --size 128 --frames 8 --steps 4 --threads 1
    python bench/explain_cost.py --device cuda --dtype fp16 --size 512 --frames 16 --steps 20

On the full-size SD1.5 UNet with random weights and the stand-in text encoder of bench/edit_scaling.py (no
VAE: everything here works on latents), with a synthetic inversion (random latents path), it times, for the
recorders `python -m stemref.edit` / `python -m stemref.invert` pass by default:
- inversion: the inversion's UNet calls (`stemref.inversion.replay` of every step: the same calls `invert`
  makes) under STEM, plain and with `inversion_recorder` (features at the middle step, similarity every step,
  STEM's bases at the 32² and 16² levels);
- tokenflow: `tokenflow.edit_latents`, plain and with `tokenflow_recorder` (keyframes, matches of one layer);
- fatezero: `fatezero.edit_latents` on the inversion (its replay, then the edit), plain and with
  `fatezero_recorders` (word maps of the 16² level every step, blend masks), blending on one source word;
- pictures: turning the recorders into pictures and writing index.html with its PNGs;
- explain: what --explain adds today: one inversion step replayed (when the inversion came from the cache).
Each run is repeated --repeats times alternating plain / recorded; the minimum is reported. Wall times on a
shared CPU are too noisy to show a few per cent, so the recorder is also timed from the inside: every call of
its `wants` and `add` (with a device sync around each) is added up during the recorded run. That time, over
the plain run's, is the recording's overhead ("inside"); the difference of the wall times is printed too. The
last column puts pictures and --explain against a whole default edit (STEM inversion + one TokenFlow edit).
The load average is printed with the table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stemref, even if another is installed
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from edit_scaling import SOURCE_PROMPT, TARGET_PROMPT, fixed_text_encoder  # noqa: E402
from inversion_scaling import random_unet  # noqa: E402

from stemref.edit import fatezero, tokenflow  # noqa: E402
from stemref.explain import (fatezero_pictures, fatezero_recorders, inversion_pictures, inversion_recorder,  # noqa: E402
                             tokenflow_pictures, tokenflow_recorder)
from stemref.inversion import Inversion, InversionSettings, replay  # noqa: E402
from stemref.pipeline import StableDiffusion  # noqa: E402
from stemref.report import write_report  # noqa: E402
from stemref.scheduler import DDIMScheduler  # noqa: E402
from stemref.tokenizer import CLIPTokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="TokenFlow's frames per batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[a.dtype]
    sync = (lambda: torch.cuda.synchronize(a.device)) if a.device.startswith("cuda") else (lambda: None)
    sd = StableDiffusion(CLIPTokenizer.openai(), fixed_text_encoder(a.seed, dtype), None,
                         random_unet(a.device, dtype, a.seed), DDIMScheduler())
    side = a.size // 8
    g = torch.Generator().manual_seed(a.seed + 1)
    path = torch.randn(a.steps + 1, a.frames, 4, side, side, generator=g).to(a.device, dtype)
    timesteps = sorted(sd.scheduler.timesteps(a.steps).tolist())
    inversion = Inversion(path, timesteps, InversionSettings(SOURCE_PROMPT, a.steps, "stem", seed=a.seed))
    frames = torch.rand(a.frames, 3, a.size, a.size, generator=g)

    class Timed:
        """A recorder that adds up the time spent in the recorder it wraps."""

        def __init__(self, inner):
            self.inner, self.seconds = inner, 0.0

        def wants(self, what, name, step):
            return self._time(self.inner.wants, what, name, step)

        def add(self, what, name, step, **values):
            return self._time(self.inner.add, what, name, step, **values)

        def _time(self, fn, *args, **kwargs):
            sync()
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds += time.perf_counter() - started
            return out

    def timed(fn):
        sync()
        started = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - started, out

    runs = {
        "inversion (STEM)": (lambda rec: replay(sd, inversion, list(range(a.steps)), rec),
                             lambda: inversion_recorder(sd.unet, a.steps)),
        "tokenflow edit": (lambda rec: tokenflow.edit_latents(sd, inversion, TARGET_PROMPT, batch=a.batch, seed=a.seed,
                                                              recorder=rec),
                           lambda: tokenflow_recorder(sd.unet, a.steps)),
        "fatezero edit": (lambda recs: fatezero.edit_latents(
            sd, inversion, SOURCE_PROMPT, TARGET_PROMPT, blend_words=(["mallard"], ["swan"]),
            blend_self_attention=True, recorder=recs and recs[1], source_recorder=recs and recs[0]),
                          lambda: tuple(map(Timed, fatezero_recorders(sd.unet, sd.tokenizer, SOURCE_PROMPT,
                                                                      TARGET_PROMPT)))),
    }
    rows, recorders = [], {}
    with torch.no_grad():
        replay(sd, inversion, [0], None)  # warm-up
        for name, (run, make) in runs.items():
            plain, recorded, inside = [], [], []
            for _ in range(a.repeats):
                plain.append(timed(lambda: run(None))[0])
                recorder = make() if name == "fatezero edit" else Timed(make())
                recorded.append(timed(lambda: run(recorder))[0])
                inside.append(sum(r.seconds for r in (recorder if isinstance(recorder, tuple) else (recorder,))))
            recorders[name] = recorder
            rows.append((name, min(plain), min(recorded), min(inside)))
        with tempfile.TemporaryDirectory() as folder:
            source, edit = (r.inner for r in recorders["fatezero edit"])
            pictures_s, _ = timed(lambda: write_report(
                Path(folder), "bench", pictures=inversion_pictures(recorders["inversion (STEM)"].inner, 256, "stem")
                + tokenflow_pictures(recorders["tokenflow edit"].inner, a.frames)
                + fatezero_pictures(source, edit, sd.tokenizer, SOURCE_PROMPT, TARGET_PROMPT, frames)))
        explain_s = min(timed(lambda: replay(sd, inversion, [a.steps // 2], inversion_recorder(sd.unet, a.steps)))[0]
                        for _ in range(a.repeats))
    edit_s = rows[0][1] + rows[1][1]  # a default edit: STEM inversion + one TokenFlow edit (no VAE)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.node()}: {a.device} {a.dtype}, torch {torch.__version__}, {a.size}² px, {a.frames} frames, "
          f"{a.steps} steps, TokenFlow batch {a.batch}, load average {load:.2f}, min of {a.repeats}\n")
    print("| run | plain (s) | recorded (s) | in the recorder (s) | overhead: inside | overhead: wall | "
          "share of a default edit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, plain, recorded, inside in rows:
        print(f"| {name} | {plain:.2f} | {recorded:.2f} | {inside:.3f} | {100 * inside / plain:+.2f} % | "
              f"{100 * (recorded - plain) / plain:+.1f} % | {100 * inside / edit_s:+.2f} % |")
    print(f"| pictures + index.html (all of the above) | – | – | {pictures_s:.3f} | – | – | "
          f"{100 * pictures_s / edit_s:+.2f} % |")
    print(f"| --explain: one inversion step replayed | – | – | {explain_s:.3f} | – | – | {100 * explain_s / edit_s:+.2f} % |")


if __name__ == "__main__":
    main()
