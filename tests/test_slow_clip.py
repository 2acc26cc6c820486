"""Full-size CLIP parity (`pytest -m slow`): OpenAI's ViT-L/14 and ViT-B/32 shapes with random weights.

Each model is built by transformers with the hub's configuration of openai/clip-vit-large-patch14 or
openai/clip-vit-base-patch32, perturbed, and written as the hub holds it (position_ids buffers in the
weights, the tower sizes repeated in text_config_dict / vision_config_dict). transformers computes its text
and image features and logits in float64 from the real-frame pixels of its own image processor, the model
is freed, and then stemref loads the folder: one model in memory at a time (ViT-L/14: 1.7 GB in float32,
3.4 GB in float64).
Measured (`/usr/bin/time -v`, 2 CPU cores shared with other work): 8 min wall (ViT-L/14 6.4, ViT-B/32 1.7),
3 min of CPU time, peak RSS 5.5 GiB. Features, hidden states and pooled outputs were equal to the bit;
normalised embeddings differed by at most 1e-16 and logits by 7e-16.
"""
from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import perturb
from stemref.loading import load_clip
from stemref.tokenizer import CLIPTokenizer
from test_clip import PROMPTS, real_frames, reference_pixels

pytestmark = pytest.mark.slow

# The hub configs' tower sizes (everything else is transformers' default); patch 14 vs 32 is the ViT-L/ViT-B split.
HUB = {
    "clip-vit-large-patch14": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14),
        projection_dim=768),
    "clip-vit-base-patch32": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        vision=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=32),
        projection_dim=512),
}


@pytest.mark.parametrize("name", HUB)
def test_full_size_clip_matches_transformers(name, tmp_path, record_property):
    from transformers import CLIPConfig, CLIPModel

    hub = HUB[name]
    torch.manual_seed(0)
    model = perturb(CLIPModel(CLIPConfig(text_config=hub["text"], vision_config=hub["vision"],
                                         projection_dim=hub["projection_dim"])), 5).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config_dict"], config["vision_config_dict"] = hub["text"], hub["vision"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    sd = load_file(tmp_path / "model.safetensors")
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange((224 // hub["vision"]["patch_size"]) ** 2 + 1)[None]
    save_file(sd, tmp_path / "model.safetensors")
    del sd

    _, frames = real_frames()[0]  # 640x272 bikes frames
    pixels = reference_pixels(frames).double()  # (3, 3, 224, 224), transformers' preprocessing
    model = model.double()
    with torch.no_grad():
        ids = CLIPTokenizer.openai()(PROMPTS)
        theirs = model(input_ids=ids, pixel_values=pixels)
        expected = {"text": theirs.text_embeds, "image": theirs.image_embeds, "logits": theirs.logits_per_image}
        expected["text_features"] = model.get_text_features(input_ids=ids).pooler_output
        expected["image_features"] = model.get_image_features(pixel_values=pixels).pooler_output
        expected["text_hidden"] = model.text_model(input_ids=ids).last_hidden_state
        expected["pooled_image"] = model.vision_model(pixel_values=pixels).pooler_output
    del model, theirs
    gc.collect()

    clip = load_clip(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        ours = {"text_features": clip.model.encode_text(ids), "image_features": clip.model.encode_image(pixels),
                "logits": clip.model(ids, pixels),
                "text_hidden": clip.model.text_model(ids), "pooled_image": clip.model.vision_model(pixels)}
        # the helpers the metrics use: the tokenizer inside (prompts the 77 tokens hold) and clip_pixels
        torch.testing.assert_close(clip.encode_prompts(PROMPTS[:3]), ours["text_features"][:3], atol=1e-10, rtol=0)
        torch.testing.assert_close(clip.encode_frames(frames), ours["image_features"], atol=1e-5, rtol=0)
    ours["text"] = torch.nn.functional.normalize(ours["text_features"], dim=-1)
    ours["image"] = torch.nn.functional.normalize(ours["image_features"], dim=-1)
    for key, value in expected.items():
        difference = (ours[key] - value).abs().max().item()
        record_property(f"max_abs_diff[{name}/{key}]", f"{difference:.3e}")
        torch.testing.assert_close(ours[key], value, atol=1e-10, rtol=0)
