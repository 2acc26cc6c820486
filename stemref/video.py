"""Video I/O: read clips or image folders into frame tensors, write them back.

Everything in stemref treats a video as one tensor of frames in [0, 1]:

    frames (F, 3, H, W) float32, RGB, values in [0, 1]

Reading (`read_video`)
- Files go through PyAV (FFmpeg), which probes the content, so .mp4 .mov .webm .mkv .gif and most other
  containers work. The first video stream is used; audio is ignored. Decoding stops right after the last
  frame that was asked for, so `count=8` on a long clip decodes only the frames up to that point.
- A folder is read as one image per frame (.png .jpg .jpeg .webp, case-insensitive), in natural order
  (`2.png` before `10.png`); other files in the folder are ignored. Alpha channels are dropped. 16-bit
  PNGs (greyscale or RGB) are scaled to 8 bits, not clipped.
- Frame selection: frames start, start + stride, start + 2·stride, ..., at most `count` of them.
- Geometry: SD 1.5 works on an 8× smaller latent grid, so the output H and W are multiples of 8, except
  with `as_stored=True`, which keeps every pixel as stored (for metrics).
  * `size=None`: keep the resolution; crop the remainder of H and W modulo 8 from the centre
    (854×480 -> 848×480, 100×75 -> 96×72).
  * `size=S`: resize so the longer side is S (aspect kept, the short side rounded to the nearest pixel),
    then crop the short side down to a multiple of 8 from the centre (640×272, S=512 -> 512×218 -> 512×216).
  * `square=True`: resize so the shorter side is S, then centre-crop S×S. With `size=None` the square
    is cut at native resolution, its side the shorter side rounded down to a multiple of 8.
  * `resize=(H, W)`: resize to exactly H×W (aspect not kept, as the TokenFlow/STEM configs do), then crop
    each side down to a multiple of 8 from the centre (854×480 -> 848×480). Excludes `size` and `square`.
  A centre crop of an odd remainder puts the extra pixel at the bottom/right: top = (H - H') // 2.
- Resampling is Pillow's LANCZOS on the decoded 8-bit frames (what image pipelines for SD use): sharp,
  with proper antialiasing when shrinking. Frames that need no resize are never resampled.
- Colour conversion from the codec's YUV to RGB uses the colorspace tagged in the stream (PyAV's default).
  Rotation metadata and non-square pixel aspect ratios are not applied.

Writing (`write_video`), chosen by the file suffix
- .mp4 / .mov: H.264 (libx264), yuv420p, crf 18, the format every player and browser plays. yuv420p
  stores colour at half resolution, so H and W must be even; odd sizes are refused with a message rather
  than silently padded or encoded as yuv444p (which many players cannot decode). Lossy: expect a mean
  error of about 2/255 on smooth content and more at sharp colour edges.
- .mkv: FFV1 (lossless, any size): decoding gives back exactly the 8-bit frames that were written. Use it
  for round trips and for intermediate results.
- .gif: Pillow, looping forever, one 256-colour palette per frame (lossy). Pillow merges consecutive
  identical frames into one longer frame, so the playing time is kept but the frame count may shrink.
  GIF delays are whole 1/100 s, so 8 fps is stored as 0.12 s per frame (8.3 fps).
- Values are clamped to [0, 1] and rounded to 8 bits (round-to-nearest, so frames read from 8-bit
  sources survive a lossless round trip exactly).
- Files are written under a temporary name in the target folder and renamed at the end, so an error
  never leaves a partial file behind (`save_frames` does the same for each PNG).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from .files import atomic_path
from .frames import check_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# suffix -> (container format, codec, pixel format, codec options) for the PyAV writers. One encoder thread:
# x264's output depends on its thread count (which "auto" takes from the machine), so the same frames give
# the same bytes everywhere
_PYAV_WRITERS = {
    ".mp4": ("mp4", "libx264", "yuv420p", {"crf": "18", "threads": "1"}),
    ".mov": ("mov", "libx264", "yuv420p", {"crf": "18", "threads": "1"}),
    ".mkv": ("matroska", "ffv1", "bgr0", {"threads": "1"}),
}
WRITE_SUFFIXES = (*_PYAV_WRITERS, ".gif")
# frame rates the writers store as given: mp4/mkv keep fps as a fraction with a denominator up to 1001
MIN_FPS, MAX_FPS = 0.01, 1000


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def read_video(
    path: str | os.PathLike,
    start: int = 0,
    stride: int = 1,
    count: int | None = None,
    size: int | None = None,
    square: bool = False,
    resize: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    as_stored: bool = False,
) -> torch.Tensor:
    """Read frames start, start + stride, ... (at most `count`) of a video file or image folder.

    Returns (F, 3, H, W) float32 in [0, 1] with H and W multiples of 8; see the module docstring for
    how `size`, `square` and `resize` set the geometry. `as_stored=True` returns every pixel as stored
    instead, at any H and W (no crop; not with size, square or resize): what metrics must score. F is less than `count` when the video ends first:
    compare. `progress(frames read, frames wanted)` is called after each frame (for files only when `count`
    is given).
    """
    path = Path(path)
    _check_selection(path, start, stride, count)
    _check_size(size)
    _check_resize(resize, size, square)
    if as_stored and (size is not None or square or resize is not None):
        raise ValueError(f"{path}: as_stored=True reads the frames as stored; it takes no size, square or resize")
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder; check the path (relative paths start at {Path.cwd()})"
        )
    report = progress or (lambda done, total: None)
    if path.is_dir():
        frames = _read_folder(path, start, stride, count, report)
    else:
        frames = _read_file(path, start, stride, count, report)
    shaped = frames if as_stored else [_fit(frame, size, square, path, resize) for frame in frames]
    if len({f.shape for f in shaped}) > 1:
        sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames})
        raise ValueError(
            f"{path}: frames have different sizes ({', '.join(sizes)}); give all images the same size"
        )
    video = torch.from_numpy(np.stack(shaped))  # (F, H, W, 3) uint8
    return video.permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)


def _check_selection(path: Path, start: int, stride: int, count: int | None) -> None:
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"{path}: start must be an integer >= 0, got {start!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{path}: stride must be an integer >= 1, got {stride!r}")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"{path}: count must be an integer >= 1 or None (all frames), got {count!r}")


def _check_size(size: int | None) -> None:
    if size is None:
        return
    if not isinstance(size, int) or size < 64 or size % 8:
        raise ValueError(
            f"size must be a multiple of 8 that is at least 64 (SD 1.5 works on 8x smaller latents), got {size!r};"
            " try 256 or 512, or size=None to keep the resolution"
        )


def _check_resize(resize: tuple[int, int] | None, size: int | None, square: bool) -> None:
    if resize is None:
        return
    if size is not None or square:
        raise ValueError("resize=(H, W) sets the whole geometry; do not combine it with size or square")
    if (not isinstance(resize, tuple) or len(resize) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in resize)):
        raise ValueError(f"resize must be (height, width) in pixels, each at least 8, got {resize!r}")


def _wanted(start: int, stride: int, count: int | None) -> Iterator[int]:
    """The frame indices to keep, in order; endless when count is None."""
    k = 0
    while count is None or k < count:
        yield start + k * stride
        k += 1


def _read_file(path: Path, start: int, stride: int, count: int | None, report) -> list[np.ndarray]:
    """Decode the selected frames of a video file as (H, W, 3) uint8 arrays."""
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        if isinstance(error, PermissionError):  # PyAV's errors also derive from the matching OSError
            raise ValueError(f"{path}: permission denied; fix its permissions (chmod u+r)") from error
        raise ValueError(
            f"{path}: not a readable video ({error}); give an mp4/mov/webm/mkv/gif file or a folder of images"
        ) from error
    frames: list[np.ndarray] = []
    decoded = 0
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: the file has no video stream; give a video file or a folder of images")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = _wanted(start, stride, count)
        target = next(wanted)
        try:
            for frame in container.decode(stream):
                if decoded == target:
                    frames.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3)
                    if count:
                        report(len(frames), count)
                    target = next(wanted, None)
                    if target is None:
                        break  # lazy: everything needed has been decoded
                decoded += 1
        except av.FFmpegError as error:
            raise ValueError(
                f"{path}: decoding failed after {decoded} frames ({error}); the file may be damaged"
            ) from error
    if decoded == 0 and not frames:
        raise ValueError(
            f"{path}: the video stream has no decodable frames; check the file plays in a video player"
        )
    if not frames:
        raise ValueError(
            f"{path}: start={start} is beyond the end of the video ({decoded} frames); use start < {decoded}"
        )
    return frames


def _natural_key(name: str) -> tuple[list[int | str], str]:
    """Sort key putting frame2.png before frame10.png; the name itself breaks ties such as 1.png / 01.png."""
    # re.split with one group alternates text, number, text, ...: odd positions are the numbers,
    # so two keys always compare text with text and number with number
    parts = re.split(r"(\d+)", name)
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(parts)], name


def _read_folder(path: Path, start: int, stride: int, count: int | None, report) -> list[np.ndarray]:
    """Load the selected images of a folder (natural order) as (H, W, 3) uint8 arrays."""
    files = sorted(
        (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise ValueError(
            f"{path}: the folder has no images ({', '.join(IMAGE_SUFFIXES)}); put one image per frame in it"
        )
    if start >= len(files):
        raise ValueError(
            f"{path}: start={start} is beyond the end of the folder ({len(files)} images); use start < {len(files)}"
        )
    selected = files[start::stride][:count]
    frames = []
    for file in selected:
        try:
            with Image.open(file) as image:
                frames.append(_rgb8(image, file))  # (H, W, 3)
        except Image.DecompressionBombError as error:
            raise ValueError(f"{file}: the image is too large to decode safely ({error}); "
                             "shrink it to the size you want to work at (e.g. 512 px)") from error
        except PermissionError as error:
            raise ValueError(f"{file}: permission denied; fix its permissions (chmod u+r)") from error
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{file}: not a readable image ({error}); remove or replace it") from error
        report(len(frames), len(selected))
    return frames


def _rgb8(image: Image.Image, file: Path) -> np.ndarray:
    """One opened image as (H, W, 3) uint8 RGB, whatever its bit depth.

    Pillow opens a 16-bit greyscale PNG in an integer mode ("I;16", or "I" in older versions), which its
    convert("RGB") clips at 255, so nearly every pixel would read white: those values are scaled by
    255/65535 here and rounded. A 16-bit RGB PNG Pillow already reads as 8-bit RGB (the high byte of each
    value); that and 8-bit images convert as usual.
    """
    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.int64)  # (H, W)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{file}: {image.mode} image with values outside 0–65535; save it as an 8- or "
                             "16-bit PNG")
        grey = np.round(values * (255 / 65535)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)  # (H, W, 3)
    return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def _geometry(
    height: int, width: int, size: int | None, square: bool, resize: tuple[int, int] | None = None
) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """(resized (H1, W1) or None for no resize, final (H2, W2)) for a frame of height x width."""
    if resize is not None:
        return resize, (resize[0] // 8 * 8, resize[1] // 8 * 8)
    if size is None:
        if square:
            side = min(height, width) // 8 * 8
            return None, (side, side)
        return None, (height // 8 * 8, width // 8 * 8)
    if square:
        scale = size / min(height, width)
    else:
        scale = size / max(height, width)
    resized = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    if square:
        return resized, (size, size)
    return resized, (resized[0] // 8 * 8, resized[1] // 8 * 8)


def _fit(frame: np.ndarray, size: int | None, square: bool, path: Path,
         resize: tuple[int, int] | None = None) -> np.ndarray:
    """Resize (LANCZOS) and centre-crop one (H, W, 3) uint8 frame to the geometry of `_geometry`."""
    height, width = frame.shape[:2]
    resized, (out_h, out_w) = _geometry(height, width, size, square, resize)
    if out_h < 8 or out_w < 8:
        raise ValueError(
            f"{path}: a {width}x{height} frame would become {out_w}x{out_h}, too small for SD's 8x downsampling;"
            " use a larger size= or a less elongated video"
        )
    if resized is not None and resized != (height, width):
        image = Image.fromarray(frame).resize((resized[1], resized[0]), Image.Resampling.LANCZOS)
        frame = np.asarray(image)  # (H1, W1, 3)
        height, width = resized
    top, left = (height - out_h) // 2, (width - out_w) // 2
    return frame[top : top + out_h, left : left + out_w]  # (H2, W2, 3)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float = 8) -> Path:
    """Write (F, 3, H, W) frames in [0, 1] to .mp4/.mov (H.264), .mkv (lossless FFV1) or .gif.

    The parent folder is created if needed. Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(
            f"{path}: cannot write {suffix or 'files without a suffix'};"
            " use .mp4 or .mov (H.264), .mkv (lossless) or .gif"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not MIN_FPS <= fps <= MAX_FPS:
        raise ValueError(f"{path}: fps must be a number from {MIN_FPS} to {MAX_FPS}, got {fps!r}")
    pixels = to_uint8(frames, path)  # (F, H, W, 3)
    height, width = pixels.shape[1:3]
    if suffix in (".mp4", ".mov") and (height % 2 or width % 2):
        raise ValueError(
            f"{path}: H.264 yuv420p needs even sizes, got {width}x{height}; crop to"
            f" {width // 2 * 2}x{height // 2 * 2} (e.g. frames[..., :{height // 2 * 2}, :{width // 2 * 2}])"
            " or write .mkv (lossless) or .gif, which take any size"
        )
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name such as {path / ('video' + suffix)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            _write_gif(tmp, pixels, fps)
        else:
            _write_pyav(tmp, pixels, fps, *_PYAV_WRITERS[suffix])
    return path


def to_uint8(frames: torch.Tensor, path: Path | str) -> np.ndarray:
    """Validate (F, 3, H, W) frames and quantise them to (F, H, W, 3) uint8 (clamped, rounded)."""
    check_frames(frames, f"{path}: frames")
    values = frames.detach().to("cpu", torch.float32)
    if not torch.isfinite(values).all():
        raise ValueError(f"{path}: frames contain NaN or infinite values; check the computation that produced them")
    quantised = (values.clamp(0, 1) * 255).round().to(torch.uint8)
    return quantised.permute(0, 2, 3, 1).contiguous().numpy()  # (F, H, W, 3)


def _write_pyav(tmp: Path, pixels: np.ndarray, fps: float, fmt: str, codec: str, pix_fmt: str, options: dict) -> None:
    # the format is named explicitly because the temporary name has no video suffix
    # bitexact: no random segment id or date in the container, so equal frames give equal files
    with av.open(str(tmp), mode="w", format=fmt, container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = pixels.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = options
        for frame in pixels:
            # the encoder converts rgb24 to its pixel format (BT.601 matrix for yuv420p)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):  # flush frames the encoder still buffers
            container.mux(packet)


def _write_gif(tmp: Path, pixels: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(frame) for frame in pixels]
    # GIF stores delays in 1/100 s; Pillow takes milliseconds
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def save_frames(folder: str | os.PathLike, frames: torch.Tensor) -> list[Path]:
    """Save (F, 3, H, W) frames in [0, 1] as folder/00000.png, 00001.png, ... (lossless, 8-bit).

    Existing files with the same names are replaced; other files in the folder are left alone.
    Returns the paths written, in frame order.
    """
    folder = Path(folder)
    pixels = to_uint8(frames, folder)  # (F, H, W, 3)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; give a folder path for the PNG frames")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(pixels):
        path = folder / f"{index:05d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        paths.append(path)
    return paths


def side_by_side(*videos: torch.Tensor, labels: list[str] | None = None, gap: int = 0) -> torch.Tensor:
    """Concatenate videos (F, 3, H, W_i) along the width into (F, 3, H, ΣW_i + gaps), e.g. source | edit.

    `labels` (one per video) are written at each panel's top left, white on a dark box (Pillow's default
    font); `gap` white columns separate the panels."""
    if not videos:
        raise ValueError("side_by_side needs at least one video (F, 3, H, W)")
    for i, video in enumerate(videos):
        if not isinstance(video, torch.Tensor) or video.ndim != 4:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"side_by_side: video {i} must be a tensor (F, 3, H, W), got {shape}")
    first = videos[0].shape
    for i, video in enumerate(videos[1:], start=1):
        if video.shape[:3] != first[:3]:
            raise ValueError(
                f"side_by_side: video {i} has (F, C, H) = {tuple(video.shape[:3])} but video 0 has {tuple(first[:3])};"
                " read both with the same count and size"
            )
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"side_by_side: {len(labels)} labels for {len(videos)} videos; give one per video")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"side_by_side: gap must be a whole number of pixels, 0 or more; got {gap!r}")
    panels = [video if labels is None else _labelled(video, text) for video, text in zip(videos, labels or videos)]
    if gap:
        spacer = torch.ones(*first[:3], gap, dtype=videos[0].dtype, device=videos[0].device)  # (F, 3, H, gap)
        panels = [part for panel in panels for part in (spacer, panel)][1:]
    return torch.cat(panels, dim=3)  # (F, 3, H, ΣW + gaps)


LABEL_SHADE = 0.6  # how much the box behind a label darkens the frame


def _labelled(video: torch.Tensor, text: str) -> torch.Tensor:
    """`video` (F, 3, H, W) with `text` at its top left: drawn once as two masks, then painted on every frame."""
    height, width = video.shape[-2:]
    font = _font(max(10, min(32, height // 12)))
    box = Image.new("L", (width, height), 0)
    glyphs = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(glyphs)
    pad = 2
    text = _fitted(draw, font, text, width - 3 * pad)
    left, top, right, bottom = draw.textbbox((pad, pad), text, font=font)
    ImageDraw.Draw(box).rectangle((0, 0, right + pad, bottom + pad), fill=255)
    draw.text((pad, pad), text, fill=255, font=font)
    shade = torch.from_numpy(np.asarray(box, dtype=np.float32) / 255).to(video)  # (H, W)
    ink = torch.from_numpy(np.asarray(glyphs, dtype=np.float32) / 255).to(video)  # (H, W)
    return (video * (1 - LABEL_SHADE * shade)) * (1 - ink) + ink  # white text on a darkened box


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: one small bitmap font


def _fitted(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text` the default font can draw (the bitmap font only has Latin-1), cut with "..." to `width` pixels."""
    try:
        draw.textlength(text, font=font)
    except UnicodeEncodeError:
        text = text.encode("latin-1", "replace").decode("latin-1")
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."
