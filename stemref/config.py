"""Model configurations: SD1.5 defaults, or read from a diffusers/transformers `config.json`.

Only the fields that change the SD1.x architecture are read; a config that asks for something
outside SD1.x (SD2's linear projections and 1024-wide text, SDXL's extra blocks, inpainting's 9 input
channels) is refused with `NotSD1Error` rather than built wrongly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


class NotSD1Error(ValueError):
    """The weights or config describe a model that is not Stable Diffusion 1.x."""


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # True where a level has cross-attention transformers (CrossAttnDownBlock2D / CrossAttnUpBlock2D).
    # Up levels mirror down levels: up level i has attention iff down level (n-1-i) has.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    # diffusers' `attention_head_dim` is, for SD1.x, the number of heads (8), not their width:
    # head width is channels / 8. The misnomer is frozen into every published config.
    heads: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    @classmethod
    def from_json(cls, path: str | Path) -> "UNetConfig":
        c = json.loads(Path(path).read_text())
        down, up = c.get("down_block_types", []), c.get("up_block_types", [])
        _require(c.get("in_channels", 4) == 4, f"UNet has {c.get('in_channels')} input channels (inpainting/depth models are not SD1.x text-to-image)")
        _require(c.get("cross_attention_dim", 768) not in (1024, 2048), f"UNet cross-attention width {c.get('cross_attention_dim')} (SD2 uses 1024, SDXL 2048; SD1.x 768)")
        _require(not c.get("use_linear_projection", False), "UNet uses linear projections (SD2-style)")
        _require(c.get("addition_embed_type") is None, "UNet has added embeddings (SDXL-style)")
        _require(c.get("transformer_layers_per_block", 1) in (1, None), "UNet has several transformer layers per block (SDXL-style)")
        _require(set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"} and set(up) <= {"CrossAttnUpBlock2D", "UpBlock2D"},
                 f"unknown UNet block types {down} / {up}")
        levels = tuple(t == "CrossAttnDownBlock2D" for t in down)
        _require(tuple(t == "CrossAttnUpBlock2D" for t in up) == levels[::-1], "UNet up blocks do not mirror the down blocks")
        heads = c.get("attention_head_dim", 8)
        _require(isinstance(heads, int), f"per-level attention_head_dim {heads} (SD2-style head widths)")
        return cls(
            in_channels=c.get("in_channels", 4),
            out_channels=c.get("out_channels", 4),
            block_out_channels=tuple(c["block_out_channels"]),
            attention_levels=levels,
            layers_per_block=c.get("layers_per_block", 2),
            heads=heads,
            cross_attention_dim=c.get("cross_attention_dim", 768),
            norm_num_groups=c.get("norm_num_groups", 32),
            norm_eps=c.get("norm_eps", 1e-5),
        )


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        c = json.loads(Path(path).read_text())
        _require(c.get("latent_channels", 4) == 4, f"VAE has {c.get('latent_channels')} latent channels (SD1.x has 4)")
        return cls(**{f.name: tuple(c[f.name]) if f.name == "block_out_channels" else c[f.name]
                      for f in fields(cls) if f.name in c})


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPTextConfig":
        c = json.loads(Path(path).read_text())
        _require(c.get("hidden_act", "quick_gelu") == "quick_gelu", f"text encoder uses {c.get('hidden_act')} (SD1.x's CLIP uses quick_gelu; SD2's OpenCLIP uses gelu)")
        _require(c.get("hidden_size", 768) != 1024, "text encoder width 1024 (SD2's OpenCLIP; SD1.x uses 768)")
        return cls(**{f.name: c[f.name] for f in fields(cls) if f.name in c})


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP's image tower; the defaults are ViT-L/14's (the CLIP whose text tower SD1.x conditions on)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPConfig:
    """The whole CLIP model (transformers' CLIPModel): both towers and the width of the shared embedding."""
    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 768

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPConfig":
        """Read a transformers CLIPModel config.json; raises ValueError for what is not OpenAI-style CLIP.

        Fields a file leaves out take transformers' defaults (ViT-B/32's), not ours, because that is what
        the file means. Old hub files repeat overrides in `text_config_dict` / `vision_config_dict`, which
        win over `text_config` / `vision_config` as they do in transformers.
        """
        c = json.loads(Path(path).read_text())
        if c.get("model_type", "clip") != "clip":
            raise ValueError(f"{path} describes a {c.get('model_type')!r} model, not CLIP (model_type 'clip')")
        towers = {}
        for name, dataclass_, defaults in (("text", CLIPTextConfig, TRANSFORMERS_CLIP_TEXT),
                                           ("vision", CLIPVisionConfig, TRANSFORMERS_CLIP_VISION)):
            tower = {**defaults, **(c.get(f"{name}_config") or {}), **(c.get(f"{name}_config_dict") or {})}
            if tower["hidden_act"] != "quick_gelu":
                raise ValueError(f"{path}: the {name} tower uses {tower['hidden_act']}; stemref's CLIP implements "
                                 "OpenAI's models, which use quick_gelu")
            towers[name] = dataclass_(**{f.name: tower[f.name] for f in fields(dataclass_)})
        return cls(text=towers["text"], vision=towers["vision"], projection_dim=c.get("projection_dim", 512))


# transformers' defaults for a CLIPModel config.json (ViT-B/32's towers)
TRANSFORMERS_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                              num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                              hidden_act="quick_gelu")
TRANSFORMERS_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
                                hidden_act="quick_gelu")


@dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    @classmethod
    def from_json(cls, path: str | Path) -> "DDIMConfig":
        """Read any diffusers scheduler config (SD1.5 ships a PNDM one) and keep the DDIM-relevant fields."""
        c = json.loads(Path(path).read_text())
        _require(c.get("beta_schedule", "scaled_linear") == "scaled_linear", f"beta schedule {c.get('beta_schedule')} (SD1.x uses scaled_linear)")
        _require(c.get("prediction_type", "epsilon") == "epsilon", f"prediction type {c.get('prediction_type')} (SD1.x predicts epsilon; v-prediction is SD2)")
        return cls(**{f.name: c[f.name] for f in fields(cls) if f.name in c})


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise NotSD1Error(f"not an SD1.x checkpoint: {problem}. stemref implements Stable Diffusion 1.x only.")
