"""STEM's EM (stemref.em) against a naive loop implementation of the equations in em.py's docstring.

The naive EM below works on one head at a time, token by token and basis by basis, in float64; it is the
independent reference for em_bases and for the EM attention in test_context.py.

It is also the reference for em.plain_em (the paper's lines, all tokens at once), which in turn is the
reference for every chunking of em_bases here and for em_bases sharded over processes in test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch

from stemref.em import em_bases, em_iteration, plain_em, responsibilities, weighted_means

EPS = 1e-4
H, T, D, DV, K = 2, 37, 8, 5, 6


def naive_e_step(k: torch.Tensor, mu: torch.Tensor, tau: float) -> torch.Tensor:
    """z (T, K) for one head: k (T, d), mu (K, d); softmax over bases of (k·μ̂ − rowmax)/τ, μ̂ = μ/(‖μ‖+eps)."""
    mu_hat = [m / (m.norm() + EPS) for m in mu]
    z = torch.empty(k.shape[0], mu.shape[0], dtype=torch.float64)
    for t in range(k.shape[0]):
        logits = torch.stack([torch.dot(k[t], m) for m in mu_hat])
        e = torch.exp((logits - logits.max()) / tau)
        z[t] = e / e.sum()
    return z


def naive_em(k: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, iters: int, tau: float):
    """(μ, ν) for one head from k (T, d), v (T, dv) and initial bases mu (K, d), in float64."""
    k, v, mu = k.double(), v.double(), mu.double()
    for _ in range(iters):
        z = naive_e_step(k, mu, tau)
        z_bar = torch.empty_like(z)
        for j in range(z.shape[1]):
            z_bar[:, j] = z[:, j] / (z[:, j].sum() + EPS)
        mu = torch.stack([sum(z_bar[t, j] * k[t] for t in range(k.shape[0])) for j in range(z.shape[1])])
    nu = torch.stack([sum(z_bar[t, j] * v[t] for t in range(v.shape[0])) for j in range(z.shape[1])])
    return mu, nu


def naive_init(k: torch.Tensor, num_bases: int, seed: int, noise_dtype=torch.float64) -> torch.Tensor:
    """Initial bases (..., h, K, d): per-(head, channel) mean + unbiased std · N(0, 1), the noise drawn from
    torch.Generator(seed) in the EM's compute dtype (float64 for float64 keys, else float32)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((*k.shape[:-2], num_bases, k.shape[-1]), generator=g, dtype=noise_dtype).double()
    k = k.double()
    return k.mean(dim=-2, keepdim=True) + k.std(dim=-2, keepdim=True) * noise


def naive_em_heads(k, v, mu0, iters, tau):
    """naive_em over every head of (..., h, T, d) inputs."""
    lead = k.shape[:-2]
    kf, vf, mf = k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:]), mu0.reshape(-1, *mu0.shape[-2:])
    pairs = [naive_em(a, b, m, iters, tau) for a, b, m in zip(kf, vf, mf)]
    mu = torch.stack([p[0] for p in pairs]).reshape(*lead, *mu0.shape[-2:])
    nu = torch.stack([p[1] for p in pairs]).reshape(*lead, mu0.shape[-2], v.shape[-1])
    return mu, nu


def clustered_tokens(seed: int, lead=(H,), dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys around a few centres (as diffusion features are) plus noise, and unrelated values."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(*lead, 4, D, generator=g, dtype=torch.float64)
    which = torch.randint(0, 4, (T,), generator=g)
    k = centres[..., which, :] + 0.5 * torch.randn(*lead, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(*lead, T, DV, generator=g, dtype=torch.float64)
    return k.to(dtype), v.to(dtype)


def test_responsibilities_are_a_softmax_over_bases():
    k, _ = clustered_tokens(0)
    mu = naive_init(k, K, 1)
    z = responsibilities(k, mu, 0.01)
    assert z.shape == (H, T, K) and z.dtype == torch.float64
    torch.testing.assert_close(z.sum(-1), torch.ones(H, T, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (z >= 0).all()
    for h in range(H):
        torch.testing.assert_close(z[h], naive_e_step(k[h], mu[h], 0.01), rtol=0, atol=1e-12)


@pytest.mark.parametrize("em", [plain_em, em_bases])
@pytest.mark.parametrize("iters,tau", [(5, 0.01), (1, 0.01), (3, 0.5)])
def test_em_with_init_equals_naive_em(em, iters, tau):
    k, v = clustered_tokens(2)
    mu0 = naive_init(k, K, 3)
    mu, nu = em(k, v, num_bases=K, iters=iters, tau=tau, init=mu0)
    ref_mu, ref_nu = naive_em_heads(k, v, mu0, iters, tau)
    assert mu.shape == (H, K, D) and nu.shape == (H, K, DV)
    torch.testing.assert_close(mu, ref_mu, rtol=0, atol=1e-10)
    torch.testing.assert_close(nu, ref_nu, rtol=0, atol=1e-10)


@pytest.mark.parametrize("em", [plain_em, em_bases])
def test_em_initial_draw_is_mean_plus_std_times_generator_noise(em):
    k, v = clustered_tokens(4, lead=(3, H))  # a leading branch dim
    mu, nu = em(k, v, num_bases=K, generator=torch.Generator().manual_seed(5))
    ref_mu, ref_nu = naive_em_heads(k, v, naive_init(k, K, 5), 5, 0.01)
    torch.testing.assert_close(mu, ref_mu, rtol=0, atol=1e-10)
    torch.testing.assert_close(nu, ref_nu, rtol=0, atol=1e-10)


def test_bases_are_nonnegative_combinations_of_the_tokens_with_the_last_responsibilities():
    k, v = clustered_tokens(6)
    mu0 = naive_init(k, K, 7)
    before_last, _ = em_bases(k, v, num_bases=K, iters=4, init=mu0)
    mu, nu = em_bases(k, v, num_bases=K, iters=5, init=mu0)
    for h in range(H):
        z = naive_e_step(k[h], before_last[h], 0.01)
        weights = z / (z.sum(0) + EPS)  # (T, K): z̄
        assert (weights >= 0).all()
        # the +1e-4 makes each basis' weights sum to Σz/(Σz+1e-4), slightly below 1, not to 1
        torch.testing.assert_close(weights.sum(0), z.sum(0) / (z.sum(0) + EPS), rtol=0, atol=1e-12)
        assert (weights.sum(0) < 1).all()
        torch.testing.assert_close(mu[h], weights.T @ k[h], rtol=0, atol=1e-10)
        torch.testing.assert_close(nu[h], weights.T @ v[h], rtol=0, atol=1e-10)
    # one streamed M-step with those responsibilities, pooling other tokens too (an editor forming an edited
    # video's bases from the source's responsibilities)
    other = torch.randn(k.shape, generator=torch.Generator().manual_seed(9), dtype=k.dtype)
    z = torch.stack([naive_e_step(k[h], before_last[h], 0.01) for h in range(H)])  # (h, T, K)
    weights = z / (z.sum(1, keepdim=True) + EPS)  # (h, T, K)
    for chunk in (None, 5):
        pooled_k, pooled_other, pooled_v = weighted_means(k, before_last, 0.01, pool=[k, other, v], chunk=chunk)
        torch.testing.assert_close(pooled_k, mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(pooled_other, weights.transpose(1, 2) @ other, rtol=0, atol=1e-12)
        torch.testing.assert_close(pooled_v, nu, rtol=0, atol=1e-12)
        # an EM iteration is the keys pooling themselves: with values, the last iteration's (μ, ν)
        assert em_iteration(k, before_last, 0.01, chunk=chunk)[1] is None
        torch.testing.assert_close(em_iteration(k, before_last, 0.01, chunk=chunk)[0], mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(em_iteration(k, before_last, 0.01, v, chunk=chunk)[1], nu, rtol=0, atol=1e-12)


def test_generator_makes_runs_repeat_and_seeds_differ():
    k, v = clustered_tokens(8)
    run = lambda seed: em_bases(k, v, num_bases=K, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("chunk", [None, 1, 5, 8, T - 1, T, T + 10])
def test_streamed_em_equals_plain_em_float64(chunk):
    k, v = clustered_tokens(9, lead=(2, H))
    whole = plain_em(k, v, num_bases=K, generator=torch.Generator().manual_seed(3))
    parts = em_bases(k, v, num_bases=K, generator=torch.Generator().manual_seed(3), chunk=chunk)
    torch.testing.assert_close(parts[0], whole[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(parts[1], whole[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 1, 5, 8, T - 1])
def test_streamed_em_equals_plain_em_float32(chunk):
    k, v = clustered_tokens(10, dtype=torch.float32)
    whole = plain_em(k, v, num_bases=K, generator=torch.Generator().manual_seed(4))
    parts = em_bases(k, v, num_bases=K, generator=torch.Generator().manual_seed(4), chunk=chunk)
    assert parts[0].dtype == torch.float32
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[1], whole[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_run_the_em_in_float32(dtype):
    k, v = clustered_tokens(11, dtype=dtype)
    mu, nu = em_bases(k, v, num_bases=K, generator=torch.Generator().manual_seed(6), chunk=10)
    ref_mu, ref_nu = em_bases(k.float(), v.float(), num_bases=K, generator=torch.Generator().manual_seed(6), chunk=10)
    assert mu.dtype == dtype and nu.dtype == dtype
    assert torch.equal(mu, ref_mu.to(dtype)) and torch.equal(nu, ref_nu.to(dtype))
    # and the float32 run is the float64 reference of the same (rounded) inputs, to float32 accuracy
    mu0 = naive_init(k, K, 6, noise_dtype=torch.float32)
    ref64 = naive_em_heads(k.double(), v.double(), mu0, 5, 0.01)
    torch.testing.assert_close(ref_mu.double(), ref64[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_nu.double(), ref64[1], rtol=1e-5, atol=1e-5)


def test_low_precision_products_are_the_m_step_products_in_the_input_dtype():
    k, v = clustered_tokens(14, dtype=torch.bfloat16)
    mu0 = naive_init(k, K, 15, noise_dtype=torch.float32).float()
    mu, nu = em_bases(k, v, num_bases=K, iters=1, init=mu0, low_precision_products=True)
    z = responsibilities(k, mu0, 0.01)  # (h, T, K) in float32, as the EM forms them (tested above)
    norm = z.sum(1).unsqueeze(-1) + EPS  # (h, K, 1)
    zt = z.transpose(1, 2).bfloat16()  # the products' inputs in bf16, their sums kept in fp32
    torch.testing.assert_close(mu.float(), ((zt @ k).float() / norm).bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(nu.float(), ((zt @ v).float() / norm).bfloat16().float(), rtol=0, atol=0)
    # float32 and float64 inputs have no lower precision to use: the option changes nothing
    for dtype in (torch.float32, torch.float64):
        k, v = clustered_tokens(16, dtype=dtype)
        g = lambda: torch.Generator().manual_seed(17)
        a, b = em_bases(k, v, K, generator=g()), em_bases(k, v, K, generator=g(), low_precision_products=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("options,message", [
    (dict(num_bases=0), "num_bases"), (dict(iters=0), "iters"), (dict(tau=0.0), "tau"), (dict(chunk=0), "chunk"),
    (dict(init=torch.zeros(H, K + 1, D, dtype=torch.float64)), "init"),
])
def test_bad_options_raise_one_clear_error(options, message):
    k, v = clustered_tokens(12)
    options = {"num_bases": K, **options}
    with pytest.raises(ValueError, match=message):
        em_bases(k, v, **options)


def test_mismatched_keys_and_values_raise():
    k, v = clustered_tokens(13)
    with pytest.raises(ValueError, match="share all dims"):
        em_bases(k, v[:, :-1], num_bases=K)
