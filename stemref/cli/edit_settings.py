"""The edit command's settings: the option table (common options here, each method's in edit_methods.py), reading
`--config FILE.toml`, the checks that need no file and no model, and writing the resolved settings back as
config.toml, which `read_config` reads back exactly (every string escaped as TOML requires)."""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import torch

from .checks import check_fps, check_prompt, check_seed, check_steps, check_video_path
from .errors import UserError
from .edit_methods import METHODS, Option
from .launch import DEFAULT_TIMEOUT
from .model import DTYPES
from ..context import CONTEXTS
from ..download import DEFAULT_BASE_URL
from ..edit.cache import default_root
from ..loading import DEFAULT_CLIP

DEFAULT_WEIGHTS = Path("weights/sd15")
# the two ways to set the frame size: a flag of one way drops the other way's values from --config
GEOMETRY = (({"size", "square"}, {"width", "height"}), ({"width", "height"}, {"size", "square"}))


COMMON = (
    Option("video", Path, None, "video file (mp4, mov, webm, mkv, gif) or folder of images"),
    Option("source", str, None, "a caption of the source video (the inversion prompt)"),
    Option("target", list, None, "the edit: a caption of the video you want; repeat for several edits"),
    Option("method", str, "tokenflow", "editing method", None),  # choices filled in from METHODS
    Option("inversion", str, None, "self-attention context of the inversion (default: the method's; model = a "
           "tuned model's own self-attention)", (*CONTEXTS, "model")),
    Option("num_bases", int, 256, "STEM's K: bases per set (with --inversion stem)"),
    Option("scope", int, None, "frames per set of STEM bases (default: the whole video; 8 reproduces the official code)"),
    Option("frames", int, None, "how many frames to edit (default: all)"),
    Option("start", int, 0, "index of the first frame"),
    Option("stride", int, 1, "use every n-th frame"),
    Option("size", int, 512, "longer side in pixels, a multiple of 8 (ignored with --width/--height)"),
    Option("square", bool, False, "resize the shorter side to --size and crop a square"),
    Option("width", int, None, "resize to exactly this width (with --height; then cropped to a multiple of 8)"),
    Option("height", int, None, "resize to exactly this height (with --width)"),
    Option("steps", int, 50, "DDIM steps, for the inversion and the edit"),
    Option("guidance", float, None, "classifier-free guidance scale of the edit (default: the method's)"),
    Option("negative", str, None, "negative prompt of the edit (default: the method's)"),
    Option("seed", int, 1, "seeds every random choice (STEM's initial bases, keyframes, tuning's draws)"),
    Option("fps", float, None, "frame rate of the written videos (default: the input's, divided by --stride)"),
    Option("format", str, "mp4", "written videos: mp4 (H.264, plays everywhere) or mkv (lossless FFV1)", ("mp4", "mkv")),
    Option("weights", Path, DEFAULT_WEIGHTS, "SD1.5 diffusers folder or .safetensors file; downloaded here if missing"),
    Option("model_config", Path, None, "for a single .safetensors file of another size: a diffusers folder with "
           "its config.json files"),
    Option("offline", bool, False, "never download: fail with the download command when --weights is missing"),
    Option("hub_url", str, DEFAULT_BASE_URL, "Hugging Face hub (or mirror) to download missing weights from"),
    Option("device", str, "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, mps"),
    Option("dtype", str, None, "model precision (default: fp32 on CPU; on GPU fp16, fp32 for the tuned methods' "
           "master weights)", tuple(DTYPES)),
    Option("clip", Path, DEFAULT_CLIP, "CLIP folder (transformers layout) for the CLIP metrics in metrics.json; "
           "skipped with a note when absent"),
    Option("cache", Path, None, f"cache folder for inversions (default: {default_root()})"),
    Option("reuse", bool, True, "read and write the cache (--no-reuse: always recompute, store nothing)"),
    Option("out", Path, None, "output folder (default: out/<video name>, or the first out/<video name>-N not taken)"),
    Option("overwrite", bool, False, "replace --out if an earlier stemref run wrote it"),
    Option("timeout", float, DEFAULT_TIMEOUT, "under torchrun: seconds a process waits for the others before the "
           "run stops with an error"),
    Option("explain", bool, False, "index.html: also the pictures that cost extra work (today: replay one inversion "
           "step when the inversion came from the cache)"),
)
RECORDED = ("processes",)  # written into config.toml as facts of the run, ignored when read back


def all_options() -> tuple[Option, ...]:
    """Every option once (methods may share options, e.g. the two tuned methods' TUNING)."""
    options = {o.name: o for o in reversed(COMMON + tuple(o for m in METHODS.values() for o in m.options))}
    return tuple(reversed(options.values()))


def free_folder(base: Path) -> Path:
    """`base`, or the first of base-2, base-3, … that does not exist or is empty."""
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def read_config(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, type-checked against the option table."""
    if path.is_dir():
        raise UserError(f"--config {path} is a folder; give a TOML file such as {path / 'config.toml'}")
    if path.exists() and not path.is_file():
        raise UserError(f"--config {path} is not a regular file (a pipe, device or socket); give a TOML file")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path} is not a text file (TOML is UTF-8 text); give a TOML file such as an "
                        "earlier run's config.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path} is not valid TOML: {e}") from None
    options = {o.name: o for o in all_options()}
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in RECORDED:
            continue
        if name not in options:
            raise UserError(f"--config {path}: unknown setting {key!r}; the settings are the long options of "
                            "`python -m stemref.edit --help`, with underscores")
        settings[name] = _typed(options[name], value, path)
    return settings


def _typed(o: Option, value: Any, path: Path) -> Any:
    bad = UserError(f"--config {path}: {o.name} must be {_type_name(o)}, got {value!r}")
    if o.type is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return value
    if o.type is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if o.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if o.type is Path and isinstance(value, str):
        return path.parent / Path(value).expanduser()  # relative to the TOML file, not to where the command runs
    if not isinstance(value, o.type) or isinstance(value, bool):
        raise bad
    return value


def check_settings(s: dict[str, Any]) -> None:
    """Every refusal that needs no file read and no model: before minutes of loading."""
    for name, what in (("video", "a VIDEO (or `video = ...` in --config)"), ("source", "--source"),
                       ("target", "at least one --target")):
        if not s[name]:
            raise UserError(f"missing {what}; see python -m stemref.edit --help")
    if s["method"] not in METHODS:
        raise UserError(f"--method {s['method']}: choose one of {', '.join(METHODS)}")
    if s["inversion"] not in METHODS[s["method"]].inversions:
        raise UserError(f"--inversion {s['inversion']} does not go with --method {s['method']}; choose one of "
                        f"{', '.join(METHODS[s['method']].inversions)}")
    for o in all_options():
        if o.choices and s[o.name] is not None and s[o.name] not in o.choices:
            raise UserError(f"--{option_flag(o.name)} {s[o.name]}: choose one of {', '.join(map(str, o.choices))}")
    for o in all_options():  # every text setting: config.toml must be able to hold it (UTF-8)
        if o.type in (str, Path, list) and s[o.name] is not None:
            for text in s[o.name] if o.type is list else [s[o.name]]:
                check_prompt(str(text), "VIDEO" if o.name == "video" else f"--{option_flag(o.name)}")
    for text, flag in [(s["source"], "--source"), *((t, "--target") for t in s["target"])]:
        if not text.strip():
            raise UserError(f"{flag} is empty; describe the video in a few words")
    for name, low in (("steps", 1), ("stride", 1), ("start", 0), ("num_bases", 1), ("batch", 1), ("min_channels", 1),
                      ("store_memory", 0), ("tune_steps", 1), ("ffam_r", 1)):
        if s[name] < low:
            raise UserError(f"--{option_flag(name)} must be at least {low}, got {s[name]}")
    for name in ("frames", "scope"):
        if s[name] is not None and s[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {s[name]}")
    if (s["width"] is None) != (s["height"] is None):
        raise UserError("--width and --height go together; give both, or use --size")
    if s["width"] is not None:
        if min(s["width"], s["height"]) < 64:
            raise UserError(f"--width {s['width']} --height {s['height']}: each must be at least 64 pixels")
        if s["square"]:
            raise UserError("--square crops to --size; it does not combine with --width/--height")
    elif s["size"] % 8 or s["size"] < 64:
        raise UserError(f"--size {s['size']}: use a multiple of 8 that is at least 64, such as 256 or 512")
    check_steps(s["steps"])
    for name in ("guidance", "pnp_attn", "pnp_conv", "cross_window", "self_window", "blend_threshold", "lr"):
        if not math.isfinite(s[name]):
            raise UserError(f"--{option_flag(name)} must be a finite number, got {s[name]}")
    if not 0 < s["lr"] < 1:
        raise UserError(f"--lr {s['lr']}: a learning rate between 0 and 1 (3e-5 is the papers')")
    for name in ("pnp_attn", "pnp_conv", "cross_window", "self_window"):
        if not 0 <= s[name] <= 1:
            raise UserError(f"--{option_flag(name)} is a fraction of the steps, from 0 to 1; got {s[name]}")
    check_fps(s["fps"])
    check_seed(s["seed"])
    if s["scope"] is not None and s["inversion"] != "stem":
        raise UserError("--scope is a STEM option; use it with --inversion stem")
    if METHODS[s["method"]].check is not None:
        METHODS[s["method"]].check(s)
    check_video_path(Path(s["video"]))


def check_flags_apply(given: set[str], s: dict[str, Any]) -> None:
    """Refuse a flag given on the command line that the run would ignore: another method's option, or a STEM
    option without --inversion stem. (A --config file may hold such settings: an earlier run's config.toml
    with another --method is meant to be reusable.)"""
    ignored = sorted(given - {o.name for o in COMMON + METHODS[s["method"]].options})
    if ignored:
        name = ignored[0]
        users = [m for m, method in METHODS.items() if any(o.name == name for o in method.options)]
        raise UserError(f"--{option_flag(name)} is an option of --method {' and '.join(users)}; --method "
                        f"{s['method']} does not use it: drop it, or choose --method {users[0]}")
    if "num_bases" in given and s["inversion"] != "stem":
        raise UserError("--num-bases is a STEM option; use it with --inversion stem")


def to_toml(s: dict[str, Any]) -> str:
    """The resolved settings of the common options and of the method used, as TOML; paths absolute, None ("the
    default behaviour") left out, and where the outputs went (out, overwrite) too: a rerun with --config
    writes a new folder. `read_config` reads back every value exactly."""
    lines = ["# written by python -m stemref.edit; repeat the run with --config config.toml", ""]
    for o in COMMON + METHODS[s["method"]].options:
        value = s[o.name]
        if value is None or o.name in ("out", "overwrite"):
            continue
        if o.type is Path:
            value = Path(value).expanduser().absolute()
        lines.append(f"{o.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


# TOML basic strings: `"` and `\` are escaped, and every control character but tab (U+0000–U+001F, U+007F);
# JSON's escapes are not enough (JSON leaves U+007F bare, which TOML forbids)
TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    return '"' + "".join(TOML_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                         for c in text) + '"'


def option_flag(name: str) -> str:
    return name.replace("_", "-")


def _type_name(o: Option) -> str:
    return {list: "a string or a list of strings", bool: "true or false", int: "an integer", float: "a number",
            str: "a string", Path: "a path (string)"}[o.type]
