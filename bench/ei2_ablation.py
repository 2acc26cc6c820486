"""EI²'s ablations (paper Figures 4–6): tune and edit every variant of one figure on one clip, side by side.

    python bench/ei2_ablation.py VIDEO --source "a rabbit on a hill" --target "a bear on a hill" --figure 4
    python bench/ei2_ablation.py examples/bunny.mp4 --source ... --target ... --figure 5 --frames 8 --size 512 \\
        --weights weights/sd14 --tune-steps 500 --cache cache --out out/fig5

Every variant is `python -m stemref.edit --method ei2` with the figure's options (below); every other flag of the
edit command (--weights, --size, --width/--height, --frames, --steps, --tune-steps, --lr, --seed, --cache,
--offline, --device, --dtype, --clip, --config …) applies to all of them. The tunings and inversions go through
the edit command's cache, so a rerun, or another figure sharing a variant (Figure 5's "FFAM r=2" is Figure 6's
"FFAM → STAM → CA": EI² itself), does not tune twice.

    Figure 4  covariate shift: the temporal module's norm, and spectral normalisation. As in the paper, these
              run in Tune-A-Video's architecture (sparse-causal attention, temporal module after the
              feed-forward): LayerNorm (Tune-A-Video's), LayerNorm without affine, none, InstanceNorm over
              frames, Instance Centering, Instance Centering + spectral normalisation (STAM).
    Figure 5  spatial-temporal attention, with STAM: sparse-causal, FFAM with r = 2, FFAM with r = 4.
    Figure 6  module order: FFAM → STAM → CA (EI²), FFAM → CA → STAM, FFAM → CA → FF → STAM.

Writes into --out (default out/ei2-figure-N-VIDEO), only when the whole grid succeeded:
    grid.mp4        the source, then each variant's edit, each panel labelled
    NN-variant.mp4  each variant's edit
    table.md        per variant: CLIP score, frame accuracy, CLIP consistency (stemref.clip_metrics; skipped
                    with a note when no CLIP weights are there), and the tuning's time and peak memory
    results.json    the same, with each variant's options and the settings of the run
A reused tuning has no time or memory of its own (the run that tuned it measured them). On a CPU, the peak
memory is the process's peak resident set so far (it cannot be reset between variants); on CUDA it is
torch's peak allocation during that tuning.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from stemref.cli.errors import UserError, run  # noqa: E402
from stemref.cli.model import load_model, model_inputs  # noqa: E402
from stemref.cli.output import check_output_folder, output_folder  # noqa: E402
from stemref.cli.progress import progress_printer  # noqa: E402
from stemref.cli.edit import build_parser, ensure_weights, read_frames, resolve_settings  # noqa: E402
from stemref.cli.edit_methods import Job, cached_inversion, cached_tuning, tuned_edit  # noqa: E402
from stemref.cli.measure import clock, peak_memory, reset_peak_memory, source_fps  # noqa: E402
from stemref.clip_metrics import clip_metrics  # noqa: E402
from stemref.download import DownloadError  # noqa: E402
from stemref.edit.cache import default_root  # noqa: E402
from stemref.loading import WeightsError, load_clip  # noqa: E402
from stemref.video import side_by_side, write_video  # noqa: E402

TAV_ARCHITECTURE = ["--frame-attention", "sparse-causal", "--stam-position", "after-ff"]
FIGURES = {  # figure -> [(label, the edit command's flags of that variant)]
    4: [("LayerNorm (TAV)", [*TAV_ARCHITECTURE, "--temporal-norm", "layernorm", "--spectral-norm", "off"]),
        ("LayerNorm*", [*TAV_ARCHITECTURE, "--temporal-norm", "layernorm-no-affine", "--spectral-norm", "off"]),
        ("no norm", [*TAV_ARCHITECTURE, "--temporal-norm", "none", "--spectral-norm", "off"]),
        ("InstanceNorm*", [*TAV_ARCHITECTURE, "--temporal-norm", "instancenorm", "--spectral-norm", "off"]),
        ("IC", [*TAV_ARCHITECTURE, "--temporal-norm", "centering", "--spectral-norm", "off"]),
        ("IC + SN (STAM)", [*TAV_ARCHITECTURE, "--temporal-norm", "centering", "--spectral-norm", "power"])],
    5: [("SCA + STAM", ["--frame-attention", "sparse-causal"]),
        ("FFAM r=2", ["--frame-attention", "ffam", "--ffam-r", "2"]),
        ("FFAM r=4", ["--frame-attention", "ffam", "--ffam-r", "4"])],
    6: [("FFAM-STAM-CA", ["--stam-position", "before-cross"]),
        ("FFAM-CA-STAM", ["--stam-position", "after-cross"]),
        ("FFAM-CA-FF-STAM", ["--stam-position", "after-ff"])],
}
METRICS = ("clip_score", "frame_accuracy", "clip_consistency")
MiB = 2**20


def main(argv: list[str] | None = None) -> int:
    return run(lambda: ablation(argv), failures=(DownloadError,))


def ablation(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Every other flag is the edit command's (python -m stemref.edit --help).")
    parser.add_argument("--figure", type=int, choices=sorted(FIGURES), required=True)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: out/ei2-figure-N-VIDEO)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if an earlier stemref run wrote it")
    args, rest = parser.parse_known_args(argv)
    edit_parser = build_parser()
    variants = [(label, resolve_settings(edit_parser, [*rest, "--method", "ei2", *flags]))
                for label, flags in FIGURES[args.figure]]
    s = variants[0][1]  # what all variants share: the clip, prompts, weights, cache
    if len(s["target"]) != 1:
        raise UserError(f"give one --target (got {len(s['target'])}): the grid compares the variants on one edit")
    out = args.out or Path("out") / f"ei2-figure-{args.figure}-{Path(s['video']).stem or 'video'}"
    model_args = argparse.Namespace(weights=s["weights"], device=s["device"], dtype=s["dtype"],
                                    model_config=s["model_config"])
    inputs = [s["video"], *model_inputs(model_args), *([s["cache"]] if s["cache"] else [])]
    check_output_folder(out, args.overwrite, inputs)
    ensure_weights(s)
    with output_folder(out, args.overwrite, inputs) as tmp:
        video = read_frames(s)
        frames = video.frames
        with progress_printer("loading weights", unit="part") as report:
            sd = load_model(model_args, progress=report)
        cache_root = (s["cache"] or default_root()) if s["reuse"] else None
        rows, edits = [], []
        for label, settings in variants:
            print(f"variant {label}", file=sys.stderr, flush=True)
            rows.append(variant_row(Job(sd, frames, settings, cache_root, frames_digest=video.digest), label, edits))
        scores = clip_rows(s, sd.device, frames, edits)
        write_outputs(tmp, args.figure, s, frames, rows, edits, scores)
    print(f"wrote {out}", file=sys.stderr)


def variant_row(job: Job, label: str, edits: list[torch.Tensor]) -> dict:
    """Tune (or reuse), invert and edit one variant; append its edit to `edits`, return its row."""
    s, device = job.settings, job.sd.device
    reset_peak_memory(device)
    tuned = cached_tuning(job)
    peak, measure = peak_memory(device)
    reused = job.timings["tuning"] == 0.0  # Job.cached records 0 s for an entry it reuses
    model = tuned.model(job.sd)
    inversion = cached_inversion(job, model, prompt="")
    started = clock(device)
    edits.append(tuned_edit(job, (model, inversion), s["target"][0]))
    return {"variant": label, "options": tuned.options, "tuning_reused": reused,
            "tuning_seconds": None if reused else job.timings["tuning"],
            "tuning_peak_memory_bytes": None if reused else peak, "peak_memory_measure": measure,
            "edit_seconds": clock(device) - started, "final_loss": tuned.losses[-1]}


def clip_rows(s: dict, device: torch.device, frames: torch.Tensor, edits: list[torch.Tensor]) -> list[dict] | None:
    """CLIP metrics of the source and of each edit, or None (said once) without CLIP weights."""
    try:
        clip = load_clip(s["clip"], device=device)
    except WeightsError as e:
        print(f"note: CLIP metrics skipped: {e}", file=sys.stderr)
        return None
    return [clip_metrics(clip, frames, s["source"]),
            *(clip_metrics(clip, e, s["target"][0], source_prompt=s["source"]) for e in edits)]


def write_outputs(folder: Path, figure: int, s: dict, frames: torch.Tensor, rows: list[dict],
                  edits: list[torch.Tensor], scores: list[dict] | None) -> None:
    fps = s["fps"] or source_fps(Path(s["video"]), s["stride"])
    suffix = "." + s["format"]
    for i, (row, edited) in enumerate(zip(rows, edits)):
        row["file"] = f"{i + 1:02d}-{re.sub(r'[^a-z0-9]+', '-', row['variant'].lower()).strip('-')}{suffix}"
        write_video(folder / row["file"], edited, fps)
    panels = [labelled(frames, "source"), *(labelled(e, r["variant"]) for r, e in zip(rows, edits))]
    write_video(folder / f"grid{suffix}", side_by_side(*panels), fps)
    source = {"prompt": s["source"]}
    if scores is not None:
        source.update(scores[0])
        for row, score in zip(rows, scores[1:]):
            row.update(score)
    results = {"figure": figure, "video": str(s["video"]), "frames": len(frames), "size": list(frames.shape[-2:]),
               "target": s["target"][0], "source": source, "variants": rows,
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.items()},
               "device": s["device"], "dtype": s["dtype"]}
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "table.md").write_text(table(figure, s, source, rows))


def table(figure: int, s: dict, source: dict, rows: list[dict]) -> str:
    number = lambda v, fmt: "—" if v is None else format(v, fmt)
    lines = [f"EI² Figure {figure} on {Path(s['video']).name}: \"{s['source']}\" → \"{s['target'][0]}\"", "",
             "| variant | CLIP score | frame accuracy | CLIP consistency | tuning s | tuning peak MiB |",
             "|---|---|---|---|---|---|",
             f"| source | {number(source.get('clip_score'), '.2f')} | — | "
             f"{number(source.get('clip_consistency'), '.4f')} | — | — |"]
    for r in rows:
        peak = None if r["tuning_peak_memory_bytes"] is None else r["tuning_peak_memory_bytes"] / MiB
        lines.append(f"| {r['variant']} | {number(r.get('clip_score'), '.2f')} | "
                     f"{number(r.get('frame_accuracy'), '.2f')} | {number(r.get('clip_consistency'), '.4f')} | "
                     f"{'cached' if r['tuning_reused'] else number(r['tuning_seconds'], '.1f')} | "
                     f"{'cached' if r['tuning_reused'] else number(peak, '.0f')} |")
    return "\n".join(lines) + "\n"


def labelled(video: torch.Tensor, label: str) -> torch.Tensor:
    """`video` (F, 3, H, W) with a white band above it holding `label`: (F, 3, H + band, W)."""
    F_, _, H, W = video.shape
    band = max(16, (H // 10) // 8 * 8)  # a multiple of 8 keeps the grid's height codec-friendly
    image = Image.new("RGB", (W, band), "white")
    font = ImageFont.load_default(size=max(8, band * 2 // 3))
    ImageDraw.Draw(image).text((3, band // 2), label, fill="black", font=font, anchor="lm")
    strip = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(video.dtype) / 255  # (3, band, W)
    return torch.cat([strip.expand(F_, -1, -1, -1).to(video.device), video], dim=2)


if __name__ == "__main__":
    sys.exit(main())
