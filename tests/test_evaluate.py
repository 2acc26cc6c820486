"""`python -m stemref.evaluate` in-process on the tiny CLIP: the numbers are those of transformers' CLIP and
image processor with numpy scores on the same frames, and bad input exits 2 with one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stemref.cli import evaluate as evaluate_cli
from stemref.tokenizer import CLIPTokenizer
from stemref.video import read_video, write_video
from test_clip import reference_pixels
from test_clip_metrics import reference_clip_score, reference_consistency, reference_frame_accuracy

ROOT = Path(__file__).resolve().parents[1]
PROMPT, SOURCE_PROMPT = "a watercolor painting of a swan", "a swan on a lake"


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, Path]:
    """An edited video of 4 frames (48×40) and its 7-frame source (64×56), lossless."""
    folder = tmp_path_factory.mktemp("videos")
    g = torch.Generator().manual_seed(0)
    edited = write_video(folder / "edited.mkv", torch.rand(4, 3, 40, 48, generator=g))
    source = write_video(folder / "source.mkv", torch.rand(7, 3, 56, 64, generator=g))
    return edited, source


def evaluate(*argv) -> int:
    return evaluate_cli.main([*map(str, argv), "--device", "cpu"])


def test_json_scores_equal_transformers_and_numpy(videos, tiny_clip_dir, tiny_clip_reference, capsys):
    edited, source = videos
    code = evaluate(edited, "--source-video", source, "--prompt", PROMPT, "--source-prompt", SOURCE_PROMPT,
                    "--clip", tiny_clip_dir, "--json", "--start", 2, "--stride", 1)
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"clip_score", "frame_accuracy", "clip_consistency", "source_clip_consistency"}
    ids = CLIPTokenizer.openai()([PROMPT, SOURCE_PROMPT])
    with torch.no_grad():
        def embed(frames):
            return tiny_clip_reference.get_image_features(pixel_values=reference_pixels(frames, 30).double()).pooler_output.numpy()
        edited_embeds = embed(read_video(edited))
        source_embeds = embed(read_video(source, start=2, count=4))
        target, source_text = tiny_clip_reference.get_text_features(input_ids=ids).pooler_output.numpy()
    assert scores["clip_score"] == pytest.approx(reference_clip_score(edited_embeds, target), abs=1e-4)
    assert scores["frame_accuracy"] == reference_frame_accuracy(edited_embeds, target, source_text)
    assert scores["clip_consistency"] == pytest.approx(reference_consistency(edited_embeds), abs=1e-6)
    assert scores["source_clip_consistency"] == pytest.approx(reference_consistency(source_embeds), abs=1e-6)


def test_table(videos, tiny_clip_dir, capsys):
    edited, source = videos
    assert evaluate(edited, "--source-video", source, "--prompt", PROMPT, "--source-prompt", SOURCE_PROMPT,
                    "--clip", tiny_clip_dir, "--frames", 3) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"CLIP metrics ({tiny_clip_dir}, 3 frames)"
    assert [line.split()[0] for line in lines[2:]] == ["CLIP", "frame", "CLIP"]
    assert lines[3].split()[-1] == "–"  # frame accuracy has no source column


@pytest.mark.parametrize("extra, message", [
    (["--clip", "{missing}"], "no CLIP at .*missing config.json and model.safetensors.*python -m stemref.download --model clip-vit-large-patch14"),
    (["--start", "4"], "has 4 frames but .*source.mkv has only 3 from frame 4 with stride 1; pass the --start/--stride"),
    (["--stride", "3"], "has only 3 from frame 0 with stride 3"),
    (["--source-prompt", PROMPT], "same text"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--source-video", "{missing}/video.mp4"], "no such file"),
])
def test_bad_input_exits_2_with_one_line(videos, tiny_clip_dir, tmp_path, capsys, extra, message):
    edited, source = videos
    argv = [edited, "--source-video", source, "--prompt", PROMPT, "--source-prompt", SOURCE_PROMPT,
            "--clip", tiny_clip_dir] + [a.format(missing=tmp_path / "nothing") for a in extra]
    assert evaluate(*argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert re.search(message, err)


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "stemref.evaluate", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--source-prompt" in result.stdout


def test_an_854x480_video_is_scored_as_stored(tiny_clip_dir, tiny_clip_reference, tmp_path, capsys):
    """No crop to a multiple of 8 (854 -> 848): the scores are transformers' CLIP on all 854×480 pixels."""
    g = torch.Generator().manual_seed(3)
    edited_frames, source_frames = torch.rand(2, 3, 480, 854, generator=g), torch.rand(2, 3, 480, 854, generator=g)
    edited = write_video(tmp_path / "edited.mkv", edited_frames)  # lossless: reads back as the 8-bit frames
    source = write_video(tmp_path / "source.mkv", source_frames)
    assert evaluate(edited, "--source-video", source, "--prompt", PROMPT, "--source-prompt", SOURCE_PROMPT,
                    "--clip", tiny_clip_dir, "--json") == 0
    scores = json.loads(capsys.readouterr().out)
    ids = CLIPTokenizer.openai()([PROMPT, SOURCE_PROMPT])
    with torch.no_grad():
        def embed(frames):  # reference_pixels rounds the frames to 8 bits, as the mkv stores them
            return tiny_clip_reference.get_image_features(pixel_values=reference_pixels(frames, 30).double()).pooler_output.numpy()
        target, source_text = tiny_clip_reference.get_text_features(input_ids=ids).pooler_output.numpy()
        edited_embeds, source_embeds = embed(edited_frames), embed(source_frames)
    assert scores["clip_score"] == pytest.approx(reference_clip_score(edited_embeds, target), abs=1e-4)
    assert scores["clip_consistency"] == pytest.approx(reference_consistency(edited_embeds), abs=1e-6)
    assert scores["source_clip_consistency"] == pytest.approx(reference_consistency(source_embeds), abs=1e-6)
    assert read_video(edited, as_stored=True).shape == (2, 3, 480, 854)
