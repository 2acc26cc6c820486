"""index.html for an output folder: the videos, every setting, the metrics and the pictures, on one page.

The page is self-contained: relative links only, styles, plots (SVG) and a small script inline, no network.
Videos the browser can play (H.264 mp4 in yuv420p at even sizes: what video.write_video writes for .mp4)
are <video> elements; any other video (lossless .mkv) is shown as an animated GIF written beside it.
Pictures (explain.figures.Picture) are PNG files under `explain/` or inline SVG, each with its caption.

The script at the end of the page reports, for each <video>, its readyState and duration and, for each image,
whether it decoded, in a line at the top of the page and as JSON in <pre id="media-state">, so a person sees
at once when a video does not play, and a headless browser can check it (tests/test_report_browser.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .explain.figures import Picture
from .video import to_uint8, write_video

PLAYABLE = (".mp4",)  # H.264 yuv420p: plays in every browser
PICTURES = "explain"  # the folder of the PNG pictures

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } figcaption { color: #444; max-width: 60em; margin-top: .3em; }
video, figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
table { border-collapse: collapse; font-size: .9em; } td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } #media-summary { color: #555; }
"""

SCRIPT = """
(function () {
  const media = Array.from(document.querySelectorAll("video, img"));
  const state = media.map(el => ({ tag: el.tagName.toLowerCase(), src: el.getAttribute("src"), ok: null }));
  const show = () => {
    document.getElementById("media-state").textContent = JSON.stringify(state);
    const pending = state.filter(s => s.ok === null).length, bad = state.filter(s => s.ok === false).length;
    document.getElementById("media-summary").textContent = pending ? `loading ${pending} of ${state.length} media…`
      : bad ? `${bad} of ${state.length} videos and pictures did not load` : `all ${state.length} videos and pictures loaded`;
  };
  media.forEach((el, i) => {
    const s = state[i];
    if (s.tag === "video") {
      const loaded = () => { s.readyState = el.readyState; s.duration = el.duration;
        s.ok = el.readyState >= 2 && isFinite(el.duration) && el.duration > 0; show(); };
      el.addEventListener("loadeddata", loaded);
      el.addEventListener("error", () => { s.ok = false; s.error = el.error ? el.error.code : -1; show(); });
      if (el.readyState >= 2) loaded();
    } else {
      el.decode().then(() => { s.ok = el.naturalWidth > 0; s.width = el.naturalWidth; show(); },
                       () => { s.ok = false; show(); });
    }
  });
  show();
})();
"""


@dataclass
class Video:
    label: str
    file: str  # relative to the report's folder
    frames: torch.Tensor  # (F, 3, H, W) in [0, 1]: for the fallback
    fps: float = 8.0


def write_report(folder: Path, title: str, *, summary: str = "", videos: list[Video] = (),
                 settings: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                 pictures: list[Picture] = (), links: list[tuple[str, str]] = (), notes: list[str] = ()) -> Path:
    """Write folder/index.html (and the pictures' PNGs, and GIFs for videos a browser cannot play)."""
    folder = Path(folder)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>",
             "<p id='media-summary'></p><pre id='media-state' hidden></pre>"]
    if summary:
        parts.append(f"<p>{escape(summary)}</p>")
    if links:
        parts.append("<ul>" + "".join(f"<li><a href='{escape(href)}'>{escape(label)}</a></li>"
                                      for label, href in links) + "</ul>")
    if videos:
        parts.append("<h2>Videos</h2>")
        parts.extend(_video(folder, v) for v in videos)
    if pictures:
        parts.append("<h2>What the method did</h2>")
        parts.extend(_picture(folder, p) for p in pictures)
    parts.extend(f"<p>{escape(note)}</p>" for note in notes)
    if metrics:
        parts.append("<h2>Metrics</h2>" + _table(metrics))
    if settings:
        parts.append("<h2>Settings</h2>" + _table(settings))
    parts.append(f"<script>{SCRIPT}</script></body></html>\n")
    path = folder / "index.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path


def _video(folder: Path, v: Video) -> str:
    if Path(v.file).suffix.lower() in PLAYABLE:
        media = (f"<video src='{escape(v.file)}' controls loop muted autoplay playsinline preload='auto' "
                 f"width='{max(v.frames.shape[-1], 320)}'></video>")
    else:  # e.g. lossless FFV1 .mkv, which browsers do not decode: an animated GIF beside it
        gif = Path(v.file).with_suffix(".gif").name
        write_video(folder / gif, v.frames, v.fps)
        media = f"<img src='{escape(gif)}' alt='{escape(v.label)}'>"
    return (f"<figure>{media}<figcaption>{escape(v.label)} (<a href='{escape(v.file)}'>{escape(v.file)}</a>)"
            "</figcaption></figure>")


def _picture(folder: Path, p: Picture) -> str:
    if p.svg is not None:
        body = p.svg
    elif p.file is not None:
        body = f"<img src='{escape(p.file)}' alt='{escape(p.title)}'>"
    else:
        file = f"{PICTURES}/{p.name}.png"
        (folder / PICTURES).mkdir(exist_ok=True)
        Image.fromarray(to_uint8(p.image[None], file)[0]).save(folder / file)
        body = f"<img src='{escape(file)}' alt='{escape(p.title)}'>"
    return f"<figure><h3>{escape(p.title)}</h3>{body}<figcaption>{escape(p.caption)}</figcaption></figure>"


def _table(data: dict[str, Any]) -> str:
    """A two-column table of every (nested) entry; lists of records become one table of their own."""
    rows = []
    for key, value in _flat(data):
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows.append(f"<tr><th>{escape(key)}</th><td>{_records(value)}</td></tr>")
        else:
            rows.append(f"<tr><th>{escape(key)}</th><td class='{_kind(value)}'>{escape(_text(value))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _records(records: list[dict]) -> str:
    flat = [dict(_flat(r)) for r in records]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td class='{_kind(r.get(c))}'>{escape(_text(r.get(c)))}</td>" for c in columns)
                   + "</tr>" for r in flat)
    return f"<table><tr>{head}</tr>{body}</table>"


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flat(value, name + "."))
        else:
            out.append((name, value))
    return out


def _kind(value: Any) -> str:
    return "n" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_text, value))
    return str(value)

