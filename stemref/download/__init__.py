"""Fetch SD1.5's diffusers folder, or a CLIP for the metrics, from the Hugging Face hub (the library; the command
`python -m stemref.download` is stemref/cli/download.py, run by this package's __main__.py).

`--model` picks what (MODELS): SD1.5 (`sd15_files(variant)`), or OpenAI's CLIP ViT-L/14 or ViT-B/32 (their
config.json and model.safetensors only: never the pickled or TF/Flax copies beside them).
Standard library only (urllib). `download_files` fetches any list of repository files with these steps
(`download` is it for a model's files); for each file:

1. HEAD `{base_url}/{repo}/resolve/{revision}/{path}` to learn the size and sha256 before any body moves,
   so a complete file on disk is skipped without a GET. The hub answers the big LFS files (the weights)
   with a redirect to its CDN that carries `X-Linked-Size` and `X-Linked-Etag` (the file's sha256); small
   git files answer 200 with `Content-Length` and an `ETag` that is a git blob sha1, which is not checked.
   HEAD does not follow a redirect to another host: CDN URLs are signed for GET.
2. GET into `path.part`. When a `.part` is already there (an interrupted run), ask for the rest with
   `Range: bytes=N-` and append if the server answers 206; a 200 means it ignored the range, so start over.
3. Check size and sha256, and the content by kind (`content_problem`): a `.safetensors` file must have a
   whole safetensors header, a `.json` file must parse, a `.txt` file must be UTF-8 text. Weights need a
   sha256 (from the hub's LFS headers, or `pins`): a server that gives none is refused, and so is any
   `text/html` answer (a login, error or proxy page). Then rename into place: a final name only ever holds
   a verified file. An interrupted transfer keeps its `.part` for the next run; a file that fails a check
   loses it.

Redirects are followed by hand (at most MAX_REDIRECTS) so that the token is sent only to base_url's host and
never to the CDN, and so that the hub's headers on the redirect itself are not lost.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Callable

from ..files import safetensors_problem

DEFAULT_BASE_URL = "https://huggingface.co"
DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_TO = Path("weights/sd15")
VARIANTS = ("fp16", "fp32")
CLIP_FILES = ["config.json", "model.safetensors"]
# --model: (hub repository, its files (None: SD1.5's for the variant), default folder)
MODELS = {
    "sd15": (DEFAULT_REPO, None, DEFAULT_TO),
    "clip-vit-large-patch14": ("openai/clip-vit-large-patch14", CLIP_FILES, Path("weights/clip-vit-large-patch14")),
    "clip-vit-base-patch32": ("openai/clip-vit-base-patch32", CLIP_FILES, Path("weights/clip-vit-base-patch32")),
}
UNFINISHED = ".stemref-download-unfinished"  # in the folder while a download into it is not complete
CHUNK = 1 << 20  # bytes per read: large enough for speed, small enough for a lively progress line
MAX_REDIRECTS = 10
TIMEOUT_S = 60.0  # per connection attempt and per read, not for a whole file
PROGRESS_EVERY_S = 0.1
REDIRECTS = (301, 302, 303, 307, 308)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(Exception):
    """A file could not be fetched or did not pass its checks; the message names the URL and a way out."""


@dataclass(frozen=True)
class Progress:
    """One report to the `progress` callback of `download`."""
    path: str  # repository-relative, e.g. "unet/diffusion_pytorch_model.fp16.safetensors"
    status: str  # "skipped" (already complete), "downloading", or "done" (verified and in place)
    done: int  # bytes of this file on disk, a resumed prefix included
    total: int | None  # None when the server did not say
    rate: float  # bytes per second moved in this run (a resumed prefix does not count)


@dataclass(frozen=True)
class _Remote:
    """What the server says about a file; None where it says nothing."""
    size: int | None
    sha256: str | None


def sd15_files(variant: str = "fp16") -> list[str]:
    """The repository paths SD1.5 needs in the diffusers layout; the weights carry the variant's suffix."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(VARIANTS)}")
    suffix = ".fp16" if variant == "fp16" else ""
    return ["model_index.json",
            "unet/config.json", f"unet/diffusion_pytorch_model{suffix}.safetensors",
            "vae/config.json", f"vae/diffusion_pytorch_model{suffix}.safetensors",
            "text_encoder/config.json", f"text_encoder/model{suffix}.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
            "scheduler/scheduler_config.json"]


def download(to: str | Path, variant: str = "fp16", base_url: str = DEFAULT_BASE_URL, repo: str = DEFAULT_REPO,
             revision: str = "main", progress: Callable[[Progress], None] | None = None, token: str | None = None,
             timeout: float = TIMEOUT_S, files: list[str] | None = None, pins: dict[str, str] | None = None) -> Path:
    """Fetch SD1.5 (or the repository paths `files`) into the folder `to` (created if needed) and return it;
    complete files are kept as they are.

    `token` is sent as `Authorization: Bearer` to base_url's host only. `pins` maps repository paths to the
    sha256 they must have (for a known revision, or a mirror that sends no hashes). Raises ValueError for
    bad arguments and DownloadError when a file cannot be fetched or verified; no unverified file ever gets
    its final name.
    """
    files = sd15_files(variant) if files is None else files
    return download_files(to, files, base_url, repo, revision, progress, token, timeout, pins)


def download_files(to: str | Path, paths: list[str], base_url: str = DEFAULT_BASE_URL, repo: str = DEFAULT_REPO,
                   revision: str = "main", progress: Callable[[Progress], None] | None = None,
                   token: str | None = None, timeout: float = TIMEOUT_S, pins: dict[str, str] | None = None) -> Path:
    """Fetch the repository files `paths` into `to`, each checked as the module docstring says; see `download`."""
    base_url = _check_base_url(base_url, token)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        raise ValueError(f"repo={repo!r}: give a hub repository id such as {DEFAULT_REPO!r}")
    if not revision or revision.strip() != revision:
        raise ValueError(f"revision={revision!r}: give a branch, tag or commit such as 'main'")
    pins = {path: sha.lower() for path, sha in (pins or {}).items()}
    if bad := [path for path, sha in pins.items() if not SHA256_HEX.fullmatch(sha)]:
        raise ValueError(f"pins (--pin): {', '.join(bad)} must map to a sha256 of 64 hex digits")
    folder = Path(to)
    _check_folder(folder)
    (folder / UNFINISHED).touch()  # until every file is in place: a later run resumes, the loaders refuse
    client = _Client(origin=_origin(base_url), token=token, timeout=timeout)
    hints = _Hints(base_url=base_url, repo=repo)
    for path in paths:
        url = (f"{base_url}/{urllib.parse.quote(repo)}/resolve/{urllib.parse.quote(revision, safe='')}/"
               f"{urllib.parse.quote(path)}")
        _fetch(client, hints, url, folder / path, path, pins.get(path), progress)
    (folder / UNFINISHED).unlink()
    return folder


def unfinished(folder: str | Path) -> bool:
    """True for a folder that holds an unfinished download: one stopped before every file was in place (it
    holds the UNFINISHED marker), or one that holds no file at all (a first download that never connected)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return (folder / UNFINISHED).exists() or not any(p.is_file() for p in folder.rglob("*"))


def _check_folder(folder: Path) -> None:
    """`to` must be, or become, a folder we can write in: checked before any request."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"to={folder}: that is a file; give a folder to put the weights in")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"to={folder}: a part of that path is a file ({e.filename}); choose another folder") from e
    except OSError as e:
        raise ValueError(f"to={folder}: cannot create it ({e.strerror}); choose a folder you can write to") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"to={folder}: no permission to write there; choose a folder you can write to")


def content_problem(file: Path, path: str) -> str | None:
    """None when the downloaded `file` (repository path `path`) holds what its name promises; else what is wrong."""
    if path.endswith(".safetensors"):
        return safetensors_problem(file)
    if path.endswith((".json", ".txt")):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return "not UTF-8 text"
        if text.lstrip().startswith("<"):
            return "an HTML or XML page, not the file"
        if path.endswith(".json"):
            try:
                value = json.loads(text)
            except ValueError as e:
                return f"not valid JSON ({e})"
            if not isinstance(value, dict):
                return f"JSON, but a {type(value).__name__} where an object belongs"
    return None


@dataclass(frozen=True)
class _Hints:
    """What error messages need to suggest a fix."""
    base_url: str
    repo: str


def _fetch(client: _Client, hints: _Hints, url: str, dest: Path, name: str, pin: str | None,
           progress: Callable[[Progress], None] | None) -> None:
    report = progress or (lambda p: None)
    remote = client.head(url, hints)
    remote = _Remote(remote.size, _first(pin, remote.sha256))
    if dest.is_file() and _is_complete(dest, remote, name):
        report(Progress(name, "skipped", dest.stat().st_size, remote.size, 0.0))
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # Two tries at most: the second starts from zero, after the server refused the range we asked for.
    for resume in (True, False):
        offset = part.stat().st_size if resume and part.is_file() else 0
        if remote.size is not None and offset > remote.size:
            offset = 0  # longer than the file: not a prefix of it
        response, hops = client.get(url, offset, hints)
        with response:
            if offset and response.status == 416:
                continue  # the part already holds everything (or more); fetch it again whole
            if response.status == 206:
                start, total = _content_range(response.headers)
                if start != offset:
                    continue
                mode = "ab"
            elif response.status == 200:
                offset, mode, total = 0, "wb", _int(response.headers.get("Content-Length"))
            else:
                raise _http_error(response.status, response.reason, url, hints)
            if (response.headers.get_content_type() or "") == "text/html":
                raise DownloadError(f"{url} answered with an HTML page, not the file (a login, error or proxy "
                                    f"page?); check --hub-url, --repo and --revision.")
            linked = _remote_from(hops, response.headers if response.status == 200 else None)
            expected = _Remote(size=_first(remote.size, linked.size, total),
                               sha256=_first(remote.sha256, linked.sha256))
            if expected.sha256 is None and name.endswith(".safetensors"):
                raise DownloadError(f"{url}: the server gave no sha256 for these weights (the hub sends one in its "
                                    f"LFS headers; this server or mirror does not), and stemref does not accept "
                                    f"unverified weights. Use --hub-url {DEFAULT_BASE_URL}, or give the file's "
                                    f"sha256 with --pin {name}=SHA256 (download(..., pins={{path: sha256}})).")
            _stream(response, part, mode, offset, expected.size, name, url, report)
        _verify(part, expected, url, name)
        os.replace(part, dest)
        report(Progress(name, "done", dest.stat().st_size, expected.size, 0.0))
        return
    raise DownloadError(f"{url}: the server did not honour a range request from byte {offset}, even after "
                        f"starting over; delete {part} and try again.")


def _stream(response: http.client.HTTPResponse, part: Path, mode: str, offset: int, size: int | None, name: str,
            url: str, report: Callable[[Progress], None]) -> None:
    """Copy the body into `part`; a body cut short keeps what arrived, for the next run to resume."""
    promised = _int(response.headers.get("Content-Length"))
    received = 0
    start = last = time.monotonic()
    report(Progress(name, "downloading", offset, size, 0.0))
    try:
        f = open(part, mode)
    except OSError as e:
        raise _disk_error(e, part, size, offset) from e
    with f:
        while True:  # ends at the end of the body; every read is bounded by the socket timeout
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"download of {url} was interrupted after {offset + received} bytes ({e}); "
                                    f"run the same command again to resume.") from e
            if not chunk:
                break
            try:
                f.write(chunk)
            except OSError as e:
                raise _disk_error(e, part, size, offset + received) from e
            received += len(chunk)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                report(Progress(name, "downloading", offset + received, size, received / (now - start)))
            if size is not None and offset + received > size:
                break  # more than announced: _verify rejects it, no need to read on
    if promised is not None and received < promised:
        raise DownloadError(f"download of {url} was interrupted after {offset + received} bytes (the server "
                            f"announced {offset + promised}); run the same command again to resume.")
    elapsed = max(time.monotonic() - start, 1e-9)
    report(Progress(name, "downloading", offset + received, size, received / elapsed))


def _disk_error(e: OSError, part: Path, size: int | None, written: int) -> DownloadError:
    """Writing failed here, not on the network: say what to fix; "run again" alone would fail again."""
    if e.errno == errno.ENOSPC:
        need = f" (at least {size - written} more bytes)" if size is not None else ""
        return DownloadError(f"the disk holding {part.parent} is full after {written} bytes of {part.name}; free "
                             f"space{need} or pass --to on another disk. The {written} bytes are kept and the "
                             f"next run continues from them.")
    return DownloadError(f"cannot write {part}: {e.strerror or e}; choose a --to folder you can write to.")


def _verify(part: Path, expected: _Remote, url: str, name: str) -> None:
    """Size, sha256 where known, then the content by kind; a failing `.part` is deleted so the next run starts
    clean."""
    got = part.stat().st_size
    if expected.size is not None and got != expected.size:
        part.unlink()
        raise DownloadError(f"size mismatch for {url}: expected {expected.size} bytes, got {got}. "
                            f"The partial file was deleted; run again, and if it repeats, the server is "
                            f"serving a different file (check --hub-url).")
    if expected.sha256 is not None and (digest := _sha256_of(part)) != expected.sha256:
        part.unlink()
        raise DownloadError(f"sha256 mismatch for {url}: expected {expected.sha256}, got {digest}. "
                            f"The partial file was deleted; run again, and if it repeats, the server is "
                            f"serving a different file (check --hub-url).")
    if problem := content_problem(part, name):
        part.unlink()
        raise DownloadError(f"{url} sent {problem}; it was deleted. Check --hub-url, --repo and --revision.")


def _is_complete(file: Path, remote: _Remote, name: str) -> bool:
    """True only when the server gave a size to compare against and the content checks pass; weights need
    a known sha256, which must match."""
    if remote.size is None or file.stat().st_size != remote.size:
        return False
    if remote.sha256 is None:
        return not name.endswith(".safetensors") and content_problem(file, name) is None
    return _sha256_of(file) == remote.sha256


def _sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Client:
    """urllib with redirects followed here rather than inside urllib (see the module docstring)."""
    origin: str  # scheme://host:port of base_url, the only place the token goes
    token: str | None
    timeout: float

    def head(self, url: str, hints: _Hints) -> _Remote:
        response, hops = self._open(url, "HEAD", {}, hints, stay_on_origin=True)
        with response:
            if response.status in (405, 501):
                return _Remote(None, None)  # a mirror without HEAD: the GET's headers will have to do
            if response.status >= 400:
                raise _http_error(response.status, response.reason, url, hints)
            return _remote_from(hops + [response.headers], response.headers if response.status == 200 else None)

    def get(self, url: str, offset: int, hints: _Hints) -> tuple[http.client.HTTPResponse, list[Message]]:
        return self._open(url, "GET", {"Range": f"bytes={offset}-"} if offset else {}, hints, stay_on_origin=False)

    def _open(self, url: str, method: str, headers: dict[str, str], hints: _Hints,
              stay_on_origin: bool) -> tuple[http.client.HTTPResponse, list[Message]]:
        """Follow redirects; return the last response and the headers of each redirect on the way."""
        opener = urllib.request.build_opener(_EveryStatus)
        hops: list[Message] = []
        for _ in range(MAX_REDIRECTS + 1):
            sent = {"Accept-Encoding": "identity", "User-Agent": "stemref-download", **headers}
            if self.token and _origin(url) == self.origin:
                sent["Authorization"] = f"Bearer {self.token}"
            try:
                response = opener.open(urllib.request.Request(url, method=method, headers=sent), timeout=self.timeout)
            except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeout, DNS
                reason = getattr(e, "reason", e)
                raise DownloadError(f"cannot reach {url} ({reason}). Check your internet connection, or pass "
                                    f"--hub-url to use a mirror of {hints.base_url}.") from e
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or not location:
                return response, hops
            target = urllib.parse.urljoin(url, location)
            if stay_on_origin and _origin(target) != self.origin:
                return response, hops
            if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
                response.close()
                raise DownloadError(f"{url} redirected to {target}, which is not http(s); refusing to follow.")
            hops.append(response.headers)
            response.close()
            url = target
        raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects; check --hub-url.")


class _EveryStatus(urllib.request.HTTPErrorProcessor):
    """Hand back every response as it is (3xx and 4xx included), so _Client decides what each one means."""

    def http_response(self, request, response):
        return response

    https_response = http_response


def _remote_from(redirects: list[Message], final: Message | None) -> _Remote:
    """Size and sha256 from the hub's X-Linked-* headers on any redirect, else from a plain 200 answer."""
    headers = [h for h in redirects if h is not None]
    size = _first(*(_int(h.get("X-Linked-Size")) for h in headers))
    sha = _first(*(_sha256(h.get("X-Linked-Etag")) for h in headers))
    if final is not None:
        size = _first(size, _int(final.get("Content-Length")))
        sha = _first(sha, _sha256(final.get("ETag")))
    return _Remote(size, sha)


def _http_error(status: int, reason: str, url: str, hints: _Hints) -> DownloadError:
    if status in (401, 403):
        return DownloadError(
            f"HTTP {status} ({reason}) for {url}: access denied. If {hints.repo} is gated, accept the model "
            f"license at {hints.base_url}/{hints.repo} while logged in, then pass --token YOUR_TOKEN (or set "
            f"HF_TOKEN). The hub also answers 401 for a repository that does not exist: check --repo.")
    if status == 404:
        return DownloadError(
            f"HTTP 404 (not found) for {url}. Check --repo and --revision; a repository without fp16 files "
            f"needs --variant fp32.")
    return DownloadError(f"HTTP {status} ({reason}) for {url}. Try again later, or pass --hub-url to use a mirror.")


def _content_range(headers: Message) -> tuple[int | None, int | None]:
    """(first byte, total size) from `Content-Range: bytes a-b/total`; None where absent or unknown."""
    match = CONTENT_RANGE.fullmatch((headers.get("Content-Range") or "").strip())
    if not match:
        return None, None
    return int(match[1]), (None if match[3] == "*" else int(match[3]))


def _sha256(etag: str | None) -> str | None:
    """The sha256 inside an ETag such as `"ab12…"` or `W/"ab12…"`; None for other tags (md5, git sha1)."""
    if not etag:
        return None
    tag = etag.strip().removeprefix("W/").strip('"').lower()
    return tag if SHA256_HEX.fullmatch(tag) else None


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _first(*values):
    return next((v for v in values if v is not None), None)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def _check_base_url(base_url: str, token: str | None) -> str:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url={base_url!r}: give an http(s) address such as {DEFAULT_BASE_URL}")
    if token and parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"base_url={base_url!r} is plain http: a token would travel unencrypted; use https")
    return base_url.rstrip("/")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

