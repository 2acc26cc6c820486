"""`python -m stemref.edit --method tune-a-video|ei2` end to end on the shipped clip with the tiny model.

The tuning is cached like the inversion (keyed by the frames, prompt, method, options, steps, lr, seed and
weights); a second edit of the same clip reuses both; bad combinations fail with one line and exit code 2.
"""
from __future__ import annotations

import json
import tomllib

import pytest

from test_edit_cli import edit, stderr_lines

TUNE = ["--tune-steps", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def tuned_run(tiny_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuned")
    assert edit(tmp, tiny_root, "tav", "--method", "tune-a-video", *TUNE, "--clip", str(tmp / "no-clip")) == 0
    return tmp


def test_tune_a_video_writes_the_edit_and_its_settings(tuned_run):
    out = tuned_run / "tav"
    assert {"source.mp4", "edit-01-a-bear-on-a-hill.mp4", "side_by_side.mp4"} <= {p.name for p in out.iterdir()}
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["method"] == "tune-a-video" and config["tune_steps"] == 2 and config["lr"] == 1e-3
    assert config["inversion"] == "model" and config["guidance"] == 12.5 and config["temporal_bias"] == "random"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "tune-a-video" and metrics["seconds"]["tuning"] > 0
    assert len(list((tuned_run / "cache" / "tuned").glob("*.safetensors"))) == 1


def test_second_edit_reuses_tuning_and_inversion(tuned_run, tiny_root, capsys):
    capsys.readouterr()
    assert edit(tuned_run, tiny_root, "again", "--method", "tune-a-video", *TUNE, "--target", "a fox",
                "--clip", str(tuned_run / "no-clip")) == 0
    lines = stderr_lines(capsys)
    assert any(line.startswith("tuning: reusing") for line in lines)
    assert any(line.startswith("inversion: reusing") for line in lines)
    # another learning rate is another tuning
    capsys.readouterr()
    assert edit(tuned_run, tiny_root, "other-lr", "--method", "tune-a-video", "--tune-steps", "2", "--lr", "2e-3",
                "--clip", str(tuned_run / "no-clip")) == 0
    assert any(line.startswith("tuning: cached as") for line in stderr_lines(capsys))


def test_ei2_with_stem_inversion_and_its_options(tiny_root, tmp_path):
    assert edit(tmp_path, tiny_root, "ei2", "--method", "ei2", *TUNE, "--inversion", "stem", "--ffam-r", "1",
                "--spectral-norm", "exact", "--clip", str(tmp_path / "no-clip")) == 0
    config = tomllib.loads((tmp_path / "ei2" / "config.toml").read_text())
    assert (config["method"], config["inversion"], config["ffam_r"], config["spectral_norm"], config["guidance"]) == \
           ("ei2", "stem", 1, "exact", 7.5)


def test_ei2_ablation_options_are_flags_keys_and_cache_keys(tiny_root, tmp_path, capsys):
    """EI²'s variants are flags and TOML keys, written to config.toml; the tuning cache tells them apart."""
    variant = ["--temporal-norm", "layernorm", "--spectral-norm", "off", "--frame-attention", "sparse-causal",
               "--stam-position", "after-cross", "--resnet-norm", "frame", "--stam-heads", "single"]
    no_clip = ["--clip", str(tmp_path / "no-clip")]
    assert edit(tmp_path, tiny_root, "a", "--method", "ei2", *TUNE, *variant, *no_clip) == 0
    config = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert {k: config[k] for k in ("temporal_norm", "spectral_norm", "frame_attention", "stam_position",
                                   "resnet_norm", "stam_heads")} == \
           {"temporal_norm": "layernorm", "spectral_norm": "off", "frame_attention": "sparse-causal",
            "stam_position": "after-cross", "resnet_norm": "frame", "stam_heads": "single"}
    capsys.readouterr()
    assert edit(tmp_path, tiny_root, "b", "--config", str(tmp_path / "a" / "config.toml"), "--out",
                str(tmp_path / "b")) == 0
    assert any(line.startswith("tuning: reusing") for line in stderr_lines(capsys))
    for flag, value in (("--temporal-norm", "instancenorm"), ("--stam-heads", "multi")):
        other = [*variant, flag, value]
        assert edit(tmp_path, tiny_root, f"c{value}", "--method", "ei2", *TUNE, *other, *no_clip) == 0
        assert any(line.startswith("tuning: cached as") for line in stderr_lines(capsys))
    assert len(list((tmp_path / "cache" / "tuned").glob("*.safetensors"))) == 3


@pytest.mark.parametrize("extra, message", [
    (["--inversion", "model"], "--inversion model does not go with --method tokenflow"),
    (["--method", "ei2", "--inversion", "2-frame"], "--inversion 2-frame does not go with --method ei2"),
    (["--method", "tune-a-video", "--lr", "2"], "--lr 2.0: a learning rate"),
    (["--method", "ei2", "--tune-steps", "0"], "--tune-steps must be at least 1"),
    (["--method", "ei2", "--ffam-r", "0"], "--ffam-r must be at least 1"),
    (["--method", "ei2", "--temporal-norm", "none", "--stam-centring", "channels"], "it needs norm='centering'"),
])
def test_bad_settings_fail_before_any_work(tiny_root, tmp_path, capsys, extra, message):
    assert edit(tmp_path, tiny_root, "out", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, expected", [
    ("ei2-paper", dict(method="ei2", frames=8, width=512, height=512, tune_steps=500, lr=3e-5, guidance=7.5,
                       steps=50, inversion="model")),
    ("tune-a-video-paper", dict(method="tune-a-video", frames=32, width=512, height=512, tune_steps=500, lr=3e-5,
                                guidance=12.5, steps=50, inversion="model")),
])
def test_paper_configs(name, expected):
    """The papers' settings (numbers written here from the papers), the method's own model (the defaults), and
    frames resized to 512×512 without a crop: the whole (wide) source frame, squeezed."""
    from pathlib import Path

    import torch

    from stemref.cli.edit import build_parser, read_frames, resolve_settings
    from stemref.edit.tuning import METHODS
    from stemref.video import read_video

    config = Path(__file__).parent.parent / "examples" / "configs" / f"{name}.toml"
    s = resolve_settings(build_parser(), ["--config", str(config)])
    assert {k: s[k] for k in expected} == expected
    assert {k: s[k] for k in METHODS[s["method"]]} == METHODS[s["method"]]
    frames = read_frames({**s, "frames": 2}).frames
    assert frames.shape == (2, 3, 512, 512)
    wide = read_video(s["video"], 0, 1, 2, None)  # (2, 3, 288, 512): the source frames unchanged
    squeezed = torch.nn.functional.interpolate(frames, size=wide.shape[-2:], mode="area")
    assert (squeezed - wide).abs().mean() < 0.02  # a crop would have lost the sides
