"""The on-disk cache (stemref.edit.cache): an entry is trusted only when it is intact, is the entry of the key
asked for (its identity is inside the file), and its contents pass the reader's checks; anything else is
dropped with one line and recomputed. A failed cache write never loses the result."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors import SafetensorError

from stemref.edit.cache import Cache, key_of
from stemref.edit.tuning import Tuned, tune
from stemref.inversion import Inversion, InversionSettings

FRAMES = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def inversion(value: float = 0.5, frames: int = 2) -> Inversion:
    latents = torch.full((3, frames, 4, 2, 3), value, dtype=torch.float64)  # 2 steps, 16×24 frames
    return Inversion(latents, [1, 501], InversionSettings("a cat", steps=2))


def description(prompt: str = "a cat") -> dict:
    return {"kind": "inversion", "frames": "digest", "prompt": prompt, "steps": 2}


def read(path):
    return Inversion.load(path).check_of(FRAMES)


@pytest.fixture
def cache(tmp_path):
    notices = []
    c = Cache(tmp_path, "inversions", notice=notices.append)
    c.notices = notices
    return c


def test_a_sound_entry_is_reused_silently(cache):
    key = key_of(description())
    assert cache.put(key, description(), inversion()) == cache.path(key)
    got = cache.get(key, description(), read)
    assert torch.equal(got.latents, inversion().latents) and cache.notices == []


def test_an_entry_copied_over_another_key_is_dropped(cache):
    """Another clip's inversion, with its checksum, copied over a key: the checksum passes, the identity not."""
    mine, theirs = description(), description("a dog")
    cache.put(key_of(theirs), theirs, inversion(0.25))
    path = cache.path(key_of(mine))
    os.replace(cache.path(key_of(theirs)), path)
    os.replace(cache.path(key_of(theirs)).with_suffix(".sha256"), path.with_suffix(".sha256"))
    assert cache.get(key_of(mine), mine, read) is None
    assert not path.exists() and not path.with_suffix(".sha256").exists()
    assert len(cache.notices) == 1 and "another key" in cache.notices[0] and "computing it again" in cache.notices[0]


def test_an_entry_without_its_identity_is_dropped(cache):
    """Written without the identity (as stemref wrote entries before), with a matching checksum."""
    key = key_of(description())
    cache.folder.mkdir(parents=True)
    path = inversion().save(cache.path(key))
    path.with_suffix(".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    assert cache.get(key, description(), read) is None
    assert "which inputs" in cache.notices[0]


@pytest.mark.parametrize("entry, problem", [
    (inversion(float("nan")), "NaN"),
    (inversion(frames=3), "not one of 2 frames"),  # wrong shape for the frames it is asked for
])
def test_an_entry_whose_contents_fail_is_dropped_with_one_line(cache, entry, problem):
    key = key_of(description())
    cache.put(key, description(), entry)
    assert cache.get(key, description(), read) is None
    assert not cache.path(key).exists()
    assert len(cache.notices) == 1 and problem in cache.notices[0] and "\n" not in cache.notices[0]
    assert "--dtype" not in cache.notices[0]  # not the misleading half-precision hint


def test_a_tuned_entry_missing_tensors_is_dropped(tiny_sd, tmp_path):
    notices = []
    cache = Cache(tmp_path, "tuned", notice=notices.append)
    tuned = tune(tiny_sd, FRAMES[:, :, :16, :16], "a cat", steps=1)
    key = key_of(description())
    missing = next(k for k in tuned.tensors if "attn_temp" in k)
    partial = Tuned(tuned.method, tuned.options, {k: v for k, v in tuned.tensors.items() if k != missing}, tuned.base,
                    tuned.settings, tuned.losses)
    cache.put(key, description(), partial)
    assert cache.get(key, description(), lambda path: Tuned.load(path, tiny_sd)) is None
    assert len(notices) == 1 and "missing" in notices[0]
    cache.put(key, description(), tuned)
    assert cache.get(key, description(), lambda path: Tuned.load(path, tiny_sd)).tensors.keys() == tuned.tensors.keys()


def test_a_failed_cache_write_keeps_the_result_and_warns(cache):
    """A cache folder that cannot be written (here: a file in its place): a warning, no exception, nothing left."""
    cache.folder.parent.mkdir(parents=True, exist_ok=True)
    cache.folder.write_text("not a folder")
    key = key_of(description())
    assert cache.put(key, description(), inversion()) is None
    assert len(cache.notices) == 1 and cache.notices[0].startswith("warning: could not write")
    assert "only the cache write is skipped" in cache.notices[0]


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),  # its own type
])
def test_a_write_that_fails_midway_leaves_nothing(cache, error):
    """The disk fills while the entry is written: the entry and its checksum are both gone."""
    class Full:
        def save(self, path, cache=None):
            path.write_bytes(b"x" * 10)
            raise error
    key = key_of(description())
    assert cache.put(key, description(), Full()) is None
    assert list(cache.folder.iterdir()) == []
    assert "No space left on device" in cache.notices[0]
