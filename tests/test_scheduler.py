"""DDIMScheduler against diffusers' DDIMScheduler / DDIMInverseScheduler on SD1.5's schedule.

float64 references: diffusers keeps alphas_cumprod in float32 and mixes those float32 scalars into a float64
sample, so its "float64" result carries float32-rounded coefficients. To get diffusers' formulas evaluated in
float64 on the same float32 schedule (what stemref does for float64 latents) the reference instances get
float64 copies of their schedule tensors; the schedule values themselves are unchanged (checked below).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler as RefDDIMInverse
from diffusers import DDIMScheduler as RefDDIM

from stemref.config import DDIMConfig
from stemref.scheduler import DDIMScheduler

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
            timestep_spacing="leading")
STEPS = [10, 50, 500]
SHAPE = (2, 4, 8, 8)  # (B, C, h, w)


def ref_ddim(steps: int, dtype: torch.dtype = torch.float32, **overrides) -> RefDDIM:
    ref = RefDDIM(**{**SD15, **overrides})
    ref.set_timesteps(steps)
    ref.alphas_cumprod = ref.alphas_cumprod.to(dtype)
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.to(dtype)
    return ref


def ref_inverse(steps: int, dtype: torch.dtype = torch.float32, **overrides) -> RefDDIMInverse:
    ref = RefDDIMInverse(**{**SD15, **overrides})
    ref.set_timesteps(steps)
    ref.alphas_cumprod = ref.alphas_cumprod.to(dtype)
    ref.initial_alpha_cumprod = ref.initial_alpha_cumprod.to(dtype)
    return ref


def randn(*shape, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    else:
        # Same float32 operations in the same order as diffusers: bit-identical.
        assert torch.equal(actual, expected), (actual - expected).abs().max()


def test_schedule_equals_diffusers():
    ours, ref = DDIMScheduler(), RefDDIM(**SD15)
    assert ours.alphas_cumprod.dtype == torch.float32 and ours.alphas_cumprod.shape == (1000,)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)
    assert ours.final_alpha_cumprod.item() == pytest.approx(0.99915, rel=1e-6)  # 1 - beta_start


def test_alpha_covers_both_ends():
    s = DDIMScheduler()
    assert torch.equal(s.alpha(981), s.alphas_cumprod[981])
    assert torch.equal(s.alpha(-19), s.alphas_cumprod[0])
    assert torch.equal(s.alpha(torch.tensor([0, -1, 999])),
                       torch.stack([s.alphas_cumprod[0], s.alphas_cumprod[0], s.alphas_cumprod[999]]))
    assert DDIMScheduler(DDIMConfig(set_alpha_to_one=True)).alpha(-1).item() == 1.0
    with pytest.raises(ValueError, match="timestep 1000"):
        s.alpha(1000)


@pytest.mark.parametrize("steps", [7, *STEPS])
def test_timesteps_equal_diffusers(steps):
    ours = DDIMScheduler().timesteps(steps)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref_ddim(steps).timesteps)


def test_timesteps_examples():
    assert DDIMScheduler().timesteps(50)[:3].tolist() == [981, 961, 941]
    assert DDIMScheduler().timesteps(50)[-1].item() == 1
    assert DDIMScheduler().timesteps(10).flip(0).tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]


@pytest.mark.parametrize("steps", [10, 50])
def test_inverse_order_equals_diffusers_inverse(steps):
    assert torch.equal(DDIMScheduler().timesteps(steps).flip(0), ref_inverse(steps).timesteps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [7, *STEPS])
def test_step_equals_diffusers_along_a_sampling_loop(steps, eta, dtype):
    ours, ref = DDIMScheduler(), ref_ddim(steps, dtype)
    x = randn(*SHAPE, seed=0, dtype=dtype)
    for i, t in enumerate(ref.timesteps):
        eps, z = randn(*SHAPE, seed=2 * i + 1, dtype=dtype), randn(*SHAPE, seed=2 * i + 2, dtype=dtype)
        expected = ref.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        actual = ours.step(eps, t, x, steps, eta=eta, noise=z)
        assert_matches(actual, expected)
        x = expected


def test_step_draws_noise_from_generator_like_diffusers():
    ours, ref = DDIMScheduler(), ref_ddim(50)
    x, eps = randn(*SHAPE, seed=0, dtype=torch.float32), randn(*SHAPE, seed=1, dtype=torch.float32)
    expected = ref.step(eps, 501, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    actual = ours.step(eps, 501, x, 50, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert_matches(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [7, *STEPS])
def test_inverse_step_equals_diffusers_along_an_inversion_loop(steps, dtype):
    ours, ref = DDIMScheduler(), ref_inverse(steps, dtype)
    x = randn(*SHAPE, seed=0, dtype=dtype)
    for i, t in enumerate(ref.timesteps):
        eps = randn(*SHAPE, seed=i + 1, dtype=dtype)
        expected = ref.step(eps, t, x).prev_sample
        assert_matches(ours.inverse_step(eps, t, x, steps), expected)
        x = expected


def test_inverse_step_with_alpha_to_one_equals_diffusers():
    ours, ref = DDIMScheduler(DDIMConfig(set_alpha_to_one=True)), ref_inverse(10, set_alpha_to_one=True)
    x, eps = randn(*SHAPE, seed=0, dtype=torch.float32), randn(*SHAPE, seed=1, dtype=torch.float32)
    assert_matches(ours.inverse_step(eps, 1, x, 10), ref.step(eps, 1, x).prev_sample)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_add_noise_equals_diffusers(dtype):
    ours, ref = DDIMScheduler(), RefDDIM(**SD15)
    x0, noise = randn(*SHAPE, seed=0, dtype=dtype), randn(*SHAPE, seed=1, dtype=dtype)
    per_sample = torch.tensor([1, 981])
    assert_matches(ours.add_noise(x0, noise, per_sample), ref.add_noise(x0, noise, per_sample))
    assert_matches(ours.add_noise(x0, noise, 501), ref.add_noise(x0, noise, torch.tensor(501)))


@pytest.mark.parametrize("steps", [10, 50])
def test_step_exactly_inverts_inverse_step_over_a_full_loop(steps):
    s = DDIMScheduler()
    x0 = randn(*SHAPE, seed=0)
    eps = {int(t): randn(*SHAPE, seed=int(t)) for t in s.timesteps(steps)}  # a fixed ε per timestep
    x = x0
    for t in s.timesteps(steps).flip(0):
        x_next = s.inverse_step(eps[int(t)], t, x, steps)
        torch.testing.assert_close(s.step(eps[int(t)], t, x_next, steps), x, rtol=0, atol=1e-12)
        x = x_next
    for t in s.timesteps(steps):
        x = s.step(eps[int(t)], t, x, steps)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32_then_cast(low):
    ours, ref, inv = DDIMScheduler(), ref_ddim(50), ref_inverse(50)
    x, eps, z = (randn(*SHAPE, seed=k, dtype=low) for k in range(3))
    x32, eps32, z32 = x.float(), eps.float(), z.float()
    cases = [
        (ours.step(eps, 21, x, 50, eta=1.0, noise=z), ref.step(eps32, 21, x32, eta=1.0, variance_noise=z32).prev_sample),
        (ours.inverse_step(eps, 21, x, 50), inv.step(eps32, 21, x32).prev_sample),
        (ours.add_noise(x, eps, 21), ref.add_noise(x32, eps32, torch.tensor(21))),
    ]
    for actual, expected32 in cases:
        assert actual.dtype == low
        assert torch.equal(actual, expected32.to(low))


@pytest.mark.parametrize("steps", [0, -1, 1001, 1000, 2.5, True, "50", None])
def test_bad_step_counts_raise(steps):
    s = DDIMScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="steps"):
        s.timesteps(steps)
    with pytest.raises(ValueError, match="steps"):
        s.step(x, 1, x, steps)
    with pytest.raises(ValueError, match="steps"):
        s.inverse_step(x, 1, x, steps)


def test_negative_eta_raises():
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="eta"):
        DDIMScheduler().step(x, 1, x, 50, eta=-0.5)
