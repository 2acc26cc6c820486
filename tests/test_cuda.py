"""The CUDA test subset (`pytest -m cuda`, run by bench/gpu.sh): the methods on a real GPU in fp16.

On a machine without CUDA every test here is skipped with the reason; the same paths run on the CPU against
the device stand-in (test_device.py) and in half precision (test_half.py). Here they run on the GPU: no
device mix, finite outputs in fp16, within test_half.py's fp16 bounds of the CPU float64 run, and tuning
with fp32 master weights under fp16 autocast.
"""
from __future__ import annotations

import pytest
import torch

import stemref
from stemref.edit import fatezero, tokenflow, tuned as tuned_edit, tuning
from test_half import BOUNDS, CLIP_BOUNDS, FRAMES, STEM

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs these)")]
FP16 = 1  # the fp16 column of test_half.BOUNDS


@pytest.fixture(scope="module")
def gpu_sd(tiny_root):
    return stemref.load(tiny_root, dtype=torch.float16, device="cuda")


def close_to(out: torch.Tensor, expected: torch.Tensor, method: str) -> None:
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    assert (out.double().cpu() - expected).abs().mean().item() <= BOUNDS[method][FP16]


def test_stem_inversion_reconstruct_and_tokenflow_in_fp16(gpu_sd, tiny_loaded):
    inv = stemref.invert(gpu_sd, FRAMES, "a cat", steps=2, context="stem", **STEM)
    ref = stemref.invert(tiny_loaded, FRAMES, "a cat", steps=2, context="stem", **STEM)
    close_to(inv.x_T, ref.x_T, "stem x_T")
    close_to(stemref.reconstruct(gpu_sd, inv), stemref.reconstruct(tiny_loaded, ref), "stem")
    close_to(tokenflow.edit(gpu_sd, inv, "a dog", batch=2, freeu=True),
             tokenflow.edit(tiny_loaded, ref, "a dog", batch=2, freeu=True), "tokenflow")


def test_fatezero_with_blending_and_a_spilling_store_in_fp16(gpu_sd, tiny_loaded, tmp_path):
    options = dict(steps=2, context="stem", context_options=STEM, max_tokens=16, blend_words=(["cat"], ["dog"]),
                   blend_self_attention=True, blend_latents=True, memory_budget=0)
    prompts = ("a cat on the grass", "a dog on the grass")
    out = fatezero.edit(gpu_sd, FRAMES, *prompts, store_dir=tmp_path / "g", **options)
    ref = fatezero.edit(tiny_loaded, FRAMES, *prompts, store_dir=tmp_path / "c", **options)
    close_to(out, ref, "fatezero")


@pytest.mark.parametrize("method", ["tune-a-video", "ei2"])
def test_tuning_under_fp16_autocast_and_tuned_editing(tiny_root, gpu_sd, method):
    sd32 = stemref.load(tiny_root, dtype=torch.float32, device="cuda")
    tuned = tuning.tune(sd32, FRAMES, "a cat", method, steps=2, lr=1e-3, autocast="fp16", checkpointing=True)
    assert all(torch.isfinite(torch.tensor(tuned.losses)))
    out = tuned_edit.edit(tuned.model(gpu_sd), FRAMES, "a dog", method, steps=2)
    assert out.device.type == "cuda" and torch.isfinite(out).all()


def test_clip_metrics_on_the_gpu(tiny_clip_dir):
    from stemref.clip_metrics import clip_metrics
    from stemref.loading import load_clip

    gpu = clip_metrics(load_clip(tiny_clip_dir, dtype=torch.float16, device="cuda"), FRAMES, "a dog", "a cat")
    cpu = clip_metrics(load_clip(tiny_clip_dir, dtype=torch.float64), FRAMES, "a dog", "a cat")
    for name, bounds in CLIP_BOUNDS.items():
        assert abs(gpu[name] - cpu[name]) <= bounds[FP16]
