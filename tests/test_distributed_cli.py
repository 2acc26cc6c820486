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


READS = {  # case -> (start, stride, count) of read_shared; bunny.mp4 has 16 frames
    "shard": (1, 2, 5),  # frames 1, 3, …, 9: rank 1's shard is frames 3 and 4, source frames 7 and 9
    "short": (10, 2, 8),  # only frames 10, 12, 14: rank 1's guessed shard of 8 is past the end, it reads again
    "other file": (0, 1, 4),  # rank 1's file differs (mirrored frames)
    "unreadable": (0, 1, 4),  # rank 0 cannot read its file
}


def _reader(rank: int, folder: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from stemref.cli.launch import Launch, read_shared

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    launch = Launch(dist.group.WORLD, rank, 2, dist.group.WORLD)
    results, frames = {}, {}
    for case, (start, stride, count) in READS.items():
        calls = []

        def read(first: int, n: int | None) -> torch.Tensor:
            calls.append([first, n])
            path = CLIP.with_name("missing.mp4") if case == "unreadable" and rank == 0 else CLIP
            video = read_video(path, first, stride, n, size=64)
            return video.flip(-1) if case == "other file" and rank == 1 else video
        try:
            shared = read_shared(launch, read, start, stride, count)
            results[case] = {"calls": calls, "total": shared.total, "digest": shared.digest}
            frames[case] = shared.frames.contiguous()
        except Exception as e:  # noqa: BLE001 (the test compares the messages)
            results[case] = {"calls": calls, "error": f"{type(e).__name__}: {e}"}
    dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    save_file(frames, f"{folder}/rank{rank}.safetensors")


def test_ranks_after_the_first_read_only_their_shard_and_must_read_rank_0s_frames(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from stemref.edit.cache import tensor_digest

    mp.start_processes(_reader, args=(str(tmp_path),), nprocs=2, join=True, start_method="spawn")
    (zero, one), (frames0, frames1) = ([json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)],
                                       [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)])
    for case, (start, stride, count), shard, reads in [("shard", READS["shard"], slice(3, 5), [[7, 2]]),
                                                       ("short", READS["short"], slice(2, 3), [[18, 4], [14, 1]])]:
        whole = read_video(CLIP, start, stride, count, size=64)
        assert zero[case]["calls"] == [[start, count]] and one[case]["calls"] == reads, case
        assert torch.equal(frames0[case], whole), case
        assert torch.equal(frames1[case], whole[shard]), case  # bit for bit the frames rank 0 holds there
        assert zero[case]["total"] == one[case]["total"] == len(whole), case
        assert zero[case]["digest"] == one[case]["digest"] == tensor_digest(whole), case  # the cache key's
    for rank in (zero, one):  # every rank refuses, with one message naming the rank and the fix
        assert rank["other file"]["error"] == ("UserError: rank(s) 1 read other frames of the video than rank 0 "
                                               "(another file at the same path?); give every machine the same "
                                               "video file")
        assert rank["unreadable"]["error"].endswith("missing.mp4: no such file or folder; check the path "
                                                    f"(relative paths start at {Path.cwd()})")
