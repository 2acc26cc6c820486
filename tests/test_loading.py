"""Loading: full-size key parity, the original single-file layout, and every refusal path."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import stemref
from stemref.clip import CLIPTextModel
from stemref.config import NotSD1Error
from stemref.unet import UNet2DConditionModel
from stemref.vae import AutoencoderKL

# ---------------------------------------------------------------- full-size keys, no weights


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_keys_and_shapes_match_diffusers_and_transformers():
    import diffusers
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel

    with torch.device("meta"):
        ours = [UNet2DConditionModel(), AutoencoderKL(), CLIPTextModel()]
        theirs = [diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
                  diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
                  HFCLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu"))]
    hub_text = {"text_model." + k: v for k, v in _shapes(theirs[2]).items()}  # hub files keep the prefix
    assert _shapes(ours[0]) == _shapes(theirs[0])
    assert _shapes(ours[1]) == _shapes(theirs[1])
    assert _shapes(ours[2]) == hub_text
    assert [len(_shapes(m)) for m in ours] == [686, 248, 196]
    assert sum(p.numel() for p in ours[0].parameters()) == sum(p.numel() for p in theirs[0].parameters())


# ---------------------------------------------------------------- original single-file layout

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                 "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest, table):
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(key, attention_levels=(True, True, True, False)):
    """diffusers → LDM names, the direction diffusers' convert_diffusers_to_original script goes (SD1.x, 2 layers)."""
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for new, old in fixed.items():
        if key.startswith(new):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions|downsamplers)\.(\d)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{3 * (i + 1)}.0.op.{rest[len('conv.'):]}"
        slot, rest = (0, _sub(rest, RESNET_TO_LDM)) if kind == "resnets" else (1, rest)
        return f"input_blocks.{3 * i + j + 1}.{slot}.{rest}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_sub(rest, RESNET_TO_LDM)}"
    if m := re.match(r"up_blocks\.(\d)\.(resnets|attentions|upsamplers)\.(\d)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            return f"output_blocks.{3 * i + 2}.{2 if attention_levels[::-1][i] else 1}.{rest}"
        slot, rest = (0, _sub(rest, RESNET_TO_LDM)) if kind == "resnets" else (1, rest)
        return f"output_blocks.{3 * i + j}.{slot}.{rest}"
    raise AssertionError(key)


def vae_to_ldm(key, value, levels=4):
    side, rest = key.split(".", 1)
    if side not in ("encoder", "decoder"):
        return key, value
    rest = rest.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    rest = rest.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    if rest.startswith("mid_block.attentions.0."):
        rest = "mid.attn_1." + _sub(rest[len("mid_block.attentions.0."):], VAE_ATTN_TO_LDM)
        if value.ndim == 2:
            value = value[:, :, None, None]
    if m := re.match(r"(down|up)_blocks\.(\d)\.(resnets|downsamplers|upsamplers)\.(\d)\.(.*)", rest):
        kind, i, part, j, tail = m[1], int(m[2]), m[3], m[4], m[5]
        level = i if kind == "down" else levels - 1 - i
        rest = f"{kind}.{level}." + (f"block.{j}.{tail}" if part == "resnets" else f"{part[:-2]}.{tail}")
    return f"{side}.{rest}", value


@pytest.fixture(scope="module")
def single_file(tiny_root, tmp_path_factory):
    """An original-layout file made from the tiny model, with a model_ema copy of the UNet (scaled, to tell them apart)."""
    unet = load_file(tiny_root / "unet" / "diffusion_pytorch_model.safetensors")
    vae = stemref.loading._normalise_vae_keys(load_file(tiny_root / "vae" / "diffusion_pytorch_model.safetensors"))
    text = load_file(tiny_root / "text_encoder" / "model.safetensors")
    sd = {"model.diffusion_model." + unet_to_ldm(k): v for k, v in unet.items()}
    sd.update({"model_ema." + k[len("model."):].replace(".", ""): 0.5 * v for k, v in sd.items()})
    for k, v in vae.items():
        k, v = vae_to_ldm(k, v)
        sd["first_stage_model." + k] = v.contiguous()
    sd.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    sd["alphas_cumprod"] = torch.rand(1000)  # schedule buffers live at the top level of real files
    path = tmp_path_factory.mktemp("single") / "tiny-pruned.safetensors"
    save_file(sd, path)
    return path


def test_single_file_matches_diffusers_conversion(single_file, tiny_root):
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import UNet2DConditionModel as DUNet
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    raw = load_file(single_file)
    unet_cfg = DUNet.load_config(tiny_root / "unet")
    vae_cfg = DAutoencoderKL.load_config(tiny_root / "vae")
    d_unet = DUNet.from_config(unet_cfg).double().eval()
    d_unet.load_state_dict(convert_ldm_unet_checkpoint(raw, unet_cfg), strict=True)
    d_vae = DAutoencoderKL.from_config(vae_cfg).double().eval()
    d_vae.load_state_dict(convert_ldm_vae_checkpoint(raw, vae_cfg), strict=True)

    sd = stemref.load(single_file, dtype=torch.float64, config=tiny_root)
    folder = stemref.load(tiny_root, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64), torch.randn(2, 77, 32, generator=g, dtype=torch.float64)
    img = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        assert torch.equal(sd.unet(x, 700, context), d_unet(x, 700, context).sample)
        assert torch.equal(sd.vae.encode(img).mean, d_vae.encode(img).latent_dist.mean)
        assert torch.equal(sd.vae.decode(x[:1]), d_vae.decode(x[:1]).sample)
        assert torch.equal(sd.text_encoder(ids), folder.text_encoder(ids))
        assert torch.equal(sd.unet(x, 700, context), folder.unet(x, 700, context))


def test_single_file_ema(single_file, tiny_root):
    sd = stemref.load(single_file, config=tiny_root, ema=True)
    folder = stemref.load(tiny_root)
    assert torch.equal(sd.unet.conv_in.weight, 0.5 * folder.unet.conv_in.weight)


def test_single_file_without_ema_refuses_ema(single_file, tiny_root, tmp_path):
    sd = {k: v for k, v in load_file(single_file).items() if not k.startswith("model_ema.")}
    save_file(sd, tmp_path / "emaonly.safetensors")
    with pytest.raises(stemref.WeightsError, match="no EMA weights"):
        stemref.load(tmp_path / "emaonly.safetensors", config=tiny_root, ema=True)


def test_single_file_needs_matching_config(single_file):
    with pytest.raises(stemref.WeightsError, match=r"do not fit SD1.x.*config=FOLDER"):
        stemref.load(single_file)  # SD1.5's default widths do not fit the tiny file


# ---------------------------------------------------------------- refusals


def test_missing_path_says_how_to_get_weights(tmp_path):
    with pytest.raises(stemref.WeightsError, match="stemref.download"):
        stemref.load(tmp_path / "nowhere")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(stemref.WeightsError, match="never loads"):
        stemref.load(path)


def test_folder_with_only_bin_files_is_refused(tiny_root, tmp_path):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    for f in root.rglob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(stemref.WeightsError, match="pickled"):
        stemref.load(root)


def test_fp16_variant_is_found(tiny_root, tmp_path):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    for f in root.rglob("*.safetensors"):
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()},
                  f.with_name(f.stem + ".fp16.safetensors"))
        f.unlink()
    sd = stemref.load(root, dtype=torch.float16)
    assert sd.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(sd.unet.conv_in.weight, stemref.load(tiny_root).unet.conv_in.weight.half())


def test_truncated_file(tiny_root, tmp_path):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    f = root / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(stemref.WeightsError, match="incomplete"):
        stemref.load(root)


def test_missing_component_folder(tiny_root, tmp_path):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    shutil.rmtree(root / "vae")
    with pytest.raises(stemref.WeightsError, match="missing vae/"):
        stemref.load(root)


def test_missing_and_unexpected_keys_are_named(tiny_root, tmp_path):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    f = root / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["extra.weight"] = sd.pop("conv_out.bias")
    save_file(sd, f)
    with pytest.raises(stemref.WeightsError, match=r"1 missing keys \(conv_out.bias\).*1 unexpected keys \(extra.weight\)"):
        stemref.load(root)


@pytest.mark.parametrize("config, changes, reason", [
    ("unet/config.json", {"use_linear_projection": True}, "linear projections"),
    ("unet/config.json", {"in_channels": 9}, "inpainting"),
    ("unet/config.json", {"addition_embed_type": "text_time"}, "SDXL"),
    ("unet/config.json", {"attention_head_dim": [5, 10, 20, 20]}, "SD2"),
    ("text_encoder/config.json", {"hidden_act": "gelu"}, "SD2"),
    ("scheduler/scheduler_config.json", {"prediction_type": "v_prediction"}, "v-prediction"),
])
def test_other_model_families_are_refused_by_config(tiny_root, tmp_path, config, changes, reason):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    f = root / config
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    with pytest.raises(NotSD1Error, match=f"not an SD1.x checkpoint.*{reason}"):
        stemref.load(root)


def test_other_model_families_are_refused_by_tensors(tiny_root, tmp_path):
    """Without configs, an inpainting UNet (9 input channels) and SD2-wide cross-attention are recognised by shape."""
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    (root / "unet" / "config.json").unlink()
    f = root / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(sd, f)
    with pytest.raises(NotSD1Error, match="inpainting"):
        stemref.load(root)
    sd = load_file(tiny_root / "unet" / "diffusion_pytorch_model.safetensors")
    sd = {k: torch.zeros(v.shape[0], 1024) if k.endswith("attn2.to_k.weight") else v for k, v in sd.items()}
    save_file(sd, f)
    with pytest.raises(NotSD1Error, match="1024"):
        stemref.load(root)


def test_sdxl_single_file_is_refused(tmp_path):
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, tmp_path / "xl.safetensors")
    with pytest.raises(NotSD1Error, match="SDXL"):
        stemref.load(tmp_path / "xl.safetensors")


def test_foreign_safetensors_file(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(stemref.WeightsError, match="not an original SD1.x single-file"):
        stemref.load(tmp_path / "lora.safetensors")


# ---------------------------------------------------------------- messages that name the real problem (issue 6)


@pytest.mark.parametrize("content, what", [
    (b"PK\x03\x04" + bytes(200), "PyTorch pickle"),  # torch.save's zip format
    (b"\x80\x02}q\x00" + bytes(200), "Python pickle"),  # protocol-2 pickle
    (b"<!DOCTYPE html><html>Sign in</html>", "HTML"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 3\n", "Git LFS pointer"),
])
def test_files_renamed_safetensors_are_named_for_what_they_are(tmp_path, content, what):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(stemref.WeightsError, match=f"is (a|an) {what}"):
        stemref.load(tmp_path / "model.safetensors")


def test_unreadable_weights_say_permission_denied(tiny_root, tmp_path, monkeypatch):
    import stemref.loading

    def denied(file):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(stemref.loading, "safetensors_problem", denied)  # root can read anything: simulate
    with pytest.raises(stemref.WeightsError, match="permission denied") as info:
        stemref.load(tiny_root)
    assert "incomplete" not in str(info.value)


@pytest.mark.parametrize("config, changes, field", [
    ("unet/config.json", {"layers_per_block": "2"}, "layers_per_block"),
    ("unet/config.json", {"block_out_channels": "abc"}, "block_out_channels"),
    ("unet/config.json", {"norm_num_groups": -8}, "norm_num_groups"),
    ("vae/config.json", {"scaling_factor": None}, "scaling_factor"),
    ("text_encoder/config.json", {"num_hidden_layers": 2.5}, "num_hidden_layers"),
    ("scheduler/scheduler_config.json", {"set_alpha_to_one": "no"}, "set_alpha_to_one"),
])
def test_configs_with_wrong_types_are_refused_naming_the_field(tiny_root, tmp_path, config, changes, field):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    f = root / config
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    with pytest.raises(stemref.WeightsError, match=f"{re.escape(str(f))}.*{field}"):
        stemref.load(root)


def test_a_config_that_is_not_json_is_refused(tiny_root, tmp_path):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    (root / "vae" / "config.json").write_text('{"latent_channels": 4,')
    with pytest.raises(stemref.WeightsError, match="vae/config.json: not valid JSON"):
        stemref.load(root)


def test_messages_advise_the_config_flag_that_exists(tiny_root, tmp_path):
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    (root / "unet" / "config.json").unlink()  # SD1.5's default widths do not fit the tiny weights
    with pytest.raises(stemref.WeightsError, match="--model-config FOLDER"):
        stemref.load(root)


def test_load_reports_progress(tiny_root):
    calls = []
    stemref.load(tiny_root, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="fp16"), TypeError, "dtype must be a floating torch.dtype.*got 'fp16'"),
    (dict(dtype=torch.int8), TypeError, "dtype must be a floating torch.dtype"),
    (dict(device="tpu"), ValueError, "device 'tpu' is not a torch device; use 'cpu'"),
    (dict(device=0.5), TypeError, "device must be a string"),
])
def test_bad_dtype_and_device_are_refused_first(tiny_root, kwargs, error, match):
    with pytest.raises(error, match=match):
        stemref.load(tiny_root, **kwargs)


@pytest.mark.parametrize("value, dtype, cause", [
    (float("nan"), torch.float32, "in the file"),
    (1e6, torch.float16, "once converted to torch.float16"),
])
def test_non_finite_weights_are_found_at_load(tiny_root, tmp_path, value, dtype, cause):
    """NaN weights (or weights that overflow the chosen precision) are refused when loading, naming the tensor,
    not found as NaN frames after an inversion."""
    root = shutil.copytree(tiny_root, tmp_path / "sd")
    f = root / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(f)
    name = sorted(k for k in tensors if k.endswith("conv_in.weight"))[0]
    tensors[name][0, 0, 0, 0] = value
    save_file(tensors, f)
    with pytest.raises(stemref.WeightsError, match=f"vae weight {re.escape(name)} holds NaN or infinite values {cause}"):
        stemref.load(root, dtype=dtype)
