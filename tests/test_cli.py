"""The command-line tools and the examples, run in-process on the tiny checkpoint.

Import `stemref.cli.invert` / `stemref.cli.txt2img`, never `stemref.invert` / `stemref.txt2img` (the shims):
importing a shim would rebind the package's function of the same name to a module.

What is checked: the files each command writes hold what the library functions return for the same inputs
(PNG = txt2img rounded to uint8; the inversion file = stemref.invert on the frames read the same way;
PSNR = a numpy PSNR of the library's reconstruction), the reports have their keys and rows, and every bad
input exits with code 2, one message, and no output at all.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import stemref
import stemref.context
import stemref.inversion
import stemref.sampling
from stemref.cli.errors import Conflict, UserError
from stemref.cli.output import MARKER, check_output_folder, output_folder
from stemref.cli import download as download_cli
from stemref.cli import invert as invert_cli
from stemref.cli import txt2img as txt2img_cli
from stemref.inversion import Inversion, invert, reconstruct
from stemref.sampling import txt2img
from stemref.video import read_video, save_frames, write_video

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a mallard swimming in a pond"
FAST = ["--steps", "2", "--frames", "3", "--size", "64", "--device", "cpu", "--dtype", "fp32"]
METRIC_KEYS = {"context", "psnr", "ssim", "consistency", "seconds", "peak_memory_bytes", "peak_memory_measure",
               "frames", "processes", "width", "height", "scored", "steps", "settings", "feature_similarity"}


@pytest.fixture(scope="module")
def sd32(tiny_root):
    """The tiny checkpoint as the CLI loads it on CPU by default: float32."""
    return stemref.load(tiny_root)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """4 frames 80×64 of a moving gradient with noise, lossless (mkv), at 24 fps."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 80), indexing="ij")
    noise = torch.rand(4, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    frames = torch.stack([torch.stack([(x + 0.1 * i) % 1, y, 1 - x]) for i in range(4)]) * 0.8 + 0.2 * noise
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mkv", frames, fps=24)


def error_line(err: str) -> str:
    """The one error message of a failed command: its own line, the last, after any ended progress line."""
    lines = err.split("\n")
    assert lines[-1] == "" and lines[-2].startswith("error: ")
    assert sum("error" in line for line in lines) == 1
    return lines[-2]


def nothing_written(parent: Path) -> bool:
    """No output folder and no hidden partial folder left in `parent`."""
    return not parent.exists() or not any(parent.iterdir())


# ---------------------------------------------------------------------------------------------------
# txt2img
# ---------------------------------------------------------------------------------------------------


def test_txt2img_writes_the_library_image(tiny_root, sd32, tmp_path):
    out = tmp_path / "fox.png"
    code = txt2img_cli.main(["--weights", str(tiny_root), "--prompt", "a fox", "--steps", "2", "--width", "64",
                             "--height", "72", "--seed", "3", "--out", str(out), "--device", "cpu", "--dtype", "fp32"])
    assert code == 0
    expected = txt2img(sd32, "a fox", steps=2, guidance=7.5, seed=3, size=(72, 64))  # (1, 3, 72, 64)
    expected = (expected[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.png"]  # no temporary file left


@pytest.mark.parametrize("args, message", [
    (["--weights", "{tmp}/missing-weights"], "stemref.download"),
    (["--out", "{tmp}/fox.txt"], "use a .png"),
    (["--size", "60"], "multiples of 8"),
    (["--prompt", "fox " * 80], "error: --prompt: prompt is 80 tokens long"),
    (["--negative", "blurry " * 80], "error: --negative: prompt is 80 tokens long"),
])
def test_txt2img_bad_input_exits_2_without_output(tiny_root, tmp_path, capsys, args, message):
    defaults = ["--weights", str(tiny_root), "--prompt", "a fox", "--steps", "1", "--size", "64",
                "--out", str(tmp_path / "fox.png"), "--device", "cpu", "--dtype", "fp32"]
    assert txt2img_cli.main([*defaults, *(a.format(tmp=tmp_path) for a in args)]) == 2  # the last value wins
    err = capsys.readouterr().err
    assert message in error_line(err)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# invert: one context
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stem_run(tiny_root, clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stem") / "run" / "mallard"  # parents do not exist yet
    code = invert_cli.main([str(clip), "--prompt", PROMPT, "--context", "stem", "--num-bases", "8", "--seed", "5",
                            "--weights", str(tiny_root), "--out", str(out), *FAST])
    assert code == 0
    return out


def test_invert_writes_all_files(stem_run):
    assert sorted(p.name for p in stem_run.iterdir()) == [
        MARKER, "explain", "index.html", "inversion.safetensors", "metrics.json", "reconstruction.mp4",
        "side_by_side.mp4"]
    assert [p.name for p in stem_run.parent.iterdir()] == ["mallard"]  # no hidden partial folder left
    for name, width in (("reconstruction.mp4", 64), ("side_by_side.mp4", 136)):  # 80×64 read as 64×48; 8 px gap
        with av.open(str(stem_run / name)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == 3 and decoded[0].shape == (48, width, 3)


@pytest.fixture(scope="module")
def library_stem(sd32, clip):
    """What the library gives for stem_run's settings: (frames, inversion, reconstruction)."""
    frames = read_video(clip, count=3, size=64)  # 80×64 -> 64×48 (longer side 64, crop to multiples of 8)
    inversion = invert(sd32, frames, PROMPT, steps=2, context="stem", seed=5, num_bases=8)
    return frames, inversion, reconstruct(sd32, inversion)


def test_invert_file_equals_library_inversion(stem_run, library_stem):
    expected = library_stem[1]
    saved = Inversion.load(stem_run / "inversion.safetensors")
    assert saved.timesteps == expected.timesteps and saved.settings == expected.settings
    torch.testing.assert_close(saved.latents, expected.latents, rtol=0, atol=0)


def test_invert_metrics(stem_run, library_stem):
    metrics = json.loads((stem_run / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["context"] == "stem" and metrics["frames"] == 3 and (metrics["width"], metrics["height"]) == (64, 48)
    assert metrics["steps"] == 2 and metrics["settings"]["options"] == {"num_bases": 8}
    assert metrics["settings"]["fps"] == 24.0  # the clip's rate, so the outputs play at its speed
    frames, _, recon = library_stem
    mse = ((recon.double().numpy() - frames.double().numpy()) ** 2).mean(axis=(1, 2, 3))  # per frame
    assert math.isfinite(metrics["psnr"])
    assert metrics["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), abs=1e-9)
    assert 0 < metrics["ssim"] <= 1
    for value in metrics["consistency"].values():
        assert -1 <= value <= 1
    assert all(s > 0 for s in metrics["seconds"].values())
    assert metrics["peak_memory_bytes"] > 0


def test_invert_refuses_non_empty_out_unless_overwrite(tiny_root, clip, tmp_path, capsys):
    out = tmp_path / "run"
    args = [str(clip), "--prompt", PROMPT, "--context", "1-frame", "--weights", str(tiny_root), "--out", str(out),
            *FAST, "--steps", "1", "--frames", "2"]
    assert invert_cli.main(args) == 0
    (out / "reconstruction.mp4").write_bytes(b"a stemref file, edited by the user: now the user's")
    (out / "notes.txt").write_text("added by the user")
    assert invert_cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    # files stemref did not write, or that changed since it wrote them, are listed and kept, never deleted
    assert invert_cli.main([*args, "--overwrite"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "2 file(s) that stemref did not write or that were changed since (notes.txt, reconstruction.mp4)" in line
    assert "Move them elsewhere" in line
    assert (out / "notes.txt").read_text() == "added by the user"
    assert (out / "reconstruction.mp4").read_bytes() == b"a stemref file, edited by the user: now the user's"
    (out / "notes.txt").unlink()
    (out / "reconstruction.mp4").unlink()
    assert invert_cli.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [  # replaced whole
        MARKER, "explain", "index.html", "inversion.safetensors", "metrics.json", "reconstruction.mp4",
        "side_by_side.mp4"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # neither the partial nor the old folder is left


# ---------------------------------------------------------------------------------------------------
# invert: --compare
# ---------------------------------------------------------------------------------------------------


def test_compare_writes_four_contexts_and_table(tiny_root, clip, tmp_path):
    out = tmp_path / "compare"
    code = invert_cli.main([str(clip), "--prompt", PROMPT, "--compare", "--num-bases", "8", "--batch", "2",
                            "--weights", str(tiny_root), "--out", str(out), *FAST, "--steps", "1", "--frames", "2"])
    assert code == 0
    contexts = ["1-frame", "2-frame", "all-frame", "stem"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *contexts, "compare.json", "compare.md",
                                                            "index.html"])
    page = (out / "index.html").read_text()
    assert all(f"href='{c}/index.html'" in page and (out / c / "index.html").is_file() for c in contexts)
    # the Settings table holds what every context shares: no one context's name, options or --batch
    settings = page.split("<h2>Settings</h2>")[1]
    assert "<th>prompt</th>" in settings and not re.search(r"<th>(context|options|batch)</th>", settings)
    contexts_table = page.split("<h2>Metrics</h2>")[1].split("<h2>")[0]  # the per-context rows carry them
    assert "<th>num_bases</th>" in contexts_table and "<th>batch</th>" in contexts_table
    rows = json.loads((out / "compare.json").read_text())
    assert [row["context"] for row in rows] == contexts
    for row in rows:
        assert json.loads((out / row["context"] / "metrics.json").read_text()) == row
        assert set(row) == METRIC_KEYS and math.isfinite(row["psnr"])
    assert rows[0]["settings"]["batch"] == 2 and rows[3]["settings"]["batch"] is None  # --batch: 1-frame only
    assert rows[3]["settings"]["options"] == {"num_bases": 8} and rows[0]["settings"]["options"] == {}

    lines = (out / "compare.md").read_text().splitlines()
    header = lines.index("| context | PSNR | SSIM | consistency | seconds | peak memory |")
    table = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    assert [cells[0] for cells in table] == ["DDIM inversion (1-frame)", "DDIM inversion (2-frame)",
                                             "DDIM inversion (all-frame)", "STEM inversion"]
    for cells, row in zip(table, rows):
        assert float(cells[1]) == pytest.approx(row["psnr"], abs=5e-4)
        assert float(cells[2]) == pytest.approx(row["ssim"], abs=5e-5)


# ---------------------------------------------------------------------------------------------------
# invert: bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such file"),
    (["{text}"], "not a readable video"),
    (["{clip}", "--size", "100"], "multiple of 8"),
    (["{clip}", "--context", "stem", "--batch", "2"], "only --context 1-frame"),
    (["{clip}", "--context", "2-frame", "--num-bases", "8"], "STEM option"),
    (["{clip}", "--weights", "{missing}"], "stemref.download"),
    (["{clip}", "--prompt", "duck " * 80], "error: --prompt: prompt is 80 tokens long"),
    (["{clip}", "--start", "10"], "beyond the end"),
])
def test_invert_bad_input_exits_2_without_output(tiny_root, clip, tmp_path, capsys, args, message):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    paths = {"clip": str(clip), "missing": str(tmp_path / "missing.mp4"), "text": str(text)}
    parent = tmp_path / "results"
    defaults = ["--prompt", PROMPT, "--weights", str(tiny_root), "--out", str(parent / "run"), *FAST]
    assert invert_cli.main([*defaults, *(a.format(**paths) for a in args)]) == 2  # the last value wins
    err = capsys.readouterr().err
    assert message in error_line(err)
    assert not parent.exists()  # not even the parent folder the run would have created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.mp4"]


@pytest.mark.parametrize("error, message", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied")])
def test_failure_mid_run_leaves_nothing(tiny_root, clip, tmp_path, monkeypatch, capsys, error, message):
    """A disk failing after some files were written (here: at the second video) removes the whole partial
    folder, and the one-line message names the file the user asked for, not the internal partial folder."""
    calls = []

    def failing_write(path, frames, fps=8):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise OSError(error, os.strerror(error), str(path))
        return write_video(path, frames, fps)

    monkeypatch.setattr(invert_cli, "write_video", failing_write)
    code = invert_cli.main([str(clip), "--prompt", PROMPT, "--context", "1-frame", "--weights", str(tiny_root),
                            "--out", str(tmp_path / "run"), *FAST, "--steps", "1", "--frames", "2"])
    assert code == 1
    assert calls == ["reconstruction.mp4", "side_by_side.mp4"]
    line = error_line(capsys.readouterr().err)
    assert message in line and str(tmp_path / "run" / "side_by_side.mp4") in line and ".partial" not in line
    assert list(tmp_path.iterdir()) == []


def test_errors_name_the_output_not_the_partial_folder(tiny_root, clip, tmp_path, monkeypatch, capsys):
    def refusing_write(path, frames, fps=8):
        raise ValueError(f"{path}: cannot write this video")

    monkeypatch.setattr(invert_cli, "write_video", refusing_write)
    assert invert_cli.main(invert_args(clip, tmp_path / "run", tiny_root)) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'run' / 'reconstruction.mp4'}: cannot write" in line and ".partial" not in line


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "stemref.invert", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--compare" in result.stdout and "--context" in result.stdout
    assert callable(stemref.invert)  # the function, not the shim module


# ---------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------


def run_example(name: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")


def test_example_txt2img(tiny_root, sd32, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fox.png"
    run_example("txt2img.py", [str(tiny_root), "a fox", "--out", str(out), "--steps", "2", "--size", "64"],
                monkeypatch)
    expected = txt2img(sd32, "a fox", steps=2, seed=0, size=64)
    expected = (expected[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    assert f"wrote {out}" in capsys.readouterr().out


def test_example_invert_reconstruct(tiny_root, clip, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sbs.mp4"
    run_example("invert_reconstruct.py", [str(tiny_root), str(clip), PROMPT, "--frames", "2", "--size", "64",
                                          "--steps", "2", "--out", str(out)], monkeypatch)
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 2 and decoded[0].shape == (64, 128, 3)  # square 64×64 crops, input | reconstruction
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "SSIM" in printed


@pytest.mark.parametrize("name, argv", [("txt2img.py", ["a fox"]), ("invert_reconstruct.py", ["clip.mp4", "a duck"])])
def test_examples_hint_at_missing_weights(tmp_path, monkeypatch, name, argv):
    with pytest.raises(SystemExit, match="python -m stemref.download"):
        run_example(name, [str(tmp_path / "nowhere"), *argv], monkeypatch)


# ---------------------------------------------------------------------------------------------------
# issue 6: no data loss, arguments checked before work, one-line errors, no silent wrong results
# ---------------------------------------------------------------------------------------------------


def invert_args(video: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [str(video), "--prompt", PROMPT, "--context", "1-frame", "--weights", str(weights), "--out", str(out),
            *FAST, "--steps", "1", "--frames", "2", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_clips(tiny_root, tmp_path) -> Path:
    """A user's folder: extracted frames (PNG) and the weights, side by side."""
    clips = tmp_path / "clips"
    frames = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    save_frames(clips / "frames", frames)
    shutil.copytree(tiny_root, clips / "weights")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    return clips


@pytest.mark.parametrize("out, message", [
    ("clips/frames", "is the input"),  # --out equal to the input frame folder
    ("clips", "contains the input"),  # --out holding the frames and the weights
    ("clips/weights", "is the input"),
    ("home", "not written by stemref"),  # a folder of the user's that holds no input
])
def test_overwrite_never_deletes_what_stemref_did_not_write(user_clips, tmp_path, capsys, out, message):
    before = snapshot(tmp_path)
    code = invert_cli.main(invert_args(user_clips / "frames", tmp_path / out, user_clips / "weights", "--overwrite"))
    assert code == 2
    assert message in error_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_txt2img_out_equal_to_the_weights_file_is_refused(tmp_path, capsys):
    weights = tmp_path / "model.png"  # a single-file checkpoint under an image name, to reach the check
    weights.write_bytes(b"weights")
    code = txt2img_cli.main(["--weights", str(weights), "--prompt", "a fox", "--out", str(weights), "--overwrite"])
    assert code == 2 and "is the input" in error_line(capsys.readouterr().err)
    assert weights.read_bytes() == b"weights"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_exit_with_their_codes_and_leave_nothing(tiny_root, clip, tmp_path, monkeypatch, capsys,
                                                                     signum, code):
    def interrupted_reconstruct(*args, **kwargs):
        os.kill(os.getpid(), signum)  # delivered to this (the main) thread before the next line runs
        raise AssertionError("the signal did not interrupt")

    monkeypatch.setattr(invert_cli, "reconstruct", interrupted_reconstruct)
    assert invert_cli.main(invert_args(clip, tmp_path / "results" / "run", tiny_root)) == code
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted; partial output was removed\n")  # on its own line, after the progress
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stale_partial_folders_of_killed_runs_are_removed(tiny_root, clip, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    marker = {"written_by": "stemref", "host": host, "resume": None}
    folders = {".run.00000000.partial": {**marker, "pid": int(dead.stdout)},  # killed: removed
               ".old.11111111.partial": {**marker, "pid": os.getppid()},  # a run still going: kept
               ".mine.22222222.partial": None}  # no marker, not stemref's: kept
    for name, info in folders.items():
        (tmp_path / name).mkdir()
        if info:
            (tmp_path / name / MARKER).write_text(json.dumps(info))
    assert invert_cli.main(invert_args(clip, tmp_path / "run", tiny_root)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.22222222.partial", ".old.11111111.partial", "run"]


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tiny_root, clip, tmp_path):
    # a run killed between moving the old --out aside (--overwrite) and renaming its result into place
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / ".run.33333333.old"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"written_by": "stemref", "host": socket.gethostname(),
                                          "pid": int(dead.stdout), "resume": None, "files": ["metrics.json"]}))
    (old / "metrics.json").write_text("{}")
    # the next run into the same --out finds the old result back in place and refuses to replace it silently
    assert invert_cli.main(invert_args(clip, tmp_path / "run", tiny_root)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"


def test_compare_resumes_the_contexts_that_finished(tiny_root, clip, tmp_path, monkeypatch, capsys):
    real, ran = invert_cli._invert_and_reconstruct, []

    def interrupted_at_all_frame(sd, frames, context, *args):
        ran.append(context)
        if context == "all-frame" and len(ran) == 3:
            raise KeyboardInterrupt
        return real(sd, frames, context, *args)

    monkeypatch.setattr(invert_cli, "_invert_and_reconstruct", interrupted_at_all_frame)
    out = tmp_path / "compare"
    args = [str(clip), "--prompt", PROMPT, "--compare", "--num-bases", "8", "--weights", str(tiny_root),
            "--out", str(out), *FAST, "--steps", "1", "--frames", "2"]
    assert invert_cli.main(args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    kept = tmp_path / ".compare.resume"
    assert sorted(p.name for p in kept.iterdir()) == [MARKER, "1-frame", "2-frame", "all-frame"]
    assert not (kept / "all-frame" / "metrics.json").exists()  # unfinished: the rerun starts it over
    first = snapshot(kept / "1-frame")
    assert invert_cli.main(args) == 0
    assert ran == ["1-frame", "2-frame", "all-frame", "all-frame", "stem"]  # the rerun did only what was left
    assert snapshot(out / "1-frame") == first
    assert [row["context"] for row in json.loads((out / "compare.json").read_text())] == list(invert_cli.PAPER_TABLE_A3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare"]


@pytest.mark.parametrize("args, message", [
    (["--steps", "2000"], "--steps 2000"),
    (["--device", "cuda"], "--device cpu"),
    (["--prompt", "a duck \udcff"], "--prompt is not valid UTF-8"),
    (["--out", "{file}/run"], "is a file"),
    (["--model-config", "{file}"], "--model-config"),
])
def test_invert_checks_every_argument_before_reading_or_loading(tiny_root, clip, tmp_path, monkeypatch, capsys,
                                                               args, message):
    def too_late(*args, **kwargs):
        raise AssertionError("reached a slow stage with a bad argument")

    monkeypatch.setattr(invert_cli, "read_video", too_late)
    monkeypatch.setattr(invert_cli, "load_model", too_late)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, even on a GPU machine
    (tmp_path / "file").write_text("a file")
    args = [a.format(file=tmp_path / "file") for a in args]
    assert invert_cli.main([*invert_args(clip, tmp_path / "out", tiny_root), *args]) == 2
    assert message in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("args, message", [
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--steps", "0"], "--steps 0"),
    (["--width", "64", "--height", "60"], "multiple"),
    (["--width", "64"], "--width and --height go together"),
    (["--size", "64", "--width", "64", "--height", "64"], "not both"),
    (["--negative", "\udcff"], "--negative is not valid UTF-8"),
    (["--out", "{tmp}/existing.png"], "exists; choose another name or pass --overwrite"),
    (["--out", "{tmp}/folder.png"], "is a folder"),
])
def test_txt2img_checks_every_argument_before_loading(tiny_root, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(txt2img_cli, "load_model", lambda *a, **k: pytest.fail("loaded with a bad argument"))
    (tmp_path / "existing.png").write_bytes(b"an earlier image")
    (tmp_path / "folder.png").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    code = txt2img_cli.main(["--weights", str(tiny_root), "--prompt", "a fox", "--out", str(tmp_path / "fox.png"),
                             "--device", "cpu", *args])
    assert code == 2 and message in error_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == {"existing.png": b"an earlier image"}


def test_txt2img_replaces_an_existing_file_only_with_overwrite(tiny_root, tmp_path):
    out = tmp_path / "fox.png"
    out.write_bytes(b"an earlier image")
    args = ["--weights", str(tiny_root), "--prompt", "a fox", "--steps", "1", "--size", "64", "--out", str(out),
            "--device", "cpu", "--overwrite"]
    assert txt2img_cli.main(args) == 0
    assert Image.open(out).size == (64, 64)


def test_txt2img_keeps_a_file_that_appears_at_out_during_the_run(tiny_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fox.png"

    def meanwhile(*args, **kwargs):
        out.write_bytes(b"another run's image")
        return txt2img(*args, **kwargs)

    monkeypatch.setattr(txt2img_cli, "txt2img", meanwhile)
    args = ["--weights", str(tiny_root), "--prompt", "a fox", "--steps", "1", "--size", "64", "--out", str(out),
            "--device", "cpu"]
    assert txt2img_cli.main(args) == 1
    assert f"the image is in {tmp_path / 'fox-2.png'}" in error_line(capsys.readouterr().err)
    assert out.read_bytes() == b"another run's image" and Image.open(tmp_path / "fox-2.png").size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-2.png", "fox.png"]


def test_a_short_clip_is_used_whole_and_the_count_reported(tiny_root, clip, tmp_path, capsys):
    out = tmp_path / "run"
    assert invert_cli.main([*invert_args(clip, out, tiny_root), "--frames", "10"]) == 0
    err = capsys.readouterr().err
    assert "has only 4 frames" in err and "using 4, not --frames 10" in err
    assert "4 frames of 64×48" in err
    assert json.loads((out / "metrics.json").read_text())["frames"] == 4


@pytest.mark.parametrize("command", ["invert", "txt2img"])
def test_non_finite_results_are_refused_not_written(tiny_root, clip, tmp_path, monkeypatch, capsys, command):
    """fp16 overflow gives NaN noise predictions; before, invert saved NaN latents and txt2img a black PNG."""
    def nan_noise(sd, x, *args):
        return torch.full_like(x, float("nan"))

    monkeypatch.setattr(stemref.inversion, "predict_noise", nan_noise)
    monkeypatch.setattr(stemref.sampling, "predict_noise", nan_noise)
    if command == "invert":
        code = invert_cli.main(invert_args(clip, tmp_path / "run", tiny_root))
    else:
        code = txt2img_cli.main(["--weights", str(tiny_root), "--prompt", "a fox", "--steps", "1", "--size", "64",
                                 "--out", str(tmp_path / "fox.png"), "--device", "cpu"])
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert "NaN or infinite" in line and "this run is float32" in line and "--dtype fp32" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_config_with_wrong_types_is_one_line(tiny_root, clip, tmp_path, capsys):
    weights = shutil.copytree(tiny_root, tmp_path / "sd")
    config = json.loads((weights / "unet" / "config.json").read_text())
    (weights / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": "2"}))
    assert invert_cli.main(invert_args(clip, tmp_path / "run", weights)) == 2
    line = error_line(capsys.readouterr().err)
    assert "unet/config.json" in line and "layers_per_block" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_output_files_all_get_the_same_permissions(stem_run):
    modes = {str(p.relative_to(stem_run)): p.stat().st_mode & 0o777 for p in stem_run.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.parametrize("module, outputs", [
    (invert_cli, ["inversion.safetensors", "reconstruction.mp4", "side_by_side.mp4", "metrics.json", "compare.md"]),
    (txt2img_cli, [".png"]),
    (download_cli, ["weights/README.md"]),
])
def test_help_lists_defaults_and_outputs(module, outputs, monkeypatch, capsys):
    parsers = []
    real_parse = argparse.ArgumentParser.parse_args

    def keep(self, *args, **kwargs):
        parsers.append(self)
        return real_parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in outputs)
    for action in parsers[0]._actions:  # every option that has a default says what it is
        if action.option_strings and not action.required and action.nargs != 0:
            assert "default" in (action.help or ""), action.option_strings


def test_progress_shows_rate_and_eta_and_ends_its_line_before_any_message(monkeypatch, capsys):
    import stemref.cli.progress as cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    clock = iter([0.0, 10.0, 12.0, 100.0, 102.0])  # created, two reports (the first after 10 s); again, one report
    monkeypatch.setattr(cli, "time", type("Clock", (), {"monotonic": staticmethod(lambda: next(clock))}))
    with pytest.raises(RuntimeError):
        with cli.progress_printer("denoising") as report:
            report(1, 4)
            report(2, 4)
            raise RuntimeError("stopped mid-stage")
    print("error: a message", file=sys.stderr)
    err = capsys.readouterr().err
    assert err.endswith(" \nerror: a message\n")  # the progress line was ended before the message
    lines = [line.rstrip() for line in err.split("\r")]
    assert lines[1] == "denoising: 1/4 steps, 10.00 s/step, ETA 0:30"
    assert lines[2].split(" \n") == ["denoising: 2/4 steps, 2.00 s/step, ETA 0:04".ljust(78), "error: a message"]
    with cli.progress_printer("writing", "file") as report:
        report(1, 1)
    assert capsys.readouterr().err.split("\r")[1].rstrip(" \n") == "writing: 1/1 files, 2.00 s/file, 0:02 in all"


def test_progress_in_a_log_file_is_plain_lines_every_few_seconds(monkeypatch, capsys):
    import stemref.cli.progress as progress

    assert not sys.stderr.isatty()
    times = [0.0, 1.0, 1.0, 2.0, 2.0, 6.5, 6.5, 7.0, 7.0]  # created; then (report, show) for each of 4 reports
    clock = iter(times)
    monkeypatch.setattr(progress, "time", type("Clock", (), {"monotonic": staticmethod(lambda: next(clock))}))
    with progress.progress_printer("denoising") as report:
        for done in range(1, 5):
            report(done, 10)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(",")[0] for line in err.splitlines()] == [  # the first, one after 5 s, the last
        "denoising: 1/10 steps", "denoising: 3/10 steps", "denoising: 4/10 steps"]


def test_an_unwritable_out_is_refused_before_any_work(tiny_root, clip, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # tests may run as root, who may write anywhere: the folder is made unwritable by answering for the OS
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    monkeypatch.setattr(invert_cli, "read_video", lambda *a, **k: pytest.fail("read the video for an unwritable --out"))
    assert invert_cli.main(invert_args(clip, locked / "run", tiny_root)) == 2
    assert f"no permission to write in {locked}" in error_line(capsys.readouterr().err)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("args, warning", [
    (["--size", "2048"], "--size 2048: SD1.5 was trained at 512 px"),
    (["--context", "stem", "--num-bases", "10000"], "--num-bases 10000: STEM uses 256"),
])
def test_obviously_heavy_runs_are_warned_about_before_work(tiny_root, clip, tmp_path, monkeypatch, capsys, args,
                                                          warning):
    def stop(*a, **k):
        raise KeyboardInterrupt  # the warning is all this test needs

    monkeypatch.setattr(invert_cli, "read_video", stop)
    assert invert_cli.main([*invert_args(clip, tmp_path / "run", tiny_root), *args]) == 130
    assert capsys.readouterr().err.startswith(f"warning: {warning}")


def test_txt2img_warns_about_a_huge_size_before_loading(tiny_root, tmp_path, monkeypatch, capsys):
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(txt2img_cli, "load_model", stop)
    code = txt2img_cli.main(["--weights", str(tiny_root), "--prompt", "a fox", "--height", "512",
                             "--width", "2048", "--out", str(tmp_path / "fox.png"), "--device", "cpu"])
    assert code == 130 and capsys.readouterr().err.startswith("warning: --width 2048: SD1.5 was trained at 512 px")


def test_out_of_memory_is_one_line(tiny_root, clip, tmp_path, monkeypatch, capsys):
    def exhausted(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(invert_cli, "invert", exhausted)
    assert invert_cli.main(invert_args(clip, tmp_path / "run", tiny_root)) == 1
    assert "out of memory; use a smaller --size" in error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


# the modules whose only job is to give a command its `python -m stemref.NAME`: they may import the command
COMMAND_SHIMS = {"invert.py", "txt2img.py", "evaluate.py"}


def test_the_library_never_imports_the_command_line():
    import ast

    package = Path(stemref.__file__).parent
    for file in package.rglob("*.py"):
        shim = file.name == "__main__.py" or file.parent == package and file.name in COMMAND_SHIMS
        if package / "cli" in file.parents or shim:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                assert "cli" not in name.split("."), f"{file.relative_to(package)} imports {name}"
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("stemref.cli")]
                assert not names, f"{file.relative_to(package)} imports {names}"


def test_download_runs_as_a_module_without_the_library_importing_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stemref.download", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--model" in result.stdout


# ---------------------------------------------------------------------------------------------------
# The final rename checks again (two runs at one --out, a file appearing in --out during a run)
# ---------------------------------------------------------------------------------------------------


def finished_output(path: Path, text: str) -> None:
    with output_folder(path) as tmp:
        (tmp / "result.txt").write_text(text)


def test_a_file_appearing_in_out_during_a_run_is_kept_and_so_is_the_result(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Conflict, match=f"the result is in {tmp_path / 'run-2'}"):
        with output_folder(out) as tmp:
            (tmp / "result.txt").write_text("the result")
            out.mkdir()
            (out / "notes.txt").write_text("the user's")
    assert snapshot(out) == {"notes.txt": b"the user's"}
    assert snapshot(tmp_path / "run-2")["result.txt"] == b"the result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-2"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_runs_at_one_out_keep_both_results(tmp_path, overwrite):
    out = tmp_path / "run"
    with pytest.raises(Conflict, match="was created while this run worked"):
        with output_folder(out, overwrite) as tmp:  # the slower run, started first
            (tmp / "result.txt").write_text("second to finish")
            finished_output(out, "first to finish")
    assert snapshot(out)["result.txt"] == b"first to finish"
    assert snapshot(tmp_path / "run-2")["result.txt"] == b"second to finish"


def test_overwrite_replaces_only_the_folder_its_check_allowed(tmp_path):
    out = tmp_path / "run"
    finished_output(out, "an old result")
    with pytest.raises(Conflict, match="changed while this run worked"):
        with output_folder(out, overwrite=True) as slow:
            (slow / "result.txt").write_text("slow")
            with output_folder(out, overwrite=True) as fast:  # replaces the old result first
                (fast / "result.txt").write_text("fast")
    assert snapshot(out)["result.txt"] == b"fast"
    assert snapshot(tmp_path / "run-2")["result.txt"] == b"slow"


def test_overwrite_keeps_a_file_added_to_the_old_output_during_the_run(tmp_path):
    out = tmp_path / "run"
    finished_output(out, "an old result")
    with pytest.raises(Conflict, match="changed while this run worked"):
        with output_folder(out, overwrite=True) as tmp:
            (tmp / "result.txt").write_text("new")
            (out / "render.mp4").write_bytes(b"the user's render")
    assert snapshot(out) == {MARKER: (out / MARKER).read_bytes(), "result.txt": b"an old result",
                             "render.mp4": b"the user's render"}
    assert snapshot(tmp_path / "run-2")["result.txt"] == b"new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing hidden left behind


def test_an_output_of_an_older_stemref_counts_files_newer_than_its_marker_as_the_users(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / MARKER).write_text(json.dumps({"written_by": "stemref", "pid": 1, "resume": None}))  # no file list
    (out / "notes.txt").write_text("the user's")
    os.utime(out / "metrics.json", (1, 1))
    os.utime(out / MARKER, (2, 2))
    with pytest.raises(UserError, match=r"1 file\(s\) that stemref did not write or that were changed since \(notes.txt\)"):
        check_output_folder(out, overwrite=True)
    (out / "notes.txt").unlink()
    check_output_folder(out, overwrite=True)


# ---------------------------------------------------------------------------------------------------
# Failing cleanly and early (issue 14, §4)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, argv", [
    ("invert", ["v.mp4", "--prompt", "a", "--out", "o", "--weights", "w", "--steps", "2.5"]),
    ("txt2img", ["--prompt", "a", "--weights", "w", "--steps", "2.5"]),
    ("evaluate", ["e.mp4", "--source-video", "s.mp4", "--prompt", "a", "--source-prompt", "b", "--frames", "2.5"]),
    ("download", ["--variant", "bf16"]),
    ("edit", ["v.mp4", "--source", "a", "--target", "b", "--steps", "2.5"]),
])
def test_an_argument_of_the_wrong_type_is_one_line_and_exit_2(capsys, command, argv):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"stemref.cli.{command}").main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument ") and err.endswith(f"; see python -m stemref.{command} --help\n")


@pytest.mark.parametrize("extra, message", [
    (["--seed", str(2**63)], f"--seed {2**63}: use a whole number from 0 to {2**63 - 1}"),
    (["--fps", "1e-9"], "--fps 1e-09: use a frame rate from 0.01 to 1000"),
    (["--context", "stem", "--num-bases", "100000000"], "so use at most 128 bases"),  # 2 frames of 64×64
])
def test_invert_bounds_what_cannot_work(tiny_root, clip, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(invert_cli, "load_model", lambda *a, **k: pytest.fail("loaded the model for a bad input"))
    args = invert_args(clip, tmp_path / "run", tiny_root, "--size", "64", "--square", *extra)
    assert invert_cli.main(args) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_txt2img_bounds_the_seed(tiny_root, tmp_path, capsys):
    assert txt2img_cli.main(["--weights", str(tiny_root), "--prompt", "a fox", "--seed", str(2**64),
                             "--out", str(tmp_path / "a.png")]) == 2
    assert f"use a whole number from 0 to {2**63 - 1}" in error_line(capsys.readouterr().err)


def test_write_video_refuses_a_rate_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="fps must be a number from 0.01 to 1000"):
        write_video(tmp_path / "a.mp4", torch.zeros(1, 3, 16, 16), fps=1e-9)


def test_a_fifo_as_a_video_is_refused_by_every_command(tiny_root, clip, tmp_path, capsys):
    from stemref.cli import evaluate as evaluate_cli

    fifo = tmp_path / "video.mp4"
    os.mkfifo(fifo)
    assert invert_cli.main(invert_args(fifo, tmp_path / "run", tiny_root)) == 2
    assert "is not a regular file or a folder" in error_line(capsys.readouterr().err)
    for argv in ([str(fifo), "--source-video", str(clip)], [str(clip), "--source-video", str(fifo)]):
        assert evaluate_cli.main([*argv, "--prompt", "a", "--source-prompt", "b", "--device", "cpu"]) == 2
        assert f"{fifo} is not a regular file or a folder" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("prompt, source_prompt, message", [
    ("", "a swan", "--prompt is empty"),
    ("a swan", "  ", "--source-prompt is empty"),
    ("a sw\udcffan", "a duck", "--prompt is not valid UTF-8 text"),
])
def test_evaluate_refuses_an_empty_or_undecodable_prompt(clip, capsys, prompt, source_prompt, message):
    from stemref.cli import evaluate as evaluate_cli

    assert evaluate_cli.main([str(clip), "--source-video", str(clip), "--prompt", prompt, "--source-prompt",
                              source_prompt, "--device", "cpu"]) == 2
    assert message in error_line(capsys.readouterr().err)


def test_the_suite_pins_torch_threads_here_and_in_subprocesses():
    threads = int(os.environ.get("STEMREF_TEST_THREADS", "1"))
    assert torch.get_num_threads() == threads
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == str(threads)


@pytest.mark.parametrize("name", ["a.mp4", "a.mkv"])
def test_the_same_frames_are_written_as_the_same_bytes(tmp_path, name):
    frames = torch.rand(6, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    written = {write_video(tmp_path / str(i) / name, frames, fps=8).read_bytes() for i in range(3)}
    assert len(written) == 1
    if name.endswith(".mp4"):  # x264 records its settings in the stream: one thread, whatever the machine
        data = written.pop()
        assert b" threads=1 " in data and b" lookahead_threads=1 " in data


def test_side_by_side_labels_each_panel_and_leaves_a_gap():
    from stemref.video import side_by_side

    source = torch.full((2, 3, 64, 96), 0.5, dtype=torch.float64)
    edit = torch.full((2, 3, 64, 96), 0.25, dtype=torch.float64)
    plain = side_by_side(source, edit, gap=8)
    assert plain.shape == (2, 3, 64, 200) and (plain[..., 96:104] == 1).all()
    assert torch.equal(plain[..., :96], source) and torch.equal(plain[..., 104:], edit)
    labelled = side_by_side(source, edit, labels=["source", "edit 1: a swan"], gap=8)
    assert labelled.shape == plain.shape and (labelled[..., 96:104] == 1).all()
    for panel, video in ((labelled[..., :96], source), (labelled[..., 104:], edit)):
        changed = (panel != video).any(dim=(0, 1))  # (H, W): where the label is
        rows, cols = changed.nonzero().unbind(1)
        assert rows.min() == 0 and cols.min() == 0 and rows.max() < 32  # at the top left, in a small box
        assert (panel[..., 32:, :] == video[..., 32:, :]).all()  # the rest of the frame untouched
        assert panel.max() > video.max() and panel.min() < video.min()  # light text on a darkened box
    # another text, another drawing; a label too long for the panel is cut, not drawn over the next one
    other = side_by_side(source, edit, labels=["source", "edit 1: a " + "very " * 40 + "long prompt"], gap=8)
    assert not torch.equal(other[..., 104:], labelled[..., 104:]) and (other[..., 96:104] == 1).all()
    with pytest.raises(ValueError, match="one per video"):
        side_by_side(source, edit, labels=["source"])


def test_a_label_with_newlines_and_control_characters_is_drawn_on_one_line():
    """A --target may hold any text (config.toml keeps it); its label must not end the run after all the work."""
    from stemref.video import side_by_side

    video = torch.full((1, 3, 64, 96), 0.5, dtype=torch.float64)
    tricky = side_by_side(video, labels=["edit 1: a\ndog\r\x7f\x00 \u2028on a mat"])
    plain = side_by_side(video, labels=["edit 1: a dog     on a mat"])
    assert torch.equal(tricky, plain)


def test_a_disk_full_before_the_first_file_leaves_no_partial_folder(tmp_path, monkeypatch):
    """The marker is the first file of the partial folder: a full disk fails there, and nothing may stay (a
    partial folder without its marker would never be cleaned up by a later run)."""
    from stemref.cli import output

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output, "_write_marker", full)
    with pytest.raises(OSError, match="No space left"):
        with output.output_folder(tmp_path / "new" / "run"):
            pytest.fail("the block ran without its marker")
    assert list(tmp_path.iterdir()) == []
