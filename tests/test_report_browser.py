"""index.html opened in a real headless Chromium: every video plays, every picture decodes, nothing is fetched
from the network.

A tiny-fixture edit writes its output folder; Chromium opens its index.html from the file system with every
network route blocked (host names resolve nowhere, the proxy is a dead port). The page's own script writes
each <video>'s readyState and duration and each image's decode state into
<pre id="media-state">, which `--dump-dom` hands back. Chromium's net log lists every request the page made:
none may leave the file system. A screenshot is taken too.

Chromium comes from the system packages (`apt-get install chromium`; .ci/run installs it). Without it these
tests skip and say so, except where STEMREF_REQUIRE_BROWSER=1 (CI), where they fail.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from stemref.cli.edit import main as edit_main
from stemref.report import Video, write_report
from stemref.video import write_video

CLIP = Path(__file__).parent.parent / "examples" / "bunny.mp4"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BLOCKED_NETWORK = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        message = ("NO HEADLESS CHROMIUM: the browser tests of index.html did not run. Install it with "
                   "`apt-get install chromium` (Debian/Ubuntu); CI always has it")
        if os.environ.get("STEMREF_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        warnings.warn(message)
        pytest.skip(message)
    return found


def chromium(browser: str, page: Path, profile: Path, *extra: str) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *BLOCKED_NETWORK, "--virtual-time-budget=15000", *extra, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def media_state(dom: str) -> list[dict]:
    found = re.search(r'<pre id="media-state"[^>]*>(.*?)</pre>', dom, re.S)
    assert found, "the page's script wrote no media state"
    return json.loads(html.unescape(found.group(1)))


def page_requests(net_log: Path) -> list[str]:
    """The network requests the page made, from Chromium's net log: the browser's own background requests have no
    initiator ("not an origin"); a file: page's have the opaque origin "null"."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"] if e["type"] == start and "url" in e.get("params", {})
            and e["params"].get("initiator") != "not an origin"]


def outside_links(text: str) -> list[str]:
    """Links in a page that leave its folder: absolute or protocol-relative src/href, stylesheets, CSS urls."""
    return re.findall(r"""(?:src|href)\s*=\s*["']?(?:[a-z][a-z0-9+.-]*:|//)[^"'\s>]*|<link\b|@import|url\(""", text, re.I)


def check_page(browser: str, page: Path, tmp_path: Path, videos: int, images: int) -> list[dict]:
    assert not outside_links(page.read_text()), "the page refers outside its folder"
    net_log = tmp_path / "net-log.json"
    media = media_state(chromium(browser, page, tmp_path / "profile", "--dump-dom", f"--log-net-log={net_log}"))
    assert [m["tag"] for m in media].count("video") == videos and [m["tag"] for m in media].count("img") == images
    failed = [m for m in media if not m["ok"]]
    assert not failed, f"media that did not load in Chromium: {failed}"
    for m in media:
        if m["tag"] == "video":
            assert m["readyState"] >= 2 and m["duration"] > 0
    requests = page_requests(net_log)
    assert not [url for url in requests if not url.startswith("file:")], f"the page reached for the network: {requests}"
    return media


def test_edit_report_loads_in_chromium(browser, tiny_root, tmp_path):
    out = tmp_path / "edit"
    assert edit_main([str(CLIP), "--source", "a rabbit on a hill", "--target", "a bear on a hill", "--weights",
                      str(tiny_root), "--out", str(out), "--cache", str(tmp_path / "cache"), "--frames", "5",
                      "--size", "96", "--steps", "2", "--batch", "2", "--num-bases", "8"]) == 0
    pngs = sorted(p.name for p in (out / "explain").iterdir())
    assert pngs == ["bases-2x3.png", "bases-3x6.png", "edit-01-correspondence.png", "features-pca.png"]
    media = check_page(browser, out / "index.html", tmp_path, videos=3, images=len(pngs))
    durations = {m["src"]: m["duration"] for m in media if m["tag"] == "video"}
    fps = json.loads((out / "metrics.json").read_text())["fps"]
    assert durations["source.mp4"] == pytest.approx(5 / fps, rel=0.2)
    text = (out / "index.html").read_text()
    assert "TokenFlow keyframes" in text and "<svg" in text and "a bear on a hill" in text
    shot = tmp_path / "screenshot.png"
    chromium(browser, out / "index.html", tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400")
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # the page drew videos and pictures, not a blank or error page


def test_unplayable_video_falls_back_to_an_animated_gif(browser, tmp_path):
    frames = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    write_video(tmp_path / "video.mkv", frames, 8)  # lossless FFV1: no browser decodes it
    write_video(tmp_path / "video.mp4", frames, 8)
    page = write_report(tmp_path, "fallback", videos=[Video("lossless", "video.mkv", frames, 8),
                                                      Video("h264", "video.mp4", frames, 8)],
                        settings={"fps": 8}, metrics={"rows": [{"a": 1.0}]})
    assert (tmp_path / "video.gif").is_file()
    check_page(browser, page, tmp_path, videos=1, images=1)


def test_the_checks_catch_a_page_that_reaches_the_network(browser, tmp_path):
    """The two network checks work: the link is found in the text, and the request in Chromium's net log."""
    page = tmp_path / "index.html"
    page.write_text("<!doctype html><body><img src='http://example.com/x.png'></body>")
    assert outside_links(page.read_text()) == ["src='http://example.com/x.png"]
    net_log = tmp_path / "net-log.json"
    chromium(browser, page, tmp_path / "profile", "--dump-dom", f"--log-net-log={net_log}")
    assert page_requests(net_log) == ["http://example.com/x.png"]
