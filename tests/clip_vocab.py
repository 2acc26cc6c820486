"""Test helper: SD1.5's `tokenizer/vocab.json` and `merges.txt`, derived from OpenAI's CLIP vocabulary.

The hub files cannot be downloaded here, but the `openai-clip` package ships `bpe_simple_vocab_16e6.txt.gz`,
from which the two files are rebuilt byte for byte (md5 8ac6de0c… for vocab.json, d2bc1079… for merges.txt):

- the gz's line 0 is a version header, lines 1..48894 are the merges in rank order;
- the vocabulary is the 256 byte-level characters, the same characters with `</w>`, one entry per merge
  (the merged pair joined), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49,408 entries.

Install the package without its dependencies (its `clip.py` would pull torchvision):
`pip install --no-deps openai-clip`. It is located with `find_spec` rather than imported for the same reason.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48_894  # 49408 - 256 - 256 - 2
INSTALL_HINT = "pip install --no-deps openai-clip"


def clip_gz_path() -> Path:
    """Path of OpenAI's BPE file inside the installed `clip` package; skips the calling test if it is absent."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"OpenAI's CLIP vocabulary is not installed; run `{INSTALL_HINT}`")
    path = Path(spec.submodule_search_locations[0]) / GZ_NAME
    if not path.is_file():
        pytest.skip(f"the installed `clip` package has no {GZ_NAME}; run `{INSTALL_HINT}`")
    return path


def byte_characters() -> list[str]:
    """GPT-2/CLIP byte-level alphabet in vocabulary order: printable bytes map to themselves, the other 68
    bytes to the code points 256, 257, … in byte order. Written out here independently of stemref."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    points, extra = [], 0
    for b in range(256):
        if b in printable:
            points.append(b)
        else:
            points.append(256 + extra)
            extra += 1
    # vocabulary order is the printable bytes first, then the remapped ones
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(points[b]) for b in order]


@functools.lru_cache(maxsize=1)
def derived_files() -> tuple[str, str]:
    """(vocab.json text, merges.txt text), derived once per test session."""
    with gzip.open(clip_gz_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 1 + N_MERGES]
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab_text = json.dumps(vocab, ensure_ascii=False, sort_keys=True)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_text, merges_text


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write SD1.5's `vocab.json` and `merges.txt` into `folder` (created if needed) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text = derived_files()
    (folder / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder
