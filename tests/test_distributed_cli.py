"""`torchrun -m stemref.edit` on the CPU (gloo): two processes write what one writes; a killed rank, more
processes than frames and ranks that disagree end cleanly (no output folder, no damaged cache entry).

torchrun runs in a subprocess on the tiny checkpoint and the shipped clip at a small size, in float64.
tests/torchrun_edit.py runs the command with one rank misbehaving on request.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from stemref.cli.edit import main
from stemref.cli.invert import main as invert_main
from stemref.inversion import Inversion
from stemref.video import read_video

ROOT = Path(__file__).parent.parent
CLIP = ROOT / "examples" / "bunny.mp4"
SMALL = ["--frames", "5", "--size", "96", "--steps", "2", "--batch", "2", "--num-bases", "8", "--dtype", "fp64",
         "--device", "cpu", "--format", "mkv", "--source", "a rabbit on a hill", "--target", "a bear on a hill"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def torchrun(processes: int, mode: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, str(processes), str(ROOT / "tests" / "torchrun_edit.py"),
                           mode, str(CLIP), *SMALL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name == "run")


def test_two_processes_write_the_files_of_one(tiny_root, tmp_path):
    common = ["--weights", str(tiny_root), "--cache", str(tmp_path / "cache")]
    assert main([str(CLIP), *SMALL, *common, "--out", str(tmp_path / "one")]) == 0
    # the sharded edit starts from the cached inversion, which every rank reads (the sharded inversion itself is
    # compared with one process's in the invert test below, and cached by the killed-rank test's run)
    result = torchrun(2, "plain", *common, "--out", str(tmp_path / "two"))
    assert result.returncode == 0 and "inversion: reusing" in result.stderr, result.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    # every file but the pictures of what the method computed (index.html's explain/), which need every frame's
    # features in one process and are not drawn in a sharded run
    assert sorted(p.name for p in one.iterdir() if p.name != "explain") == sorted(p.name for p in two.iterdir())
    for video in one.glob("*.mkv"):  # lossless: the decoded frames, not the container bytes (it holds a UID)
        assert torch.equal(read_video(video), read_video(two / video.name)), video.name
    config_one, config_two = (tomllib.loads((f / "config.toml").read_text()) for f in (one, two))
    assert (config_one.pop("processes"), config_two.pop("processes")) == (1, 2)
    assert config_one == config_two
    metrics_one, metrics_two = (json.loads((f / "metrics.json").read_text()) for f in (one, two))
    assert metrics_one["frames"] == metrics_two["frames"] == 5
    for a, b in zip(metrics_one["edits"], metrics_two["edits"]):
        assert a["file"] == b["file"] and a["consistency"] == pytest.approx(b["consistency"], rel=1e-10)


def test_a_killed_rank_ends_the_run_cleanly(tiny_root, tmp_path):
    started = time.monotonic()
    result = torchrun(2, "kill", "--weights", str(tiny_root), "--cache", str(tmp_path / "cache"),
                      "--out", str(tmp_path / "run"), "--timeout", "60")
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    # torchrun's agent stops the other rank at once and names the one that failed (ours would, without torchrun)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", result.stderr), result.stderr[-3000:]
    assert leftovers(tmp_path) == []  # neither the output folder nor a hidden partial one
    cached = list((tmp_path / "cache" / "inversions").glob("*.safetensors"))
    assert len(cached) == 1  # stored before the kill, and sound: it verifies and loads
    assert cached[0].with_suffix(".sha256").read_text().strip() == hashlib.sha256(cached[0].read_bytes()).hexdigest()
    assert Inversion.load(cached[0]).latents.shape[1] == 5  # the whole video's, gathered from both ranks


@pytest.mark.parametrize("mode, extra, message", [
    ("plain", ["--frames", "2"], "3 processes cannot share 2 frame(s)"),
    ("disagree", [], "the processes disagree on the settings: rank(s) 1"),
])
def test_impossible_runs_exit_2_before_any_work(tiny_root, tmp_path, mode, extra, message):
    result = torchrun(3 if mode == "plain" else 2, mode, "--weights", str(tiny_root), "--cache",
                      str(tmp_path / "cache"), "--out", str(tmp_path / "run"), *extra)
    assert result.returncode != 0
    assert message in result.stderr and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert leftovers(tmp_path) == [] and not (tmp_path / "cache").exists()


def test_torchrun_invert_writes_the_inversion_of_one_process(tiny_root, tmp_path):
    common = [str(CLIP), "--prompt", "a rabbit on a hill", "--frames", "5", "--size", "96", "--steps", "2",
              "--num-bases", "8", "--dtype", "fp64", "--device", "cpu", "--weights", str(tiny_root)]
    assert invert_main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*TORCHRUN, "2", "-m", "stemref.invert", *common, "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (Inversion.load(tmp_path / name / "inversion.safetensors") for name in ("one", "two"))
    scale = one.latents.abs().max().item()
    assert one.latents.shape == two.latents.shape and (one.latents - two.latents).abs().max() <= 1e-10 * scale
    metrics_one, metrics_two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert (metrics_one.pop("processes"), metrics_two.pop("processes")) == (1, 2)
    assert metrics_one["psnr"] == pytest.approx(metrics_two["psnr"], rel=1e-9)
    assert {p.name for p in (tmp_path / "one").iterdir()} - {"explain"} == {p.name for p in (tmp_path / "two").iterdir()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_without_cuda_exits_2_before_any_work(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the refusal comes before joining any group
    code = main([str(CLIP), *SMALL[:-6], "--source", "a", "--target", "b", "--device", "cuda", "--weights",
                 str(tiny_root), "--out", str(tmp_path / "run")])
    assert code == 2 and "needs NCCL and a CUDA GPU" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def _survivor(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from stemref.cli.launch import Launch, failed_ranks

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    launch = Launch(dist.group.WORLD, rank, 2, dist.group.WORLD, dist.FileStore(f"{folder}/alive", 2))
    ready = Path(folder, "rank0-ready")
    if rank == 0:
        dist.barrier()  # both ranks are through gloo's connection set-up: rank 1 may now die
        ready.write_text("")
    else:
        dist.barrier()
        while not ready.exists():  # dying while rank 0 still connects would fail its init, not test the probe
            time.sleep(0.01)
        os._exit(0)  # dies without a word, as a killed process would
    Path(folder, f"rank{rank}.txt").write_text(failed_ranks(launch, wait=2.0))


def test_survivors_name_the_rank_that_died(tmp_path):
    """Without torchrun's agent (which stops the others and names the rank itself), a survivor's line names it."""
    import torch.multiprocessing as mp

    processes = mp.start_processes(_survivor, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    while not processes.join(timeout=120):  # returns at each process's end (rank 1's first)
        pass
    assert (tmp_path / "rank0.txt").read_text() == "rank(s) 1 failed or were killed; this run was stopped"
