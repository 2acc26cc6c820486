"""Half precision on the CPU: every method of the tiny fixture in bf16 and fp16, against its float64 run.

Each run must finish without NaN or inf and stay within a measured bound of the float64 result (README,
"Half precision"): the mean absolute difference of the outputs (frames in [0, 1]; latents for x_T; the loss
for tuning). The bounds are the values measured on this fixture (2 steps, 3 frames of 64²) times about 1.5,
rounded up. The runs go through the device stand-in in half mode, so a float32 tensor that meets the half
precision activations outside an explicit cast fails them too.

The float32 islands (README, "Half precision") are each checked against a float32 evaluation of the same
rounded inputs: DDIM arithmetic and TokenFlow's cosine argmax here, the EM in test_em.py, the CLIP metrics in
test_clip_metrics.py, PSNR/SSIM in test_metrics.py, temporal consistency in test_consistency.py.
"""
from __future__ import annotations

import pytest
import torch

import stemref
from device_standin import DeviceMixError, DeviceStandIn, host
from stemref.edit import fatezero, tokenflow, tuned as tuned_edit, tuning
from stemref.scheduler import DDIMScheduler, _ddim_move

FRAMES = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STEM = dict(num_bases=4)
HALF = [torch.bfloat16, torch.float16]
# mean |half − float64| per output: (bf16, fp16) bounds, about 1.5 × the values measured (README)
BOUNDS = {
    "stem x_T": (0.031, 0.028),
    "stem": (0.035, 0.033),
    "1-frame": (0.019, 0.0027),
    "tokenflow": (0.042, 0.035),
    "fatezero": (0.061, 0.059),
    "tune-a-video loss": (0.00083, None),
    "ei2 loss": (0.0015, None),
    "tune-a-video edit": (0.033, 0.0044),
    "ei2 edit": (0.026, 0.0036),
}


class Runs:
    """Each method's output on FRAMES (2 steps) per model, as CPU float64; shared pieces computed once."""

    def __init__(self):
        self.memo = {}

    def get(self, sd, key: str, compute):
        if (sd.dtype, key) not in self.memo:
            self.memo[sd.dtype, key] = compute()
        return self.memo[sd.dtype, key]

    def stem(self, sd):
        invert = lambda: stemref.invert(sd, FRAMES, "a cat", steps=2, context="stem", **STEM)
        return self.get(sd, "stem inversion", invert)

    def tuned(self, sd, method: str):
        # a float16 model edits with the float64 tuning's tensors (float16 tuning is refused)
        dtype = torch.float64 if sd.dtype == torch.float16 else sd.dtype
        return self.memo[dtype, method + " tuned"] if dtype != sd.dtype else self.get(
            sd, method + " tuned", lambda: tuning.tune(sd, FRAMES, "a cat", method, steps=2, lr=1e-3))

    def run(self, sd, method: str) -> torch.Tensor:
        if method == "stem x_T":
            out = self.stem(sd).x_T
        elif method == "stem":
            out = stemref.reconstruct(sd, self.stem(sd))
        elif method == "1-frame":
            out = stemref.reconstruct(sd, stemref.invert(sd, FRAMES, "a cat", steps=2, context="1-frame"))
        elif method == "tokenflow":
            out = tokenflow.edit(sd, self.stem(sd), "a dog", batch=2, freeu=True)
        elif method == "fatezero":
            out = fatezero.edit(sd, FRAMES, "a cat on the grass", "a dog on the grass", steps=2, context="stem",
                                context_options=STEM, max_tokens=16, blend_words=(["cat"], ["dog"]),
                                blend_self_attention=True, blend_latents=True)
        elif method.endswith(" loss"):
            out = torch.tensor(self.tuned(sd, method.split()[0]).losses)
        else:
            name = method.split()[0]
            out = tuned_edit.edit(self.tuned(sd, name).model(sd), FRAMES, "a dog", name, steps=2)
        return host(out).double()


@pytest.fixture(scope="module")
def runs():
    return Runs()


@pytest.fixture(scope="module")
def half_sd(tiny_root):
    with DeviceStandIn(half=True) as dev:
        return {torch.bfloat16: stemref.load(tiny_root, dtype=torch.bfloat16),
                torch.float16: stemref.load(tiny_root, dtype=torch.float16, device=dev.device)}


@pytest.mark.parametrize("method, dtype", [
    pytest.param(m, dtype, id=f"{m}-{str(dtype)[6:]}") for m in BOUNDS for i, dtype in enumerate(HALF)
    if BOUNDS[m][i] is not None])  # float16 tuning is refused: test_float16_tuning_is_refused
def test_half_precision_run_stays_near_float64(tiny_loaded, half_sd, runs, method, dtype):
    """bf16 on the plain CPU; fp16 on the stand-in in half mode (one dtype is enough to catch a float32
    tensor beside the activations, and the stand-in costs time)."""
    bound = BOUNDS[method][HALF.index(dtype)]
    expected = runs.get(tiny_loaded, method, lambda: runs.run(tiny_loaded, method))
    with DeviceStandIn(half=True):
        out = runs.run(half_sd[dtype], method)
    assert torch.isfinite(out).all()
    difference = (out - expected).abs().mean().item()
    print(f"{method} {dtype}: mean |half - float64| = {difference:.3g}")
    assert difference <= bound


# |half − float64| of the CLIP metrics of FRAMES (tiny CLIP), (bf16, fp16): about 1.5 × measured (README)
CLIP_BOUNDS = {"clip_score": (0.13, 0.005), "clip_consistency": (3.3e-4, 4.2e-5)}


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_clip_metrics_in_half_precision(tiny_clip_dir, dtype):
    from stemref.clip_metrics import clip_metrics
    from stemref.loading import load_clip

    with DeviceStandIn(half=True) as dev:
        scores = clip_metrics(load_clip(tiny_clip_dir, dtype=dtype, device=dev.device), FRAMES, "a dog", "a cat")
    expected = clip_metrics(load_clip(tiny_clip_dir, dtype=torch.float64), FRAMES, "a dog", "a cat")
    assert scores["frame_accuracy"] == expected["frame_accuracy"]
    for name, bounds in CLIP_BOUNDS.items():
        assert abs(scores[name] - expected[name]) <= bounds[HALF.index(dtype)]


def test_float64_blend_weights_beside_fp16_outputs_are_caught(half_sd, runs):
    """The dtype half of c560cf2's bug, reintroduced: blend weights moved to the outputs' device but left in float64
    (PyTorch would silently promote the fp16 outputs). The stand-in's half mode must fail it."""
    from test_device import tokenflow_with_blend_weights

    sd = half_sd[torch.float16]
    buggy = tokenflow_with_blend_weights("self.weights.to(out.device)")
    mixed = r"aten.mul.Tensor mixes \['torch.float16', 'torch.float64'\]"
    with DeviceStandIn(half=True), pytest.raises(DeviceMixError, match=mixed):
        buggy.edit_latents(sd, runs.stem(sd), "a dog", batch=2)


def test_float16_tuning_is_refused(half_sd):
    with DeviceStandIn(half=True), pytest.raises(ValueError, match="underflow in float16"):
        tuning.tune(half_sd[torch.float16], FRAMES, "a cat", "tune-a-video", steps=1)


# ---- the float32 islands --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_ddim_arithmetic_is_float32_under_half(dtype):
    g = torch.Generator().manual_seed(1)
    x, eps = (torch.randn(2, 4, 8, 8, generator=g).to(dtype) for _ in range(2))
    s = DDIMScheduler()
    for t in (1, 21, 981):  # 1 − ᾱ_t ≈ 1e-3 at t = 1: what fp16 resolves to a few digits only
        for step in (s.step, s.inverse_step):
            out = step(eps, t, x, 50)
            assert out.dtype == dtype and torch.equal(out, step(eps.float(), t, x.float(), 50).to(dtype))
    # the island matters: the same update evaluated in the half dtype is different
    a_t, a_prev = s.alpha(1).to(dtype), s.alpha(-19).to(dtype)
    assert not torch.equal(_ddim_move(x, eps, a_t, a_prev, torch.zeros((), dtype=dtype)), s.step(eps, 1, x, 50))


def test_propagation_matches_tokens_in_float32_under_fp16():
    """Keyframe tokens 1e-3 apart: fp16 cosines tie, float32 ones tell them apart."""
    g = torch.Generator().manual_seed(2)
    N, C, h, d = 16, 32, 2, 4
    base = torch.randn(C, generator=g)
    keys = base + 1e-3 * torch.randn(N, C, generator=g)  # (N, C) one keyframe's tokens, nearly parallel
    tokens = base + 1e-3 * torch.randn(1, N, C, generator=g)  # (1, N, C) one frame
    outputs = torch.arange(3 * h * N * d, dtype=torch.float32).view(3, 1, h, N, d)  # distinct per token
    features = tokenflow.KeyframeFeatures(keys[None].half(), outputs.half())
    call = stemref.attention.AttnCall("up.attn1", False, stemref.RunInfo(frames=1), torch.cat([tokens] * 3).half())
    out = tokenflow.Propagation({"up.attn1": features}, 0, None)(None, None, None, call)
    # the reference: nearest keyframe token by float32 cosine of the same fp16-rounded tokens
    unit = lambda x: torch.nn.functional.normalize(x.half().float(), dim=-1)
    nearest = (unit(tokens[0]) @ unit(keys).T).argmax(-1)  # (N,)
    assert torch.equal(out.view(3, h, N, d), outputs[:, 0][:, :, nearest].half())
    nearest16 = (unit(tokens[0]).half() @ unit(keys).half().T).argmax(-1)
    assert not torch.equal(nearest16, nearest)  # the island matters: fp16 cosines pick other tokens


@pytest.mark.parametrize("dtype", HALF)
def test_other_float32_islands_under_half(dtype):
    """FreeU's FFT, FateZero's attention softmax, the tuning loss and EI²'s spectral norm: each equals the float32
    evaluation of the same rounded inputs (cast back where it returns the half dtype)."""
    from stemref.edit.fatezero_fusion import probabilities
    from stemref.freeu import fourier_filter
    from stemref.temporal import spectral_normalise

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 8, 8, generator=g).to(dtype)
    assert torch.equal(fourier_filter(x, 1, 0.5), fourier_filter(x.float(), 1, 0.5).to(dtype))
    q, k = (torch.randn(2, 16, 8, generator=g).to(dtype) for _ in range(2))
    scores = (q @ k.transpose(-1, -2)) * 8 ** -0.5  # the product in the half dtype, as on a GPU's tensor cores
    assert torch.equal(probabilities(q, k), torch.softmax(scores.float(), dim=-1).to(dtype))
    w = torch.randn(6, 5, generator=g).to(dtype)
    assert torch.equal(spectral_normalise(w), spectral_normalise(w.float()).to(dtype))
    eps, x0, noise = (torch.randn(3, 4, 8, 8, generator=g).to(dtype) for _ in range(3))
    unet = lambda x_t, t, context, info: eps  # a stand-in predictor: the loss's own arithmetic is under test
    loss = tuning.diffusion_loss(unet, x0, noise, torch.tensor([500]), None, DDIMScheduler(), None)
    assert loss.dtype == torch.float32 and loss == torch.nn.functional.mse_loss(eps.float(), noise.float())
