"""DDIM inversion and reconstruction (stemref.sampling loops, stemref.inversion) against closed forms and
manual loops written out here.

The invariants, from the scheduler's docstring (DDIM) and inversion.py's:
- an inverse DDIM step is the algebraic inverse of a sampling step when both see the same ε;
- with a predictor that depends on x, inversion uses ε(x_{t−1}, t) where sampling will use ε(x_t, t), so the
  round trip is only approximate, and the error vanishes (to first order) as the steps grow;
- `invert`/`reconstruct` are those loops run through the UNet, with the context's processor installed in
  the layers that match `layers`, the prompt as condition and, with guidance ≠ 1, the empty prompt as
  unconditional branch.

Dimension legend: S steps, F frames, h × w latent grid (H/8 × W/8).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from safetensors.torch import save_file

import stemref
import stemref.inversion
import stemref.sampling
from stemref.attention import RunInfo
from stemref.frames import NonFiniteError
from stemref.context import AllFrames, SparseCausal, context_processor
from stemref.inversion import InversionSettings
from stemref.sampling import ddim_inversion_loop, ddim_sample_loop
from stemref.scheduler import DDIMScheduler

CONTEXTS = ("1-frame", "2-frame", "all-frame", "stem")
STEM = {"num_bases": 4}  # a few bases keep the tiny runs fast and the bases far from the tokens themselves
PROMPT = "a mallard on a pond"

# SD1.5's schedule as diffusers builds it: the independent source of ᾱ_t for the closed forms below
REFERENCE = DiffusersDDIM(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False)
ALPHAS = REFERENCE.alphas_cumprod.double()  # (1000,)


def alpha(t: int) -> torch.Tensor:
    """ᾱ_t; the clean end of SD1.x's schedule (below the lowest timestep) is ᾱ_0, not 1 (set_alpha_to_one False)."""
    return ALPHAS[max(t, 0)]


def ascending(steps: int) -> list[int]:
    """The inversion timesteps: "leading" spacing with offset 1, e.g. [1, 21, …, 981] for 50 steps."""
    return [k * (1000 // steps) + 1 for k in range(steps)]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


# ---------------------------------------------------------------------------------------------------------
# The loops with closed-form noise predictors


@pytest.mark.parametrize("steps", [10, 50])
def test_inversion_then_sampling_is_exact_for_a_fixed_eps(steps):
    scheduler = DDIMScheduler()
    x0, eps = randn(2, 4, 8, 8, seed=0), randn(2, 4, 8, 8, seed=1)
    fixed = lambda x, t, i: eps  # noqa: E731
    path = ddim_inversion_loop(scheduler, x0, fixed, steps)
    assert len(path) == steps + 1
    torch.testing.assert_close(ddim_sample_loop(scheduler, path[-1], fixed, steps), x0, rtol=0, atol=1e-10)
    # With one ε everywhere the DDIM update keeps x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ fixed, so the path is in closed form:
    # x_t = √ᾱ_t x̂_0 + √(1−ᾱ_t) ε, starting from x_0 at the clean level ᾱ_0.
    x0_hat = (x0 - (1 - alpha(0)).sqrt() * eps) / alpha(0).sqrt()
    for x_t, t in zip(path[1:], ascending(steps)):
        torch.testing.assert_close(x_t, alpha(t).sqrt() * x0_hat + (1 - alpha(t)).sqrt() * eps, rtol=0, atol=1e-12)


class GaussianData:
    """The ideal noise predictor of data x_0 ~ N(m, s²I) (s = 0: a single point m), and its exact DDIM ODE.

    x_t = √ᾱ x_0 + √(1−ᾱ) ε is N(√ᾱ m, (ᾱ s² + 1 − ᾱ) I), so E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ m) / (ᾱ s² + 1 − ᾱ).
    In DDIM's ODE coordinates y = x/√ᾱ, σ = √((1−ᾱ)/ᾱ) it reads dy/dσ = ε = σ (y − m)/(s² + σ²), solved by
    y − m = c √(s² + σ²): the exact flow keeps z = (x_t − √ᾱ_t m)/√(ᾱ_t s² + 1 − ᾱ_t) constant.
    For s = 0 the trajectories are straight lines in (σ, y) with the constant slope ε = z, and a DDIM step
    (an Euler step in (σ, y)) follows them exactly: sampling is exact at any number of steps. Inversion is
    still not, since it evaluates ε at the level it starts from (x_{t−1}) with the ᾱ of the level it goes to.
    For s > 0 neither direction is exact; both errors are first order in the step size.
    """

    def __init__(self, m: torch.Tensor, s: float):
        self.m, self.s2 = m, s * s

    def eps(self, x: torch.Tensor, t: int, step: int) -> torch.Tensor:
        a = alpha(t)
        return (1 - a).sqrt() * (x - a.sqrt() * self.m) / (a * self.s2 + 1 - a)

    def z(self, x: torch.Tensor, t: int) -> torch.Tensor:
        a = alpha(t)
        return (x - a.sqrt() * self.m) / (a * self.s2 + 1 - a).sqrt()

    def flow(self, x: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
        """The exact ODE solution at t_to through x at t_from."""
        a = alpha(t_to)
        return a.sqrt() * self.m + (a * self.s2 + 1 - a).sqrt() * self.z(x, t_from)


def test_single_point_sampling_is_exact_at_any_number_of_steps():
    data = GaussianData(randn(4, 8, 8, seed=2), s=0.0)
    for steps in (2, 7, 50):
        x_T = randn(4, 8, 8, seed=3)
        top = ascending(steps)[-1]
        expected = data.flow(x_T, top, -1)  # the clean end, ᾱ_0
        torch.testing.assert_close(ddim_sample_loop(DDIMScheduler(), x_T, data.eps, steps), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("s", [0.0, 0.5], ids=["single-point", "gaussian"])
def test_round_trip_error_shrinks_with_steps(s):
    # "leading" spacing ends lower for fewer steps (5 steps stop at t = 801, 2 steps at 501) and most of the
    # error is made at high noise, so counts below 5 are not comparable with the rest.
    counts = (5, 10, 25, 50, 100)
    scheduler = DDIMScheduler()
    data = GaussianData(m=randn(4, 8, 8, seed=4), s=s)
    x0 = data.m + s * randn(4, 8, 8, seed=5) if s else data.m
    round_trip, to_exact = [], []
    for steps in counts:
        path = ddim_inversion_loop(scheduler, x0, data.eps, steps)
        round_trip.append(rms(ddim_sample_loop(scheduler, path[-1], data.eps, steps) - x0))
        to_exact.append(rms(path[-1] - data.flow(x0, -1, ascending(steps)[-1])))
    assert all(b < a for a, b in zip(round_trip, round_trip[1:])), round_trip
    assert all(b < a for a, b in zip(to_exact, to_exact[1:])), to_exact
    assert round_trip[0] > 1e-4  # the predictor depends on x: inversion is really approximate here
    if s:
        # first order: doubling the steps about halves the error
        assert 0.4 < round_trip[-1] / round_trip[-2] < 0.6, round_trip
        assert 0.4 < to_exact[-1] / to_exact[-2] < 0.6, to_exact


# ---------------------------------------------------------------------------------------------------------
# invert / reconstruct with the tiny UNet, against loops written out here


def video(frames: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(F, 3, size, size) in [0, 1]."""
    return torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def processor(context: str, seed: int = 0):
    """A fresh processor, seeded as invert/reconstruct seed theirs (only "stem" draws random numbers)."""
    return context_processor(context, generator=torch.Generator().manual_seed(seed),
                             **(STEM if context == "stem" else {}))


def self_attention(proc):
    return lambda name: proc if name.endswith("attn1") else None


def unet_eps(sd, prompt: str, frames: int, guidance: float = 1.0):
    """ε of the whole video; with guidance ≠ 1 the unconditional video runs as a separate UNet call."""
    cond = sd.encode_prompt(prompt).expand(frames, -1, -1)  # (F, L, D)
    uncond = sd.encode_prompt("").expand(frames, -1, -1)

    def eps(x: torch.Tensor, t: int, step: int) -> torch.Tensor:
        e_cond = sd.unet(x, t, cond, RunInfo(frames=frames, step=step))
        if guidance == 1.0:
            return e_cond
        e_uncond = sd.unet(x, t, uncond, RunInfo(frames=frames, step=step))
        return e_uncond + guidance * (e_cond - e_uncond)
    return eps


def manual_inversion(sd, x0: torch.Tensor, eps, steps: int, choose) -> torch.Tensor:
    """x_0 and the latents at every ascending timestep (S + 1, F, 4, h, w), scheduler and UNet by hand."""
    path = [x0]
    with torch.no_grad(), sd.unet.attention(choose):
        for i, t in enumerate(ascending(steps)):
            path.append(sd.scheduler.inverse_step(eps(path[-1], t, i), t, path[-1], steps))
    return torch.stack(path)


def manual_sampling(sd, x_T: torch.Tensor, eps, steps: int, choose) -> torch.Tensor:
    x = x_T
    with torch.no_grad(), sd.unet.attention(choose):
        for i, t in enumerate(reversed(ascending(steps))):
            x = sd.scheduler.step(eps(x, t, i), t, x, steps)
    return x


@pytest.fixture(scope="module")
def gentle_sd(tiny_root):
    """A private tiny SD whose UNet output layer is scaled by 0.02.

    Inversion's error is about (how fast ε changes with x) × (how far x moves in one step). The random tiny
    UNet's ε changes ~6× as fast as x, so at tens of steps its round trip is nowhere near the small-step
    regime (the error even grows from 5 to 10 steps); a trained UNet is far gentler. Scaling its ε by 0.02
    puts the tiny UNet in that regime at 5–50 steps, where the error must shrink with the steps.
    """
    sd = stemref.load(tiny_root, dtype=torch.float64)
    with torch.no_grad():
        sd.unet.conv_out.weight.mul_(0.02)
        sd.unet.conv_out.bias.mul_(0.02)
    return sd


@pytest.mark.parametrize("context", CONTEXTS)
def test_reconstructed_latents_approach_x0_as_steps_grow(gentle_sd, context):
    sd, frames = gentle_sd, video(3)
    errors = []
    for steps in (5, 10, 25, 50):
        inv = stemref.invert(sd, frames, PROMPT, steps=steps, context=context, **(STEM if context == "stem" else {}))
        x0_hat = manual_sampling(sd, inv.x_T, unet_eps(sd, PROMPT, 3), steps, self_attention(processor(context)))
        errors.append(rms(x0_hat - inv.latents[0]))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("context", CONTEXTS)
def test_invert_and_reconstruct_are_the_manual_loops(tiny_sd, context):
    sd, frames, steps = tiny_sd, video(3), 3
    inv = stemref.invert(sd, frames, PROMPT, steps=steps, context=context, seed=5,
                         **(STEM if context == "stem" else {}))
    eps = unet_eps(sd, PROMPT, 3)
    expected = manual_inversion(sd, sd.encode_frames(frames), eps, steps, self_attention(processor(context, seed=5)))
    torch.testing.assert_close(inv.latents, expected, rtol=0, atol=1e-10)
    x0_hat = manual_sampling(sd, inv.x_T, eps, steps, self_attention(processor(context, seed=5)))
    torch.testing.assert_close(stemref.reconstruct(sd, inv), sd.decode_latents(x0_hat), rtol=0, atol=1e-10)


def test_guided_inversion_and_reconstruction_are_manual_cfg_loops(tiny_sd):
    # all-frame: a cross-frame context, so mixing the conditional and unconditional videos would show
    sd, frames, steps, guidance = tiny_sd, video(2), 2, 3.0
    inv = stemref.invert(sd, frames, PROMPT, steps=steps, context="all-frame", guidance=guidance)
    eps = unet_eps(sd, PROMPT, 2, guidance)
    choose = self_attention(AllFrames())
    torch.testing.assert_close(inv.latents, manual_inversion(sd, sd.encode_frames(frames), eps, steps, choose),
                               rtol=0, atol=1e-10)
    x0_hat = manual_sampling(sd, inv.x_T, eps, steps, choose)
    torch.testing.assert_close(stemref.reconstruct(sd, inv), sd.decode_latents(x0_hat), rtol=0, atol=1e-10)
    # and guidance really changed something
    unguided = manual_sampling(sd, inv.x_T, unet_eps(sd, PROMPT, 2), steps, choose)
    assert (unguided - x0_hat).abs().max() > 1e-3


def test_inversion_layout_and_timesteps(tiny_sd):
    sd, frames = tiny_sd, video(1, size=64)
    inv = stemref.invert(sd, frames, PROMPT, steps=50, context="1-frame")
    assert inv.latents.shape == (51, 1, 4, 8, 8)  # (S + 1, F, 4, h, w)
    assert torch.equal(inv.latents[0], sd.encode_frames(frames))
    assert inv.timesteps == list(range(1, 1000, 20)) == ascending(50)
    REFERENCE.set_timesteps(50)
    assert inv.timesteps == REFERENCE.timesteps.flip(0).tolist()
    assert torch.equal(inv.x_T, inv.latents[50])
    assert torch.equal(inv.at(1), inv.latents[1]) and torch.equal(inv.at(21), inv.latents[2])
    assert torch.equal(inv.at(981), inv.x_T)
    for off_path in (0, 20, 1001):
        with pytest.raises(KeyError, match="not on this 50-step"):
            inv.at(off_path)


def test_one_frame_context_in_batches_equals_one_call(tiny_sd):
    frames = video(3)
    whole = stemref.invert(tiny_sd, frames, PROMPT, steps=3, context="1-frame")
    batched = stemref.invert(tiny_sd, frames, PROMPT, steps=3, context="1-frame", batch=1)
    torch.testing.assert_close(batched.latents, whole.latents, rtol=0, atol=1e-10)
    # and 1-frame means what it says: each frame is inverted as if it were alone
    for f in range(3):
        alone = stemref.invert(tiny_sd, frames[f:f + 1], PROMPT, steps=3, context="1-frame")
        torch.testing.assert_close(whole.latents[:, f:f + 1], alone.latents, rtol=0, atol=1e-10)
    torch.testing.assert_close(stemref.reconstruct(tiny_sd, batched, batch=2), stemref.reconstruct(tiny_sd, whole),
                               rtol=0, atol=1e-10)


def test_with_one_frame_the_deterministic_contexts_are_plain_self_attention(tiny_sd):
    frames = video(1, seed=3)
    plain = manual_inversion(tiny_sd, tiny_sd.encode_frames(frames), unet_eps(tiny_sd, PROMPT, 1), 3,
                             lambda name: None)  # the UNet's own attention everywhere
    for context in ("1-frame", "2-frame", "all-frame"):
        inv = stemref.invert(tiny_sd, frames, PROMPT, steps=3, context=context)
        torch.testing.assert_close(inv.latents, plain, rtol=0, atol=1e-10, msg=context)


def test_stem_is_deterministic_for_a_seed(tiny_sd):
    frames = video(2)
    runs = [stemref.invert(tiny_sd, frames, PROMPT, steps=2, context="stem", seed=seed, **STEM) for seed in (7, 7, 8)]
    assert torch.equal(runs[0].latents, runs[1].latents)
    assert (runs[0].latents[-1] - runs[2].latents[-1]).abs().max() > 1e-6


def test_layers_regex_restricts_the_context(tiny_sd):
    sd, frames, steps = tiny_sd, video(3), 3
    up = r"^up_blocks.*attn1$"
    inv = stemref.invert(sd, frames, PROMPT, steps=steps, context="2-frame", layers=up)
    chosen = [n for n in sd.unet.attention_layers if n.startswith("up_blocks.") and n.endswith(".attn1")]
    assert len(chosen) == 9  # 3 decoder levels with attention × 3 transformer layers each
    sparse = SparseCausal()
    expected = manual_inversion(sd, sd.encode_frames(frames), unet_eps(sd, PROMPT, 3), steps,
                                lambda name: sparse if name in chosen else None)
    torch.testing.assert_close(inv.latents, expected, rtol=0, atol=1e-10)
    everywhere = stemref.invert(sd, frames, PROMPT, steps=steps, context="2-frame")
    assert (everywhere.x_T - inv.x_T).abs().max() > 1e-6  # the restriction matters


# ---------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_round_trip(tiny_sd, tmp_path):
    inv = stemref.invert(tiny_sd, video(2), PROMPT, steps=2, context="stem", seed=3, **STEM)
    path = inv.save(tmp_path / "mallard.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mallard.safetensors"]
    loaded = stemref.Inversion.load(path)
    assert loaded.latents.dtype == inv.latents.dtype and torch.equal(loaded.latents, inv.latents)
    assert loaded.timesteps == inv.timesteps == [1, 501]
    assert loaded.settings == inv.settings
    assert loaded.settings.options == STEM and loaded.settings.seed == 3 and loaded.settings.context == "stem"
    assert torch.equal(stemref.reconstruct(tiny_sd, loaded), stemref.reconstruct(tiny_sd, inv))


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no inversion file"):
        stemref.Inversion.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "weights.safetensors"
    save_file({"latents": torch.zeros(2, 1, 4, 8, 8)}, plain)  # right tensor name, no stemref metadata
    with pytest.raises(ValueError, match="not a stemref inversion file"):
        stemref.Inversion.load(plain)
    other = tmp_path / "other.safetensors"
    save_file({"latents": torch.zeros(1)}, other, metadata={"stemref": '{"format": "something/9"}'})
    with pytest.raises(ValueError, match="not a stemref inversion file"):
        stemref.Inversion.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a stemref inversion file"):
        stemref.Inversion.load(garbage)


def damaged(tmp_path, latents: torch.Tensor, meta: str) -> object:
    path = tmp_path / "damaged.safetensors"
    save_file({"latents": latents}, path, metadata={"stemref": meta})
    return path


@pytest.mark.parametrize("meta, match", [
    ('{"format": "stemref.inversion/1", ', "metadata is not JSON"),
    ('["stemref.inversion/1"]', "not a stemref inversion file"),
    ('{"format": "stemref.inversion/1", "settings": {"prompt": "x"}}', "timesteps must be a list of integers"),
    ('{"format": "stemref.inversion/1", "timesteps": [1, "501"], "settings": {"prompt": "x"}}',
     "timesteps must be a list of integers"),
    ('{"format": "stemref.inversion/1", "timesteps": [501, 1], "settings": {"prompt": "x"}}', "ascending"),
    ('{"format": "stemref.inversion/1", "timesteps": [1, 501, 751], "settings": {"prompt": "x"}}',
     "do not hold the 4"),
    ('{"format": "stemref.inversion/1", "timesteps": [1, 501]}', "settings must be an object"),
    ('{"format": "stemref.inversion/1", "timesteps": [1, 501], "settings": {"prompt": "x", "colour": 1}}',
     "settings must be an object"),
    ('{"format": "stemref.inversion/1", "timesteps": [1, 501], "settings": {"prompt": "x", "steps": "2"}}',
     "settings steps have the wrong type"),
], ids=["not-json", "not-an-object", "no-timesteps", "string-timestep", "descending", "count", "no-settings",
        "unknown-setting", "steps-a-string"])
def test_load_refuses_damaged_metadata_with_value_error(tmp_path, meta, match):
    with pytest.raises(ValueError, match=match):
        stemref.Inversion.load(damaged(tmp_path, torch.zeros(3, 1, 4, 8, 8), meta))


def test_load_trusts_the_stored_timesteps_over_settings_steps(tiny_sd, tmp_path):
    inv = stemref.invert(tiny_sd, video(2), PROMPT, steps=2, context="all-frame")
    meta = '{"format": "stemref.inversion/1", "timesteps": [1, 501], "settings": {"prompt": "%s", ' \
           '"steps": 50, "context": "all-frame"}}' % PROMPT
    loaded = stemref.Inversion.load(damaged(tmp_path, inv.latents, meta))
    assert loaded.settings.steps == 2 and loaded.timesteps == [1, 501]
    assert torch.equal(stemref.reconstruct(tiny_sd, loaded), stemref.reconstruct(tiny_sd, inv))


def test_reconstruct_refuses_timesteps_of_another_schedule(tiny_sd):
    inv = stemref.invert(tiny_sd, video(2), PROMPT, steps=2, context="all-frame")
    moved = stemref.Inversion(inv.latents, [1, 401], inv.settings)
    with pytest.raises(ValueError, match="not this scheduler's 2-step DDIM path"):
        stemref.reconstruct(tiny_sd, moved)


def test_non_finite_results_raise(tiny_sd, monkeypatch):
    """A NaN noise prediction (fp16 overflow) must not come back as NaN latents or a black image."""
    def nan_noise(sd, x, *args):
        return torch.full_like(x, float("nan"))

    monkeypatch.setattr(stemref.inversion, "predict_noise", nan_noise)
    monkeypatch.setattr(stemref.sampling, "predict_noise", nan_noise)
    with pytest.raises(NonFiniteError, match="inverted latents contain .* NaN or infinite.*float32"):
        stemref.invert(tiny_sd, video(2), PROMPT, steps=2, context="all-frame")
    with pytest.raises(NonFiniteError, match="generated latents"):
        stemref.txt2img(tiny_sd, PROMPT, steps=1, size=64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size="64"), "size must be an int or \\(height, width\\)"),
    (dict(size=(64,)), "size must be an int or \\(height, width\\)"),
    (dict(size=(64, 60)), "multiples of 8"),
    (dict(guidance=float("inf")), "guidance must be a finite number"),
])
def test_txt2img_bad_arguments(tiny_sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        stemref.txt2img(tiny_sd, PROMPT, steps=1, **kwargs)


def test_failed_save_leaves_no_file(tmp_path):
    inv = stemref.Inversion(torch.zeros(2, 1, 4, 8, 8), [1], InversionSettings(PROMPT, steps=1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inv.save(tmp_path / "missing" / "inv.safetensors")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        inv.save(tmp_path / "taken")  # a folder is in the way: the write succeeds, the final rename fails
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and not any((tmp_path / "taken").iterdir())


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("frames, match", [
    (torch.rand(3, 32, 32, 3, dtype=torch.float64), r"\(F, 3, H, W\)"),  # channels last
    (torch.rand(3, 32, 32, dtype=torch.float64), r"\(F, 3, H, W\)"),  # no frame axis
    (torch.rand(0, 3, 32, 32, dtype=torch.float64), r"\(F, 3, H, W\)"),  # no frames at all
    (torch.rand(2, 3, 36, 32, dtype=torch.float64), "multiple of 8"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "floating point"),
    ([[0.0]], "torch.Tensor"),
    (torch.rand(2, 3, 32, 32, dtype=torch.float64) * 255, r"must be in \[0, 1\].*divide 8-bit frames by 255"),
    (torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1, r"must be in \[0, 1\].*\(x \+ 1\) / 2"),
    (torch.full((2, 3, 32, 32), float("nan"), dtype=torch.float64), "NaN or infinite"),
    (torch.rand(2, 3, 32, 32, dtype=torch.float64).where(torch.arange(32) != 5, float("inf")), "NaN or infinite"),
], ids=["channels-last", "no-frame-axis", "empty", "not-multiple-of-8", "uint8", "list", "0-255", "minus-1-to-1",
        "nan", "inf"])
def test_bad_frames(tiny_sd, frames, match):
    with pytest.raises(ValueError, match=match):
        stemref.invert(tiny_sd, frames, PROMPT, steps=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(context="3-frame"), "unknown context '3-frame'"),
    (dict(context="stem", batch=2), "only the 1-frame context"),
    (dict(context="all-frame", batch=1), "only the 1-frame context"),
    (dict(context="1-frame", batch=0), "batch must be at least 1"),
    (dict(layers="attn1("), "not a valid regular expression"),
    (dict(layers=r"^nothing$"), "matches no attention layer"),
    (dict(prompt="a very long prompt " * 40), "tokens long"),
    (dict(context="1-frame", num_bases=8), "takes no options"),
    (dict(steps=0), "steps must be"),
    (dict(context="1-frame", guidance=float("nan")), "guidance must be a finite number"),
    (dict(context="stem", num_bases=2), "STEM needs at least 2 tokens"),  # one 32×32 frame: 1 token deep down
], ids=["context", "batch-stem", "batch-all-frame", "batch-0", "bad-regex", "regex-matches-nothing",
        "long-prompt", "option-for-wrong-context", "zero-steps", "nan-guidance", "stem-one-tiny-frame"])
def test_bad_settings(tiny_sd, kwargs, match):
    kwargs = {"prompt": PROMPT, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        stemref.invert(tiny_sd, video(1), **kwargs)


def test_reconstruct_checks_its_batch(tiny_sd):
    inv = stemref.invert(tiny_sd, video(2), PROMPT, steps=1, context="all-frame")
    with pytest.raises(ValueError, match="only the 1-frame context"):
        stemref.reconstruct(tiny_sd, inv, batch=1)


def test_vae_and_steps_report_progress(tiny_sd):
    calls = {"encode": [], "steps": [], "decode": []}

    def log(name):
        return lambda done, total: calls[name].append((done, total))

    frames = video(3)
    torch.testing.assert_close(tiny_sd.encode_frames(frames, batch=2, progress=log("encode")),
                               tiny_sd.encode_frames(frames), rtol=0, atol=1e-12)  # batches change only rounding
    inv = stemref.invert(tiny_sd, frames, PROMPT, steps=2, context="all-frame", progress=log("steps"),
                         vae_progress=log("encode"))
    stemref.reconstruct(tiny_sd, inv, progress=log("steps"), vae_progress=log("decode"))
    assert calls == {"encode": [(2, 3), (3, 3), (3, 3)], "steps": [(1, 2), (2, 2)] * 2, "decode": [(3, 3)]}


def test_load_refuses_nan_latents(tmp_path):
    latents = torch.zeros(3, 1, 4, 8, 8)
    latents[1, 0, 2, 3, 3] = float("nan")
    meta = '{"format": "stemref.inversion/1", "timesteps": [1, 501], "settings": {"prompt": "x"}}'
    with pytest.raises(ValueError, match="damaged.*1 NaN or infinite values"):
        stemref.Inversion.load(damaged(tmp_path, latents, meta))


def test_api_type_errors_are_clear(tiny_sd):
    """A prompt that is not a string, latents that are not SD1.x's 4 channels: one clear TypeError/ValueError."""
    with pytest.raises(TypeError, match="a prompt must be a string, got int"):
        stemref.invert(tiny_sd, video(2), prompt=123, steps=2)
    with pytest.raises(ValueError, match=r"\(S \+ 1, F, 4, h, w\).*4 channels.*\(3, 2, 8, 8, 8\)"):
        stemref.Inversion(torch.zeros(3, 2, 8, 8, 8), [1, 501], InversionSettings(PROMPT, steps=2))
    with pytest.raises(ValueError, match=r"\(F, 4, h, w\).*got \(2, 8, 8, 8\)"):
        tiny_sd.decode_latents(torch.zeros(2, 8, 8, 8, dtype=torch.float64))
