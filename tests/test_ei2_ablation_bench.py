"""bench/ei2_ablation.py on the shipped clip with the tiny model and tiny CLIP: 2 tuning steps, 2 frames.

Figure 6 then Figure 5: every variant is tuned, edited and scored; Figure 5's "FFAM r=2" is EI² itself, which
Figure 6 already tuned, so the second grid reuses that tuning from the cache.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path


from stemref.video import read_video
from test_edit_cli import CLIP, stderr_lines

ROOT = Path(__file__).parent.parent
SIDE = 64
SMALL = ["--frames", "2", "--width", str(SIDE), "--height", str(SIDE), "--steps", "2", "--tune-steps", "2",
         "--lr", "1e-3"]


def bench():
    spec = importlib.util.spec_from_file_location("ei2_ablation", ROOT / "bench" / "ei2_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_grid(tiny_root, tiny_clip_dir, tmp_path, capsys):
    ablation = bench()
    common = [str(CLIP), "--source", "a rabbit on a hill", "--target", "a bear on a hill", "--weights",
              str(tiny_root), "--cache", str(tmp_path / "cache"), "--clip", str(tiny_clip_dir), "--offline", *SMALL]
    assert ablation.main([*common, "--figure", "6", "--out", str(tmp_path / "fig6")]) == 0
    results = json.loads((tmp_path / "fig6" / "results.json").read_text())
    labels = [label for label, _ in ablation.FIGURES[6]]
    assert [r["variant"] for r in results["variants"]] == labels
    assert [r["options"]["stam_position"] for r in results["variants"]] == ["before-cross", "after-cross", "after-ff"]
    for row in results["variants"]:
        assert not row["tuning_reused"] and row["tuning_seconds"] > 0 and row["tuning_peak_memory_bytes"] > 0
        assert 0 <= row["frame_accuracy"] <= 1 and -100 <= row["clip_score"] <= 100
        assert -1 <= row["clip_consistency"] <= 1
        edited = read_video(tmp_path / "fig6" / row["file"])
        assert edited.shape == (2, 3, SIDE, SIDE)
    grid = read_video(tmp_path / "fig6" / "grid.mp4")
    assert grid.shape[0] == 2 and grid.shape[-1] == 4 * SIDE and grid.shape[-2] > SIDE  # source + 3, label band
    band = grid[0, :, : grid.shape[-2] - SIDE]  # labels: dark text on white
    assert band.mean() > 0.7 and band.min() < 0.3
    table = (tmp_path / "fig6" / "table.md").read_text()
    assert all(f"| {label} |" in table for label in labels) and "| source |" in table
    edits = [read_video(tmp_path / "fig6" / r["file"]) for r in results["variants"]]
    assert (edits[0] - edits[1]).abs().max() > 0.01  # the variants are different models

    capsys.readouterr()
    assert ablation.main([*common, "--figure", "5", "--out", str(tmp_path / "fig5")]) == 0
    reuse = [line for line in stderr_lines(capsys) if line.startswith("tuning: reusing")]
    rows = json.loads((tmp_path / "fig5" / "results.json").read_text())["variants"]
    assert len(reuse) == 1 and [r["tuning_reused"] for r in rows] == [False, True, False]
    assert rows[1]["tuning_seconds"] is None and "| FFAM r=2 |" in (tmp_path / "fig5" / "table.md").read_text()
    assert rows[1]["final_loss"] == results["variants"][0]["final_loss"]


def test_bad_input_fails_before_any_work(tiny_root, tmp_path, capsys):
    ablation = bench()
    common = [str(CLIP), "--source", "a rabbit", "--weights", str(tiny_root), "--cache", str(tmp_path / "cache")]
    assert ablation.main([*common, "--target", "a", "--target", "b", "--figure", "4", "--out",
                          str(tmp_path / "o")]) == 2
    assert "give one --target" in capsys.readouterr().err
    assert ablation.main([*common, "--target", "a", "--figure", "5", "--ffam-r", "0", "--out",
                          str(tmp_path / "o")]) == 2
    assert "--ffam-r must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()

