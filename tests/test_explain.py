"""stemref.explain: the recorder changes nothing and keeps what the methods computed; the pictures are right.

Recording runs in float64 with the tiny model; each recorded quantity is checked against an independent
computation written here (softmax responsibilities, eigen-decomposition PCA, metrics.temporal_consistency)
or an invariant (a keyframe matches itself, maps are probabilities).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch

from stemref.attention import AttnCall, RunInfo
from stemref.context import EMAttention
from stemref.edit import fatezero, tokenflow
from stemref.em import em_bases
from stemref.explain import (Recorder, basis_frames, correspondence_frames, fatezero_pictures, fatezero_recorders,
                             inversion_recorder, keyframe_chart, level_layers, line_plot, palette, pca_rgb,
                             position_colours, tokenflow_recorder, tuning_pictures)
from stemref.inversion import invert, replay
from stemref.metrics import temporal_consistency

STEPS = 3


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 64, 64, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def recorded(tiny_sd, frames):
    rec = inversion_recorder(tiny_sd.unet, STEPS)
    inv = invert(tiny_sd, frames, "a rabbit", STEPS, "stem", recorder=rec, num_bases=8)
    return inv, rec


def test_recording_changes_nothing(tiny_sd, frames, recorded):
    inv, rec = recorded
    plain = invert(tiny_sd, frames, "a rabbit", STEPS, "stem", num_bases=8)
    assert torch.equal(plain.latents, inv.latents)
    table = [[0, 2], [1, 3], [1, 2]]
    edited = tokenflow.edit_latents(tiny_sd, inv, "a bear", batch=2, keyframes=table,
                                    recorder=tokenflow_recorder(tiny_sd.unet, STEPS))
    assert torch.equal(edited, tokenflow.edit_latents(tiny_sd, inv, "a bear", batch=2, keyframes=table))


def test_inversion_records_features_bases_and_similarity(tiny_sd, recorded):
    _, rec = recorded
    assert sorted(rec.similarity) == list(range(STEPS))
    assert rec.features.shape[:2] == (4, 32) and rec.feature_step == STEPS // 2
    # the similarity of the PCA step is metrics' temporal consistency of the same features
    assert rec.similarity[rec.feature_step] == pytest.approx(temporal_consistency(rec.features), abs=1e-6)
    assert set(rec.assignments) == set(rec.bases_layers) and len(rec.bases_layers) == 2
    for labels in rec.assignments.values():
        assert labels.shape[:2] == (4, 8) and 0 <= labels.min() and labels.max() < 8


def test_bases_are_the_argmax_responsibilities():
    """EMAttention hands out its keys and bases; the recorded basis of every token is the argmax of the E-step,
    recomputed here from an EM with the same seed."""
    g = torch.Generator().manual_seed(1)
    F_, h, N, d, K = 3, 2, 12, 4, 5
    q, k, v = (torch.randn(F_, h, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    rec = Recorder(feature_layer=None, bases_layers=("layer",), bases_step=0)
    call = AttnCall("layer", False, RunInfo(frames=F_, step=0, hw=(3, 4), recorder=rec))
    EMAttention(num_bases=K, generator=torch.Generator().manual_seed(7))(q, k, v, call)
    keys = k.permute(1, 0, 2, 3).reshape(h, F_ * N, d)  # (h, F·N, d)
    mu, _ = em_bases(keys, keys, K, generator=torch.Generator().manual_seed(7))
    unit = mu / (mu.norm(dim=-1, keepdim=True) + 1e-4)
    z = torch.softmax(keys @ unit.transpose(-1, -2) / 0.01, dim=-1)  # (h, F·N, K)
    expected = z.argmax(-1).view(h, F_, 3, 4).transpose(0, 1)  # (F, h, 3, 4)
    assert torch.equal(rec.assignments["layer"], expected)


def test_similarity_is_the_same_when_a_step_is_split_across_calls(tiny_sd, frames):
    """The 1-frame context may run a step's frames in several UNet calls; the recorder joins them."""
    whole, split = (Recorder(feature_step=0) for _ in range(2))
    invert(tiny_sd, frames, "a rabbit", 2, "1-frame", recorder=whole)
    invert(tiny_sd, frames, "a rabbit", 2, "1-frame", batch=3, recorder=split)
    assert split.similarity == pytest.approx(whole.similarity, abs=1e-12)
    assert torch.allclose(split.features, whole.features, atol=1e-12)


def test_replay_records_the_same_features(tiny_sd, frames):
    """A reused inversion recorded nothing; replaying a step gives that step's features (a deterministic context:
    STEM would redraw its random bases)."""
    rec = Recorder(feature_step=1)
    inv = invert(tiny_sd, frames, "a rabbit", 2, "2-frame", recorder=rec)
    again = Recorder(feature_step=1)
    replay(tiny_sd, inv, [1], again)
    assert torch.equal(again.features, rec.features) and again.similarity == {1: rec.similarity[1]}


def test_tokenflow_keyframes_and_matches(tiny_sd, recorded):
    inv, _ = recorded
    table = [[1, 2], [0, 3], [1, 3]]
    rec = tokenflow_recorder(tiny_sd.unet, STEPS)
    tokenflow.edit_latents(tiny_sd, inv, "a bear", batch=2, keyframes=table, recorder=rec)
    assert rec.chosen_keyframes == dict(enumerate(table)) and [list(r) for r in rec.batches] == [[0, 1], [2, 3]]
    h, w = rec.match_grid
    step_keys = table[rec.match_step]
    for b, keyframe in enumerate(step_keys):
        own = rec.matches[b][keyframe - 2 * b]  # a keyframe's source tokens are the keyframe's own
        assert torch.equal(own.flatten(), torch.arange(h * w))
        colours = correspondence_frames(rec.matches[b], (h, w))
        assert torch.equal(colours[keyframe - 2 * b], position_colours(h, w))


def test_fatezero_word_maps_and_blend_mask(tiny_sd, frames):
    source, edit = fatezero_recorders(tiny_sd.unet, tiny_sd.tokenizer, "a rabbit on a hill", "a bear on a hill")
    plain = fatezero.edit_latents(tiny_sd, frames, "a rabbit on a hill", "a bear on a hill", steps=2,
                                  context="1-frame", blend_words=(["rabbit"], ["bear"]), blend_self_attention=True)
    latents = fatezero.edit_latents(tiny_sd, frames, "a rabbit on a hill", "a bear on a hill", steps=2,
                                    context="1-frame", blend_words=(["rabbit"], ["bear"]), blend_self_attention=True,
                                    recorder=edit, source_recorder=source)
    assert torch.equal(plain, latents)
    for rec in (source, edit):
        assert sorted(rec.word_maps) == [0, 1]
        maps = rec.word_maps[0]  # (F, L', h', w'): start token and the prompt's 5 tokens
        assert maps.shape[:2] == (4, 6) and maps.min() >= 0 and maps.sum(1).max() <= 1 + 1e-9
    assert edit.masks and all(m.dtype == torch.bool and m.shape == (4, 1, 8, 8) for m in edit.masks.values())
    pictures = fatezero_pictures(source, edit, tiny_sd.tokenizer, "a rabbit on a hill", "a bear on a hill", frames)
    assert [p.name for p in pictures] == ["words-source", "words-edit", "blend-mask"]
    assert all(p.image.shape[0] == 3 and 0 <= p.image.min() and p.image.max() <= 1 for p in pictures)
    # each word's row is labelled on its first frame: the label's shaded box has colours the heat map never
    # draws (its green rises only once its red is full), and only there
    image = pictures[0].image  # 5 word rows × 4 frame columns of equal cells, 2-pixel gaps
    h, w = (image.shape[1] + 2) // 5, (image.shape[2] + 2) // 4
    off_map = (image[0] < 0.99) & (image[1] > 0.01)  # (H, W)
    for r in range(5):
        cells = [off_map[r * h: r * h + h - 2, c * w: c * w + w - 2] for c in range(4)]
        assert cells[0].any() and not any(cell.any() for cell in cells[1:])


def test_tuning_loss_curve():
    (picture,) = tuning_pictures([0.5, 0.4, 0.45, 0.3], "ei2")
    lines = [e for e in ET.fromstring(picture.svg).iter() if e.tag == "polyline"]
    assert [len(e.get("points").split()) for e in lines] == [4]  # too few steps for a running mean
    losses = [1.0, 0.0] * 20  # 40 steps: a running mean of 2, which is 0.5 from the second step on
    (picture,) = tuning_pictures(losses, "ei2")
    lines = [e for e in ET.fromstring(picture.svg).iter() if e.tag == "polyline"]
    assert [len(e.get("points").split()) for e in lines] == [40, 40] and "mean of 2" in picture.svg
    heights = {float(point.split(",")[1]) for point in lines[1].get("points").split()[1:]}
    assert len(heights) == 1  # flat at 0.5
    assert tuning_pictures([], "ei2") == []


def test_pca_rgb_matches_a_singular_value_decomposition():
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([5., 3, 2, 1, .5, .1], dtype=torch.float64).view(1, 6, 1, 1)
    features = torch.randn(3, 6, 5, 4, generator=g, dtype=torch.float64) * scale
    tokens = features.permute(0, 2, 3, 1).reshape(-1, 6)
    centred = tokens - tokens.mean(0)
    axes = torch.linalg.svd(centred, full_matrices=False).Vh[:3].T  # (6, 3): the three largest
    axes = axes * torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    scores = centred @ axes
    expected = (scores - scores.min(0).values) / (scores.max(0).values - scores.min(0).values)
    rgb = pca_rgb(features)
    assert rgb.shape == (3, 3, 5, 4)
    assert torch.allclose(rgb.permute(0, 2, 3, 1).reshape(-1, 3), expected.float(), atol=1e-5)


def test_basis_colours_are_fixed_and_distinct():
    colours = palette(256)
    assert torch.equal(colours, palette(256)) and len(torch.unique(colours, dim=0)) == 256
    labels = torch.tensor([[[0, 5], [5, 255]]])
    picture = basis_frames(labels, 256)
    assert picture.shape == (1, 3, 2, 2) and torch.equal(picture[0, :, 0, 1], picture[0, :, 1, 0])
    with pytest.raises(ValueError, match="lie in"):
        basis_frames(labels, 8)


def test_level_layers(tiny_sd):
    assert level_layers(tiny_sd.unet, 2)[-1] == "up_blocks.1.attentions.2.transformer_blocks.0.attn1"
    assert all(n.startswith(("down_blocks.1.", "up_blocks.2.")) for n in level_layers(tiny_sd.unet, 1, "attn2"))


def test_plots_are_valid_svg():
    svg = line_plot({"a": [(0, 1.0), (1, 2.0), (2, 1.5)], "b": [(0, 0.5)]}, "t", "x", "y")
    root = ET.fromstring(svg)
    lines = [e for e in root.iter() if e.tag == "polyline"]
    assert len(lines) == 2 and len(lines[0].get("points").split()) == 3
    chart = ET.fromstring(keyframe_chart({0: [1, 2], 1: [0, 3]}, 4, [range(0, 2), range(2, 4)]))
    marks = [e for e in chart.iter() if e.tag == "rect" and e.get("fill") == "#d62728"]
    assert len(marks) == 4
    assert "http" not in svg and "http" not in ET.tostring(chart, encoding="unicode")


def test_edit_with_a_cached_inversion_replays_one_step_only_with_explain(tiny_root, tmp_path, capsys):
    """A reused inversion recorded nothing: its pictures are left out (said once), or --explain replays a step."""
    from pathlib import Path

    from stemref.cli.edit import main

    clip = Path(__file__).parent.parent / "examples" / "bunny.mp4"
    args = [str(clip), "--source", "a rabbit", "--target", "a bear", "--weights", str(tiny_root), "--cache",
            str(tmp_path / "cache"), "--frames", "3", "--size", "64", "--steps", "2", "--batch", "2", "--num-bases", "4"]
    runs = {name: tmp_path / name for name in ("first", "cached", "explained")}
    assert main([*args, "--out", str(runs["first"])]) == 0
    assert main([*args, "--out", str(runs["cached"])]) == 0
    assert "its pictures are left out; --explain replays one step" in capsys.readouterr().err
    assert main([*args, "--out", str(runs["explained"]), "--explain"]) == 0
    pictures = {name: sorted(p.name for p in (out / "explain").iterdir()) for name, out in runs.items()}
    assert "features-pca.png" in pictures["first"] and "features-pca.png" not in pictures["cached"]
    assert "--explain replays one step" in (runs["cached"] / "index.html").read_text()  # the page says why
    assert "--explain" not in (runs["explained"] / "index.html").read_text().split("<h2>Settings</h2>")[0]
    assert pictures["explained"] == pictures["first"]
    metrics = json.loads((runs["explained"] / "metrics.json").read_text())
    assert metrics["seconds"]["explain"] > 0 and "explain" not in json.loads(
        (runs["cached"] / "metrics.json").read_text())["seconds"]
