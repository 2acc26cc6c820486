"""`python -m stemref.edit` end to end on the shipped clip (examples/bunny.mp4) with the tiny random-weight model.

Runs the command in-process (stemref.cli.edit.main) at a small size and few steps: outputs exist and decode,
the inversion cache is reused and a damaged entry recomputed, an output's config.toml repeats the edit
exactly, missing weights are downloaded from a hub on 127.0.0.1 (or refused with --offline), and bad input
fails with one line, exit code 2 and no output folder.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from stemref.cli.edit import main
from stemref.cli.edit_methods import METHODS
from stemref.video import read_video

CLIP = Path(__file__).parent.parent / "examples" / "bunny.mp4"
SMALL = ["--frames", "5", "--size", "96", "--steps", "2"]


def edit(tmp_path: Path, weights: Path, out: str, *extra: str, video: Path = CLIP) -> int:
    return main([str(video), "--source", "a rabbit on a hill", "--target", "a bear on a hill", "--weights",
                 str(weights), "--out", str(tmp_path / out), "--cache", str(tmp_path / "cache"), *SMALL,
                 *small_for(extra), *extra])


def small_for(extra: tuple[str, ...]) -> list[str]:
    """The small settings of the run's method and inversion (a flag the run would ignore is refused); none with
    a --config, which holds the run's own."""
    given = lambda flag: extra[extra.index(flag) + 1] if flag in extra else None
    if "--config" in extra:
        return []
    method = METHODS.get(given("--method") or "tokenflow")
    inversion = given("--inversion") or (method.inversion if method else None)
    return (["--batch", "2"] if method is METHODS["tokenflow"] else []) + (["--num-bases", "8"] if inversion == "stem"
                                                                          else [])


def stderr_lines(capsys) -> list[str]:
    return [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines()]


@pytest.fixture(scope="module")
def first_run(tiny_root, tiny_clip_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit")
    assert edit(tmp, tiny_root, "run", "--target", "a cat on a hill", "--clip", str(tiny_clip_dir)) == 0
    return tmp


def test_outputs_exist_and_decode(first_run):
    out = first_run / "run"
    names = {p.name for p in out.iterdir()}
    assert {"source.mp4", "edit-01-a-bear-on-a-hill.mp4", "edit-02-a-cat-on-a-hill.mp4", "side_by_side.mp4",
            "config.toml", "metrics.json"} <= names
    source = read_video(out / "source.mp4")
    assert source.shape == (5, 3, 48, 96)  # 512×288 -> 96×54 -> cropped to a multiple of 8
    for name in ("edit-01-a-bear-on-a-hill.mp4", "edit-02-a-cat-on-a-hill.mp4"):
        assert read_video(out / name).shape == source.shape
    assert read_video(out / "side_by_side.mp4").shape == (5, 3, 48, 3 * 96 + 2 * 8)  # three labelled panels, 8 px gaps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 5 and [e["target"] for e in metrics["edits"]] == ["a bear on a hill", "a cat on a hill"]
    assert (metrics["width"], metrics["height"]) == (96, 48) and "size" not in metrics  # labelled, not [H, W]
    assert metrics["scored"].startswith("the frames before encoding")
    assert all(0 < e["consistency"] <= 1 for e in metrics["edits"])
    # CLIP metrics (tiny random CLIP): the source against its caption, each edit against its target and source
    assert set(metrics["source"]["clip"]) == {"clip_score", "frame_accuracy", "clip_consistency"}
    assert metrics["source"]["clip"]["frame_accuracy"] is None
    for e in metrics["edits"]:
        assert 0 <= e["clip"]["frame_accuracy"] <= 1 and -100 <= e["clip"]["clip_score"] <= 100
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["target"] == ["a bear on a hill", "a cat on a hill"] and config["steps"] == 2
    assert config["dtype"] == "fp32" and "out" not in config
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".run")]  # no partial folder left


def test_second_run_reuses_the_inversion(first_run, tiny_root, capsys):
    capsys.readouterr()
    assert edit(first_run, tiny_root, "again", "--target", "a dog on a hill", "--clip", str(first_run / "no")) == 0
    lines = stderr_lines(capsys)
    assert any(line.startswith("inversion: reusing") for line in lines)
    # no CLIP weights: said once, with the way to get them, and the metrics go without CLIP
    notes = [line for line in lines if "CLIP metrics skipped" in line]
    assert len(notes) == 1 and "python -m stemref.download --model clip-vit-large-patch14" in notes[0]
    assert "clip" not in json.loads((first_run / "again" / "metrics.json").read_text())["source"]


def test_damaged_cache_entry_is_recomputed(first_run, tiny_root, capsys):
    entries = list((first_run / "cache" / "inversions").glob("*.safetensors"))
    assert len(entries) == 1
    data = bytearray(entries[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the latents: the header still parses
    entries[0].write_bytes(bytes(data))
    capsys.readouterr()
    assert edit(first_run, tiny_root, "damaged") == 0
    lines = stderr_lines(capsys)
    assert any(line.startswith("inversion: cached as") for line in lines)
    assert not any("reusing" in line for line in lines)
    # an entry without its checksum (a run killed between the two writes) is not trusted either
    entries[0].with_suffix(".sha256").unlink()
    capsys.readouterr()
    assert edit(first_run, tiny_root, "partial") == 0
    assert any(line.startswith("inversion: cached as") for line in stderr_lines(capsys))


def test_cache_entry_of_nan_latents_is_recomputed_with_one_line(first_run, tiny_root, capsys):
    """An entry whose checksum and identity pass but whose latents are NaN: one line naming the problem, then the
    inversion is computed again (not a traceback, nor the "try --dtype fp32" hint of an fp32 run)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    entry = next((first_run / "cache" / "inversions").glob("*.safetensors"))
    with safe_open(str(entry), "pt") as f:
        metadata, latents = f.metadata(), f.get_tensor("latents")
    save_file({"latents": torch.full_like(latents, float("nan"))}, entry, metadata=metadata)
    entry.with_suffix(".sha256").write_text(hashlib.sha256(entry.read_bytes()).hexdigest() + "\n")
    capsys.readouterr()
    assert edit(first_run, tiny_root, "nan-entry") == 0
    lines = stderr_lines(capsys)
    dropped = [line for line in lines if "dropped" in line]
    assert len(dropped) == 1 and "NaN" in dropped[0] and "--dtype" not in dropped[0]
    assert any(line.startswith("inversion: cached as") for line in lines)


def test_config_toml_repeats_the_edit(first_run, tiny_root, tmp_path):
    # float64: in float32 a random-weight UNet is chaotic enough that memory alignment alone moves the result;
    # mkv: lossless, where H.264's rate control may code equal frames differently from one run to the next
    assert edit(tmp_path, tiny_root, "first", "--dtype", "fp64", "--format", "mkv") == 0
    out = tmp_path / "first"
    assert main(["--config", str(out / "config.toml"), "--out", str(tmp_path / "repeat")]) == 0
    assert (out / "config.toml").read_text() == (tmp_path / "repeat" / "config.toml").read_text()
    assert torch.equal(read_video(tmp_path / "repeat" / "edit-01-a-bear-on-a-hill.mkv"),
                       read_video(out / "edit-01-a-bear-on-a-hill.mkv"))
    # command-line flags override the file
    assert main(["--config", str(out / "config.toml"), "--out", str(tmp_path / "other"), "--target", "a fox"]) == 0
    assert tomllib.loads((tmp_path / "other" / "config.toml").read_text())["target"] == ["a fox"]


def test_offline_without_weights_fails_cleanly(tmp_path, capsys):
    assert edit(tmp_path, tmp_path / "missing", "out", "--offline") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m stemref.download --to" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()


class Hub(http.server.BaseHTTPRequestHandler):
    """GET/HEAD /<repo>/resolve/main/<path>: the weights with the hub's LFS headers (size, sha256)."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(False)

    def do_GET(self):
        self.answer(True)

    def answer(self, body: bool):
        path = self.path.split("/resolve/main/", 1)[-1]
        data = self.server.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.served.append((self.command, path))
        self.send_response(200)
        if path.endswith(".safetensors"):  # LFS files: the hub names size and sha256
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@contextmanager
def hub(tiny_root: Path) -> Iterator[str]:
    """A hub on 127.0.0.1 serving the tiny weights as SD1.5's fp16 files; yields its address."""
    files = {p.relative_to(tiny_root).as_posix().replace(".safetensors", ".fp16.safetensors"): p.read_bytes()
             for p in tiny_root.rglob("*") if p.is_file()}
    files["model_index.json"] = b'{"_class_name": "StableDiffusionPipeline"}'
    files["tokenizer/tokenizer_config.json"] = files["tokenizer/special_tokens_map.json"] = b"{}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.files, server.served = files, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_missing_weights_are_downloaded_first(tiny_root, tmp_path, capsys):
    with hub(tiny_root) as url:
        assert edit(tmp_path, tmp_path / "sd15", "out", "--hub-url", url) == 0
    assert "downloading SD1.5" in capsys.readouterr().err
    assert (tmp_path / "sd15" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "out" / "edit-01-a-bear-on-a-hill.mp4").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--target", ""], "--target is empty"),
    (["--width", "128"], "--width and --height go together"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--pnp-attn", "2"], "--pnp-attn is a fraction"),
    (["--scope", "4", "--inversion", "1-frame"], "--scope is a STEM option"),
    (["--inversion", "1-frame", "--num-bases", "4"], "--num-bases is a STEM option"),
    (["--method", "fatezero", "--blend", "keyframes"], "--blend is an option of --method tokenflow; --method "
                                                       "fatezero does not use it"),
    (["--lr", "1e-4"], "--lr is an option of --method tune-a-video and ei2; --method tokenflow does not use it"),
    (["--size", "100"], "--size 100"),
])
def test_bad_settings_fail_before_any_work(tiny_root, tmp_path, capsys, extra, message):
    assert edit(tmp_path, tiny_root, "out", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_bad_config_and_video(tiny_root, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('source = "a"\ntarget = ["b"]\npnp_atn = 0.5\n')
    assert main([str(CLIP), "--config", str(config), "--weights", str(tiny_root), "--out", str(tmp_path / "o")]) == 2
    assert "unknown setting 'pnp_atn'" in capsys.readouterr().err
    config.write_text('source = "a"\ntarget = ["b"]\nsteps = "many"\n')
    assert main([str(CLIP), "--config", str(config), "--weights", str(tiny_root), "--out", str(tmp_path / "o")]) == 2
    assert "steps must be an integer" in capsys.readouterr().err
    assert edit(tmp_path, tiny_root, "o", video=tmp_path / "nothing.mp4") == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["--source", "a", "--target", "b", "--weights", str(tiny_root)]) == 2
    assert "missing a VIDEO" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_example_configs_parse():
    from stemref.cli.edit_settings import read_config

    folder = Path(__file__).parent.parent / "examples" / "configs"
    names = {p.stem for p in folder.glob("*.toml")}
    assert {"mallard", "taylor", "tennis", "woman-running", "bunny"} <= names
    for path in folder.glob("*.toml"):
        settings = read_config(path)
        assert settings["source"] and settings["target"], path
    assert read_config(folder / "bunny.toml")["video"].resolve() == CLIP.resolve()


def test_non_finite_edit_is_refused_not_written(tiny_root, tmp_path, monkeypatch, capsys):
    """An edit that overflows (fp16 NaN) fails in one line before any video is written, for every method."""
    from stemref.edit import tokenflow

    def overflowing(sd, inversion, *args, **kwargs):
        return torch.full_like(inversion.x_T, float("nan"))

    monkeypatch.setattr(tokenflow, "edit_latents", overflowing)
    assert edit(tmp_path, tiny_root, "out", "--no-reuse") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "the edited latents contain" in err and "this run is float32" in err and "--dtype fp32" not in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("flag, inside", [("--config", "config.toml"), ("--clip", "myclip"),
                                          ("--store-dir", "store")])
def test_overwrite_refuses_an_out_that_holds_an_input(first_run, tiny_root, capsys, flag, inside):
    out = first_run / "run"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if inside != "config.toml":
        (out / inside).mkdir()
    extra = [flag, str(out / inside), "--overwrite"] + (["--method", "fatezero"] if flag == "--store-dir" else [])
    assert edit(first_run, tiny_root, "run", *extra) == 2
    err = capsys.readouterr().err
    assert f"contains the input {(out / inside).resolve()}" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in before} == before
    if inside != "config.toml":
        (out / inside).rmdir()


TRICKY = 'a\x7f b\x00c\x1f\x08\t\n\r\x0c "quoted" \\back\\slash\u2028 ünïcödé 🦆 \'single\''


@pytest.mark.parametrize("method", ["tokenflow", "fatezero", "tune-a-video", "ei2"])
def test_config_toml_reads_back_every_string_setting_with_control_characters(tmp_path, method):
    from stemref.cli.edit_methods import METHODS
    from stemref.cli.edit_settings import COMMON, all_options, read_config, to_toml

    s = {o.name: o.default for o in all_options()}
    s["method"] = method
    options = COMMON + METHODS[method].options
    texts = [o for o in options if o.type in (str, list, Path) and o.name != "method"]
    for o in texts:
        s[o.name] = ([TRICKY, TRICKY + "2"] if o.type is list else
                     Path("/", TRICKY, o.name) if o.type is Path else TRICKY)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(s), encoding="utf-8")
    back = read_config(path)
    assert {o.name for o in texts} - {"out"} <= set(back)
    for o in texts:
        if o.name != "out":
            assert back[o.name] == s[o.name], o.name
    # only the options of the method used are written
    others = {o.name for m in METHODS.values() for o in m.options} - {o.name for o in options}
    assert not others & set(back)


def test_refused_before_the_model_loads(monkeypatch):
    """The fixture of the checks below: any of them reached the model load, it fails the test."""
    from stemref.cli import edit as edit_cli

    monkeypatch.setattr(edit_cli, "load_model", lambda *a, **k: pytest.fail("loaded the model for a bad input"))


@pytest.mark.parametrize("extra, message", [
    (["--num-bases", "100000000"], "--num-bases 100000000: a set of 5 frame(s) of 96×48 has 360 tokens in STEM's "
                                   "largest attention layer, so use at most 360 bases"),
    (["--num-bases", "200", "--scope", "2"], "use at most 144 bases"),
    (["--seed", str(2**64)], f"--seed {2**64}: use a whole number from 0 to {2**63 - 1}"),
    (["--seed", "-1"], "--seed -1: use a whole number from 0"),
    (["--fps", "1e-9"], "--fps 1e-09: use a frame rate from 0.01 to 1000"),
    (["--steps", "2.5"], "argument --steps: invalid int value: '2.5'; see python -m stemref.edit --help"),
    (["--method", "fatezero", "--store-dir", "{file}"], "--store-dir {file} is a file"),
    (["--config", "{tmp}"], "--config {tmp} is a folder"),
    (["--config", "{binary}"], "--config {binary} is not a text file"),
    (["--cache", "{file}"], "--cache {file}: {file} is a file, not a folder"),
    (["--cache", "{file}/below"], "--cache {file}/below: {file} is a file, not a folder"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(tiny_root, tmp_path, capsys, monkeypatch, extra, message):
    test_refused_before_the_model_loads(monkeypatch)
    (tmp_path / "file").write_text("a file")
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    names = {"file": tmp_path / "file", "binary": tmp_path / "binary.toml", "tmp": tmp_path}
    extra = [e.format(**names) for e in extra]
    with pytest.raises(SystemExit) if "--steps" in extra else nullcontext() as exiting:
        code = edit(tmp_path, tiny_root, "out", *extra)
    if exiting is not None:
        code = exiting.value.code
    lines = stderr_lines(capsys)  # a progress line of reading the video may come first
    assert code == 2 and [line for line in lines if "error" in line] == lines[-1:], lines
    assert lines[-1].startswith("error: ") and message.format(**names) in lines[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_read_only_or_full_cache_is_said_before_any_work_and_its_entries_are_still_reused(tiny_root, tmp_path,
                                                                                             capsys, monkeypatch):
    """A cache that takes no new file is no reason to refuse a run: an entry already there is reused, and a new
    one is skipped (with a warning, the result kept); the user hears of it before the work, not after."""
    import errno

    from stemref.cli import checks, edit as edit_cli

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def loading(*args, **kwargs):
        print("LOADING", file=sys.stderr)
        return real_load(*args, **kwargs)

    real_load = edit_cli.load_model
    monkeypatch.setattr(edit_cli, "load_model", loading)
    assert edit(tmp_path, tiny_root, "first") == 0  # its inversion is now in the cache
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(checks.tempfile, "TemporaryFile", read_only)
        assert edit(tmp_path, tiny_root, "read-only") == 0
    lines = stderr_lines(capsys)
    warning = next(i for i, line in enumerate(lines) if "(read-only file system); entries already there are reused"
                   in line)
    assert lines[warning].startswith("warning: --cache ") and warning < lines.index("LOADING")
    assert any(line.startswith("inversion: reusing ") for line in lines)
    with monkeypatch.context() as patch:
        patch.setattr(checks.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10_000})())
        assert edit(tmp_path, tiny_root, "full") == 0
    lines = stderr_lines(capsys)
    # x_0 … x_T of 5 frames of 96×48 (12×6 latents, 4 channels) in float32: 3 × 5 × 4 × 12 × 6 × 4 bytes
    warning = lines.index(next(line for line in lines if "the disk has 10 kB free and this run's inversion needs "
                               "about 17 kB; a new entry will not be cached" in line))
    assert warning < lines.index("LOADING") and any(line.startswith("inversion: reusing ") for line in lines)
    assert (tmp_path / "read-only" / "metrics.json").is_file() and (tmp_path / "full" / "metrics.json").is_file()


def test_an_over_long_negative_prompt_names_its_flag(tiny_root, tmp_path, capsys):
    assert edit(tmp_path, tiny_root, "out", "--negative", "blurry " * 100) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("error: --negative: prompt is 100 tokens long; CLIP reads at most 75")
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_the_video_is_refused_not_read(tiny_root, tmp_path, capsys):
    fifo = tmp_path / "video.mp4"
    os.mkfifo(fifo)
    assert edit(tmp_path, tiny_root, "out", video=fifo) == 2
    assert f"VIDEO {fifo} is not a regular file or a folder" in capsys.readouterr().err


def test_a_network_error_names_the_hub_url_flag(tmp_path, capsys):
    assert edit(tmp_path, tmp_path / "sd15", "out", "--hub-url", "http://127.0.0.1:9") == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert "--hub-url" in line and "--base-url" not in line


@pytest.mark.parametrize("in_file, flags, expected", [
    ("width = 512\nheight = 512\n", ["--size", "64"], {"size": 64, "width": None, "height": None}),
    ("size = 256\nsquare = true\n", ["--width", "128", "--height", "64"],
     {"width": 128, "height": 64, "square": False, "size": 512}),
    ("width = 512\nheight = 512\n", ["--square"], {"square": True, "width": None, "size": 512}),
    ("width = 512\nheight = 256\n", ["--steps", "3"], {"width": 512, "height": 256}),  # no geometry flag: the file's
    ("width = 128\nheight = 96\n", ["--no-square"], {"width": 128, "height": 96, "square": False}),  # fits both ways
])
def test_a_geometry_flag_wins_over_the_files_other_way(tmp_path, in_file, flags, expected):
    from stemref.cli.edit import build_parser, resolve_settings

    config = tmp_path / "c.toml"
    config.write_text(f'source = "a"\ntarget = ["b"]\n{in_file}')
    s = resolve_settings(build_parser(), [str(CLIP), "--config", str(config), *flags])
    assert {name: s[name] for name in expected} == expected


def test_a_failed_first_download_resumes_on_the_next_run(tiny_root, tmp_path, capsys):
    from stemref.cli import txt2img as txt2img_cli

    weights = tmp_path / "sd15"
    assert edit(tmp_path, weights, "out", "--hub-url", "http://127.0.0.1:9") == 1  # no network
    assert weights.is_dir()  # what the failed download left
    capsys.readouterr()
    assert edit(tmp_path, weights, "out", "--offline") == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert f"{weights} holds an unfinished download" in line and "without --offline" in line
    assert txt2img_cli.main(["--weights", str(weights), "--prompt", "a fox", "--out", str(tmp_path / "a.png")]) == 2
    assert f"python -m stemref.download --to {weights}" in capsys.readouterr().err
    with hub(tiny_root) as url:
        assert edit(tmp_path, weights, "out", "--hub-url", url) == 0
    assert f"{weights} holds an unfinished download: finishing SD1.5" in capsys.readouterr().err
    assert sorted(p.name for p in weights.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                         "tokenizer", "unet", "vae"]


def test_fatezero_progress_says_it_counts_inversion_and_edit_steps(tiny_root, tmp_path, capsys):
    assert edit(tmp_path, tiny_root, "out", "--method", "fatezero", "--store-memory", "0", "--frames", "2",
                "--no-reuse") == 0
    lines = [line for line in stderr_lines(capsys) if line.startswith("FateZero:")]
    assert lines[-1].startswith("FateZero: a bear on a hill (inversion + edit): 4/4 steps")  # --steps 2
