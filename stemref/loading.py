"""Load SD1.x weights from a diffusers-layout folder or an original single-file checkpoint.

Weights are read only from `.safetensors` files; pickled formats (.ckpt, .bin, .pt, .pth) can run
arbitrary code when loaded and are refused. Models are built on the meta device and take the loaded
tensors directly (`assign=True`), so loading never spends time on a random initialisation.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from .clip import CLIPModel, CLIPTextModel
from .clip_pipeline import CLIP
from .config import CLIPConfig, CLIPTextConfig, DDIMConfig, NotSD1Error, UNetConfig, VAEConfig
from .files import safetensors_problem
from .convert_ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, split_checkpoint
from .pipeline import StableDiffusion
from .scheduler import DDIMScheduler
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

GET_WEIGHTS = ("Get SD1.5 in safetensors form with `python -m stemref.download --to weights/sd15` "
               "(see weights/README.md), then pass that folder.")
DEFAULT_CLIP = Path("weights/clip-vit-large-patch14")
GET_CLIP = ("Get CLIP with `python -m stemref.download --model clip-vit-large-patch14` (or clip-vit-base-patch32, "
            "FateZero's metric model) and pass its folder.")
PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
CONFIG_HINT = "Models of other sizes need their config.json files: load(file, config=FOLDER), or --model-config FOLDER."
# The stock SD1.5 VAE ships its bottleneck attention under pre-2023 diffusers names.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class WeightsError(ValueError):
    """The weights given to `load` are missing, unreadable, unsafe or do not fit the model."""


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         ema: bool = False, config: str | Path | None = None,
         progress: Callable[[int, int], None] | None = None) -> StableDiffusion:
    """Load SD1.x from a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or a single `.safetensors` file.

    Single files carry no configs: SD1.5's are used unless `config` names a diffusers folder whose
    config.json files (and tokenizer/) describe the file. `ema=True` takes the UNet's EMA weights from a
    single file that holds both (v1-5-pruned.safetensors). `progress(done, 4)` is called after the files
    are read and after each of the three models is built.
    """
    report = progress or (lambda done, total: None)
    dtype, device = check_dtype(dtype), check_device(device)
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"weights not found at {path}. {GET_WEIGHTS}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path} holds pickled weights, which stemref never loads (unpickling can run code). {GET_WEIGHTS}")
    if path.is_dir():
        unet_sd, vae_sd, text_sd, configs, tokenizer = _read_folder(path)
    elif path.suffix.lower() == ".safetensors":
        unet_sd, vae_sd, text_sd, configs, tokenizer = _read_single_file(path, ema, Path(config) if config else None)
    else:
        raise WeightsError(f"{path} is neither a diffusers folder nor a .safetensors file. {GET_WEIGHTS}")
    check_sd1(unet_sd, text_sd)
    report(1, 4)
    unet_cfg, vae_cfg, text_cfg, ddim_cfg = configs
    text_encoder = _build(CLIPTextModel, text_cfg, _normalise_text_keys(text_sd), "text_encoder", dtype, device)
    report(2, 4)
    vae = _build(AutoencoderKL, vae_cfg, _normalise_vae_keys(vae_sd), "vae", dtype, device)
    report(3, 4)
    unet = _build(UNet2DConditionModel, unet_cfg, unet_sd, "unet", dtype, device)
    report(4, 4)
    return StableDiffusion(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                           scheduler=DDIMScheduler(ddim_cfg))


def check_dtype(dtype: object) -> torch.dtype:
    """A floating torch dtype, or TypeError naming the ones to use."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.float16, torch.bfloat16 or "
                        f"torch.float64), got {dtype!r}")
    return dtype


def check_device(device: object) -> torch.device:
    """A torch device that exists here, or ValueError/TypeError naming the problem."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda' or a torch.device, got {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {str(device)!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use 'cpu'")
    return device


def load_clip(path: str | Path = DEFAULT_CLIP, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> CLIP:
    """Load CLIP from a transformers folder (config.json + model.safetensors), e.g. openai/clip-vit-large-patch14.

    The folder's vocab.json and merges.txt are used when present; otherwise the OpenAI vocabulary that ships
    with stemref, which is the one every OpenAI CLIP uses.
    """
    path = Path(path).expanduser()
    config, weights = path / "config.json", path / "model.safetensors"
    absent = [f.name for f in (config, weights) if not f.is_file()]
    if absent:
        raise WeightsError(f"no CLIP at {path} (missing {' and '.join(absent)}). {GET_CLIP}")
    try:
        cfg = CLIPConfig.from_json(config)
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(f"cannot read {config}: {e}") from e
    # old hub files still carry the position_ids buffers, which are not weights
    sd = {k: v for k, v in _read_safetensors(weights, GET_CLIP).items() if not k.endswith("position_ids")}
    model = _build(CLIPModel, cfg, sd, "CLIP", dtype, device, f"Check {config}; {GET_CLIP}")
    length = cfg.text.max_position_embeddings
    has_vocab = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    tokenizer = CLIPTokenizer.from_folder(path, length) if has_vocab else CLIPTokenizer.openai(length)
    return CLIP(model, tokenizer)


def check_sd1(unet_sd: dict[str, torch.Tensor], text_sd: dict[str, torch.Tensor]) -> None:
    """Recognise SD2, SDXL and inpainting weights by their tensors, whatever their configs say."""
    conv_in = unet_sd.get("conv_in.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise NotSD1Error(f"not an SD1.x checkpoint: the UNet takes {conv_in.shape[1]} input channels "
                          "(an inpainting or depth model). stemref implements SD1.x text-to-image models.")
    if any(k.startswith("add_embedding.") for k in unet_sd):
        raise NotSD1Error("not an SD1.x checkpoint: the UNet has SDXL's added embeddings. stemref implements SD1.x only.")
    cross = next((v for k, v in unet_sd.items() if k.endswith("attn2.to_k.weight")), None)
    if cross is not None and cross.shape[1] in (1024, 2048):
        raise NotSD1Error(f"not an SD1.x checkpoint: cross-attention reads {cross.shape[1]}-wide text "
                          "(SD2 uses 1024, SDXL 2048; SD1.x 768). stemref implements SD1.x only.")
    if any(k.startswith(("model.", "transformer.resblocks")) for k in text_sd):
        raise NotSD1Error("not an SD1.x checkpoint: the text encoder is OpenCLIP (SD2). stemref implements SD1.x only.")


def _read_folder(root: Path):
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not (root / d).is_dir()]
    if missing:
        raise WeightsError(f"{root} is not a diffusers SD1.5 folder: missing {', '.join(m + '/' for m in missing)}. {GET_WEIGHTS}")
    return (_read_weights(root / "unet", "diffusion_pytorch_model"),
            _read_weights(root / "vae", "diffusion_pytorch_model"),
            _read_weights(root / "text_encoder", "model"),
            _read_configs(root), CLIPTokenizer.from_folder(root / "tokenizer"))


def _read_configs(root: Path | None) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, DDIMConfig]:
    """Each component's config.json where present, SD1.5's defaults otherwise."""
    if root is None:
        return UNetConfig(), VAEConfig(), CLIPTextConfig(), DDIMConfig()
    return (_config(UNetConfig, root / "unet" / "config.json"),
            _config(VAEConfig, root / "vae" / "config.json"),
            _config(CLIPTextConfig, root / "text_encoder" / "config.json"),
            _config(DDIMConfig, root / "scheduler" / "scheduler_config.json"))


def _config(cls, file: Path):
    if not file.exists():
        return cls()
    try:
        config = cls.from_json(file)
    except NotSD1Error:
        raise
    except UnicodeDecodeError as e:
        raise WeightsError(f"cannot read {file}: not UTF-8 text ({e.reason}); replace it with the checkpoint's own") from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"cannot read {file}: not valid JSON ({e}); replace it with the checkpoint's own") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing, or of the wrong type
        raise WeightsError(f"cannot read {file}: a field is missing or has the wrong type ({e!r}); "
                           "replace it with the checkpoint's own") from e
    for f in fields(config):
        if not _fits(getattr(config, f.name), f.default):
            raise WeightsError(f"{file}: {f.name} = {getattr(config, f.name)!r} does not fit (SD1.5 has "
                               f"{f.default!r}); replace the file with the checkpoint's own config")
    return config


def _fits(value, default) -> bool:
    """Same kind as the default (a non-empty tuple of them for tuples), and positive where the default is:
    a string or a negative width would otherwise fail deep inside a model's constructor."""
    if isinstance(default, tuple):
        return isinstance(value, tuple) and len(value) > 0 and all(_fits(v, default[0]) for v in value)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN != NaN
        return False
    return (isinstance(value, int) or isinstance(default, float)) and (value > 0 if default > 0 else value >= 0)


def _read_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """The component's safetensors file: full precision if present, else the fp16 variant."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).exists():
            return _read_safetensors(folder / name)
    found = sorted(p.name for p in folder.iterdir())
    if any(Path(f).suffix in PICKLE_SUFFIXES for f in found):
        raise WeightsError(f"{folder} has only pickled weights ({', '.join(found)}), which stemref never loads. {GET_WEIGHTS}")
    raise WeightsError(f"no {stem}.safetensors (or .fp16.safetensors) in {folder}. {GET_WEIGHTS}")


def _read_safetensors(file: Path, hint: str = GET_WEIGHTS) -> dict[str, torch.Tensor]:
    """The file's tensors; every failure is a WeightsError ending in `hint` (how to get good weights)."""
    try:
        problem = safetensors_problem(file)
    except PermissionError as e:
        raise WeightsError(f"cannot read {file}: permission denied; fix its permissions (chmod u+r) or copy it") from e
    except IsADirectoryError as e:
        raise WeightsError(f"{file} is a folder, not a .safetensors file. {hint}") from e
    if problem:
        raise WeightsError(f"{file} is {problem}; stemref loads only whole safetensors files. {hint}")
    try:
        return load_file(str(file))
    except OSError as e:
        raise WeightsError(f"cannot read {file}: {e.strerror or e}. {hint}") from e
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise WeightsError(f"cannot read {file} as safetensors ({e}); the file may be incomplete. {hint}") from e


def _read_single_file(file: Path, ema: bool, config_root: Path | None):
    sd = _read_safetensors(file)
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        if any(k.startswith(("conditioner.", "model.diffusion_model.label_emb")) for k in sd):
            raise NotSD1Error(f"not an SD1.x checkpoint: {file} is an SDXL file. stemref implements SD1.x only.")
        raise WeightsError(f"{file} is not an original SD1.x single-file checkpoint (no '{UNET_PREFIX}*' keys). {GET_WEIGHTS}")
    if ema:
        sd = _with_ema_unet(sd, file)
    missing = [p for p in (VAE_PREFIX, TEXT_PREFIX) if not any(k.startswith(p) for k in sd)]
    if missing:
        raise WeightsError(f"{file} lacks the {' and '.join(missing)}* weights (a UNet-only file); use a full checkpoint. {GET_WEIGHTS}")
    if config_root is not None and not config_root.is_dir():
        raise WeightsError(f"config={config_root} is not a folder; give a diffusers folder holding unet/config.json etc.")
    configs = _read_configs(config_root)
    unet_sd, vae_sd, text_sd = split_checkpoint(sd, configs[0].layers_per_block)
    # The single file has no vocabulary; take it from the config folder, a tokenizer/ beside the file, or
    # the copy of OpenAI's BPE file that ships with stemref (the same 49,408 tokens).
    folders = [d / "tokenizer" for d in (config_root, file.parent) if d is not None]
    tokenizer_dir = next((d for d in folders if d.is_dir()), None)
    tokenizer = CLIPTokenizer.from_folder(tokenizer_dir) if tokenizer_dir else CLIPTokenizer.openai()
    return unet_sd, vae_sd, text_sd, configs, tokenizer


def _with_ema_unet(sd: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """LDM keeps EMA copies as model_ema.<key without dots>, e.g. model_ema.diffusion_modelconv_inweight."""
    out = dict(sd)
    for key in [k for k in sd if k.startswith(UNET_PREFIX)]:
        ema_key = "model_ema." + key[len("model."):].replace(".", "")
        if ema_key not in sd:
            raise WeightsError(f"ema=True but {file} has no EMA weights ({ema_key} missing); load it with ema=False.")
        out[key] = sd[ema_key]
    return out


def _normalise_text_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub files say text_model.*; transformers 5 saves without the prefix. position_ids is a buffer, not a weight."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


def _normalise_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")  # e.g. "encoder.mid_block.attentions.0.query", "weight"
        stem, _, name = head.rpartition(".")
        if ".mid_block.attentions." in key and name in LEGACY_VAE_ATTENTION:
            key = f"{stem}.{LEGACY_VAE_ATTENTION[name]}.{leaf}"
        out[key] = value
    return out


def _build(cls, cfg, sd: dict[str, torch.Tensor], what: str, dtype: torch.dtype, device,
           fix: str | None = None) -> nn.Module:
    """`cls(cfg)` holding `sd`, whose keys and shapes must match exactly; `fix` ends the errors (default: SD1.x's)."""
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{what} weights do not fit {cls.__name__ if fix else 'SD1.x'}: {_keys('missing', missing)}"
                           f"{_keys('unexpected', unexpected)}{fix or f'Is it SD1.x? {CONFIG_HINT}'}")
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"{what} weights have other shapes than its config: {'; '.join(wrong[:5])}"
                           f"{' …' if len(wrong) > 5 else ''}. {fix or f'Check {what}/config.json. {CONFIG_HINT}'}")
    # Convert tensor by tensor, dropping each file tensor as soon as it is copied: the peak stays near
    # one copy of the weights rather than two.
    converted = {}
    for k in list(sd):
        x = sd.pop(k)
        converted[k] = x.to(device=device, dtype=dtype)
        # NaN weights make every later result NaN: found here, one finite check per tensor, not after a run
        if converted[k].is_floating_point() and not torch.isfinite(converted[k]).all():
            cause = "in the file (damaged weights)" if not torch.isfinite(x).all() else \
                f"once converted to {dtype}: it overflows that precision, load in float32"
            raise WeightsError(f"{what} weight {k} holds NaN or infinite values {cause}. "
                               f"{fix or GET_WEIGHTS}")
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _keys(kind: str, keys: list[str]) -> str:
    if not keys:
        return ""
    return f"{len(keys)} {kind} keys ({', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}); "
