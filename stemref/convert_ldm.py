"""Rules that rename an original (CompVis/LDM) single-file SD1.x checkpoint to diffusers' names.

The original file stores the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.`
and the HF CLIP text encoder under `cond_stage_model.transformer.`. Inside the UNet, LDM numbers its
blocks in one flat sequence (input_blocks.0 … 11, output_blocks.0 … 11) and indexes `nn.Sequential`
slots (in_layers.2 is conv1); diffusers nests them by level. The rules below are that arithmetic, written
once for any number of levels; the attention transformers are named identically in both.
"""
from __future__ import annotations

import re

import torch

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def split_checkpoint(sd: dict[str, torch.Tensor], layers_per_block: int = 2) -> tuple[dict, dict, dict]:
    """(unet, vae, text encoder) state dicts in diffusers/hub names from an original single-file checkpoint."""
    unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    vae = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    text = {k[len(TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    return convert_unet(unet, layers_per_block), convert_vae(vae), text


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def convert_unet(sd: dict[str, torch.Tensor], layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    return {_unet_key(key, layers_per_block): value for key, value in sd.items()}


def _unet_key(key: str, n: int) -> str:
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        block, slot, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(block - 1, n + 1)  # each level: n (resnet [+ attention]) entries, then a downsampler
        if j == n:
            return f"down_blocks.{level}.downsamplers.0.{rest.replace('op.', 'conv.')}"
        if slot == 0:
            return f"down_blocks.{level}.resnets.{j}.{_rename(rest, RESNET)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    if m := re.match(r"middle_block\.(\d)\.(.*)", key):
        slot, rest = int(m[1]), m[2]
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{slot // 2}.{_rename(rest, RESNET)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        block, slot, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(block, n + 1)  # each level: n + 1 entries of (resnet [, attention] [, upsampler])
        if slot == 0:
            return f"up_blocks.{level}.resnets.{j}.{_rename(rest, RESNET)}"
        if rest.startswith("conv."):  # the upsampler is the last slot of a level's last entry
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    return key


def convert_vae(sd: dict[str, torch.Tensor], levels: int | None = None) -> dict[str, torch.Tensor]:
    if levels is None:
        levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in sd.items():
        new = _vae_key(key, levels)
        if ".mid_block.attentions.0.to_" in new and value.ndim == 4:
            value = value[:, :, 0, 0]  # LDM stores the bottleneck attention as 1×1 convs
        out[new] = value
    return out


def _vae_key(key: str, levels: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    fixed = {"norm_out": "conv_norm_out", "mid.block_1": "mid_block.resnets.0", "mid.block_2": "mid_block.resnets.1"}
    for old, new in fixed.items():
        if rest.startswith(old + "."):
            return f"{side}.{new}.{_rename(rest[len(old) + 1:], VAE_RESNET)}"
    if rest.startswith("mid.attn_1."):
        return f"{side}.mid_block.attentions.0.{_rename(rest[len('mid.attn_1.'):], VAE_ATTENTION)}"
    if m := re.match(r"(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)", rest):
        kind, level, part, tail = m[1], int(m[2]), m[3], m[4]
        if kind == "up":
            level = levels - 1 - level  # LDM counts decoder levels from the bottom, diffusers from the top
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        if part == "block":
            j, _, tail = tail.partition(".")
            return f"{side}.{blocks}.{level}.resnets.{j}.{_rename(tail, VAE_RESNET)}"
        return f"{side}.{blocks}.{level}.{part}rs.0.{tail}"
    return key
