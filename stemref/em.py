"""STEM's expectation-maximisation: K key bases μ and value bases ν that summarise the T tokens of a video.

The method (STEM: Li et al., "A Video is Worth 256 Bases", CVPR 2024; its method section and overview
figure). For one head, the T = frames·tokens keys k_t of a whole video are explained by K bases; R times
(R = 5, τ = 0.01, K = 256 in STEM), the paper's ST-E step then its ST-M step:

    E-step  z_tk = softmax_k( k_t · μ̂_kᵀ / τ ),  μ̂_k = μ_k / (‖μ_k‖ + 1e-4)   each token's responsibilities
    M-step  z̄_tk = z_tk / (Σ_t z_tk + 1e-4),     μ_k = Σ_t z̄_tk k_t           each basis a weighted mean

move the bases towards the centres of the token clusters. The value bases use the last responsibilities,
ν_k = Σ_t z̄_tk v_t, and every frame's queries then attend to (μ, ν) instead of to all T tokens (the paper's
STEM-SA; `context.EMAttention`). `plain_em` is exactly these lines: read it first. The initial bases are a
random draw around the keys, μ₀ = mean + std · ε per (head, channel), ε ~ Normal(0, 1).

The machinery (`em_bases`, the version the model runs, tested against `plain_em`):
- Memory: the E-step is independent per token and both M-step sums (Σ_t z and z̄ᵀk, and z̄ᵀv for ν) are
  additive over tokens, so the EM streams over token chunks of size `chunk`: no T × K matrix is ever held, only
  chunk × K. The initial mean and std are streamed the same way, merged chunk by chunk in float64 (Chan et
  al.'s parallel variance).
- Several processes (`shard`, distributed.py): each holds the tokens of its frames. The same additivity makes
  the EM exact across them: each rank forms its sums, one all-reduce per iteration adds them, and every rank
  divides the same totals, so every rank holds the same bases. The initial statistics are merged across ranks
  the same way, and the random draw does not depend on the tokens: the same seed gives every rank the single
  process's initial bases.
- Precision: all EM arithmetic is float32 (float64 for float64 inputs) whatever the input dtype; τ = 0.01
  multiplies logit errors by 100, which fp16 cannot afford. The bases come back in the input dtype.

Fidelity (the official code's choices, kept): the 1e-4 in both normalisations, so each basis' weights z̄ sum
to Σz/(Σz + 1e-4), slightly below 1; only the bases are normalised in the E-step, not the keys; the initial
bases are a fresh random draw at every call (seeded here by a generator, so runs repeat). The official code
also subtracts each token's largest logit before the softmax; softmax does that itself (see `_e_step`).

Dimension legend:
  ...  any leading batch dims (e.g. branches), shared by keys, values and bases
  h    heads, T tokens (frames · tokens per frame), c tokens per chunk
  K    bases, d key dim, dv value dim
"""
from __future__ import annotations

from typing import Sequence

import torch

from .distributed import Shard, all_reduce_sum

EPS = 1e-4  # in the basis normalisation of the E-step and the column normalisation of the M-step
LOW_PRECISION = (torch.float16, torch.bfloat16)


def plain_em(keys: torch.Tensor, values: torch.Tensor, num_bases: int = 256, iters: int = 5, tau: float = 0.01,
             init: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The EM as the paper writes it, all T tokens at once: (μ, ν) of keys (..., T, d), values (..., T, dv).

    The reference `em_bases` is tested against: the same arguments and the same result up to rounding, but one
    chunk, one process and no options. Arithmetic in float32 (float64 for float64 keys).
    """
    dtype = compute_dtype(keys)
    k, v = keys.to(dtype), values.to(dtype)  # (..., T, d), (..., T, dv)
    mu = init.to(dtype) if init is not None else _draw_bases(k.mean(dim=-2), k.std(dim=-2), num_bases, generator)
    for _ in range(iters):  # mu (..., K, d)
        mu_hat = mu / (mu.norm(dim=-1, keepdim=True) + EPS)  # the + 1e-4s are the official code's (Fidelity)
        z = torch.softmax(k @ mu_hat.transpose(-1, -2) / tau, dim=-1)  # ST-E step (..., T, K)
        z_bar = z / (z.sum(dim=-2, keepdim=True) + EPS)  # ST-M step: each basis' weights over the tokens
        mu = z_bar.transpose(-1, -2) @ k  # (..., K, d)
    nu = z_bar.transpose(-1, -2) @ v  # (..., K, dv), from the last responsibilities
    return mu.to(keys.dtype), nu.to(values.dtype)


def em_bases(keys: torch.Tensor, values: torch.Tensor, num_bases: int = 256, iters: int = 5, tau: float = 0.01,
             init: torch.Tensor | None = None, generator: torch.Generator | None = None,
             chunk: int | None = None, *, low_precision_products: bool = False,
             shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key bases μ (..., h, K, d) and value bases ν (..., h, K, dv) of keys (..., h, T, d), values (..., h, T, dv):
    `plain_em`, streamed over token chunks and, with a shard, over processes (module docstring).

    The initial bases are μ₀ = mean + std · ε with the per-(head, channel) mean and (unbiased) std of the
    keys over T, and ε = torch.randn((..., h, K, d), generator=generator, dtype=<compute dtype>) drawn on
    the generator's device; `init` (..., h, K, d) replaces that draw. `chunk` bounds the tokens processed at
    once (None: all T in one chunk); the result does not depend on it beyond float rounding.

    `low_precision_products` (off by default; changes the result) runs the M-step products z̄ᵀk and z̄ᵀv in
    the keys' dtype when that is fp16 or bf16 (tensor cores on a GPU), summing them over chunks in fp32; the
    E-step's logits and softmax stay fp32, since τ multiplies the logits' errors by 1/τ = 100.

    `shard`: the keys and values are this rank's tokens of a video sharded over processes (module docstring).
    """
    check_em_options(num_bases, iters, tau, chunk)
    _check_inputs(keys, values, num_bases, init)
    dtype = compute_dtype(keys)
    mu = _initial_bases(keys, num_bases, generator, chunk, dtype, shard) if init is None else init.to(dtype)
    streaming = dict(chunk=chunk, low_precision_products=low_precision_products, shard=shard)
    for _ in range(iters - 1):  # mu (..., h, K, d)
        mu, _ = em_iteration(keys, mu, tau, **streaming)
    mu, nu = em_iteration(keys, mu, tau, values, **streaming)  # ν shares the last responsibilities with μ
    return mu.to(keys.dtype), nu.to(values.dtype)


def em_iteration(keys: torch.Tensor, bases: torch.Tensor, tau: float, values: torch.Tensor | None = None, *,
                 chunk: int | None = None, low_precision_products: bool = False,
                 shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One EM iteration (ST-E step, then ST-M step): the new key bases μ = z̄ᵀk (..., K, d) from keys (..., T, d)
    and bases (..., K, d), and with `values` (..., T, dv) the value bases ν = z̄ᵀv (..., K, dv); else ν is None.

    Float32 results (float64 for float64 keys). Options as in em_bases.
    """
    # the M-step averages the very tokens whose responsibilities the E-step formed
    pooled = weighted_means(keys, bases, tau, pool=[keys] if values is None else [keys, values], chunk=chunk,
                            low_precision_products=low_precision_products, shard=shard)
    return pooled[0], (pooled[1] if values is not None else None)


def weighted_means(keys: torch.Tensor, bases: torch.Tensor, tau: float, *, pool: Sequence[torch.Tensor],
                   chunk: int | None = None, low_precision_products: bool = False,
                   shard: Shard | None = None) -> list[torch.Tensor]:
    """z̄ᵀx (..., K, ·) for each x (..., T, ·) in `pool`, with z̄ the responsibilities of `keys` (..., T, d) to
    `bases` (..., K, d) normalised over the tokens, z̄_tk = z_tk / (Σ_t z_tk + 1e-4).

    The responsibilities come from (keys, bases); what they average is `pool`. An EM iteration pools the keys
    themselves (`em_iteration`); an editor that forms an edited video's bases from the *source* video's
    responsibilities passes the source keys and bases and pools the edited keys and values. Results in float32
    (float64 for float64 keys).

    Streamed over token chunks: each chunk's responsibilities are formed once and used at once (Σ_t z and every
    zᵀx) while they are still in cache; context.DEFAULT_CHUNK tokens keep them there on a CPU.
    `low_precision_products`: see em_bases. `shard`: keys and the pooled tensors hold this rank's tokens.
    """
    dtype = compute_dtype(keys)
    w = _logit_weights(bases.to(dtype), tau)  # (..., K, d)
    pieces = [_chunks(x, chunk) for x in pool]
    product_dtypes = [x.dtype if low_precision_products and x.dtype in LOW_PRECISION else dtype for x in pool]
    z_sum, sums = None, [None] * len(pool)
    for i, piece in enumerate(_chunks(keys, chunk)):
        z = _e_step(piece.to(dtype), w)  # ST-E step (..., c, K): only one chunk is ever upcast
        z_sum = _add(z_sum, z.sum(dim=-2))  # (..., K)
        for j, (x_pieces, product_dtype) in enumerate(zip(pieces, product_dtypes)):
            # in fp32 the transpose is a view: the product reads z in place
            zx = z.transpose(-1, -2).to(product_dtype) @ x_pieces[i].to(product_dtype)  # (..., K, ·)
            sums[j] = _add(sums[j], zx.to(dtype))
    if shard is not None:  # the whole video's Σ_t z and zᵀx: every rank adds all ranks' sums, in one collective
        z_sum, *sums = all_reduce_sum([z_sum, *sums], shard)
    norm = z_sum.unsqueeze(-1) + EPS  # (..., K, 1): Σ_t z per basis, + 1e-4
    return [total / norm for total in sums]  # ST-M step: each (..., K, ·), Σ_t z̄_tk x_t


def responsibilities(keys: torch.Tensor, bases: torch.Tensor, tau: float) -> torch.Tensor:
    """The E-step: z (..., T, K), each token's soft assignment to the bases (rows sum to 1).

    keys (..., T, d), bases (..., K, d). Computed and returned in float32 (float64 for float64 keys).
    """
    dtype = compute_dtype(keys)
    return _e_step(keys.to(dtype), _logit_weights(bases.to(dtype), tau))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_em_options(num_bases: int, iters: int, tau: float, chunk: int | None) -> None:
    """Raise ValueError naming the first bad EM option."""
    if not isinstance(num_bases, int) or num_bases < 1:
        raise ValueError(f"num_bases must be a positive integer (STEM uses 256), got {num_bases!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer (STEM uses 5), got {iters!r}")
    if not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau must be a positive number (STEM uses 0.01), got {tau!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of tokens or None (all at once), got {chunk!r}")


def _check_inputs(keys: torch.Tensor, values: torch.Tensor, num_bases: int, init: torch.Tensor | None) -> None:
    if not (keys.is_floating_point() and values.is_floating_point()):
        raise ValueError(f"keys and values must be floating point, got {keys.dtype} and {values.dtype}")
    if keys.dim() < 3 or keys.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"keys (..., h, T, d) and values (..., h, T, dv) must share all dims but the last, "
                         f"got {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.shape[-2] < 2:
        raise ValueError(f"the EM needs at least 2 tokens (T) to estimate the key std, got {keys.shape[-2]}")
    expected = (*keys.shape[:-2], num_bases, keys.shape[-1])
    if init is not None and tuple(init.shape) != expected:
        raise ValueError(f"init must have shape (..., h, num_bases, d) = {expected}, got {tuple(init.shape)}; "
                         "pass num_bases equal to init's number of bases")


def _chunks(x: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, ...]:
    return x.split(chunk or x.shape[-2], dim=-2)  # pieces (..., c, d) along the token axis


def _draw_bases(mean: torch.Tensor, std: torch.Tensor, num_bases: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """μ₀ = mean + std · ε (..., K, d) from the keys' mean and std (..., d); ε drawn in their dtype on the
    generator's device, so the same seed draws the same ε whatever the tokens and wherever they live."""
    shape = (*mean.shape[:-1], num_bases, mean.shape[-1])
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(shape, generator=generator, dtype=mean.dtype, device=device).to(mean.device)  # (..., K, d)
    return mean.unsqueeze(-2) + std.unsqueeze(-2) * noise  # (..., K, d)


def _initial_bases(keys: torch.Tensor, num_bases: int, generator: torch.Generator | None, chunk: int | None,
                   dtype: torch.dtype, shard: Shard | None = None) -> torch.Tensor:
    """μ₀ ~ Normal(mean, std) per (head, channel), with mean and std streamed over token chunks in float64."""
    n, mean, m2 = 0, 0.0, 0.0
    for piece in _chunks(keys, chunk):
        x = piece.double()  # (..., h, c, d)
        n_c = x.shape[-2]
        mean_c = x.mean(dim=-2)  # (..., h, d)
        m2_c = (x - mean_c.unsqueeze(-2)).square().sum(dim=-2)  # (..., h, d)
        delta = mean_c - mean
        # Chan et al.: merge the running (n, mean, M2) with the chunk's without forming Σx² − n·mean²
        mean = mean + delta * (n_c / (n + n_c))
        m2 = m2 + m2_c + delta.square() * (n * n_c / (n + n_c))
        n += n_c
    if shard is not None:
        n, mean, m2 = _merge_across(n, mean, m2, shard)
    std = (m2 / (n - 1)).sqrt()  # (..., h, d), unbiased like torch.std
    return _draw_bases(mean.to(dtype), std.to(dtype), num_bases, generator)  # (..., h, K, d)


def _merge_across(n: int, mean: torch.Tensor, m2: torch.Tensor, shard: Shard) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean, M2) of all ranks' tokens from each rank's: M2 = Σ_r M2_r + n_r (mean_r − mean)², in float64."""
    count = torch.tensor([float(n)], dtype=torch.float64, device=mean.device)
    total, weighted = all_reduce_sum([count, mean * n], shard)
    mean_all = weighted / total
    (m2_all,) = all_reduce_sum([m2 + (mean - mean_all).square() * n], shard)
    return int(total.item()), mean_all, m2_all


def _logit_weights(mu: torch.Tensor, tau: float) -> torch.Tensor:
    """w = μ̂ / τ (..., K, d) with μ̂ = μ / (‖μ‖ + 1e-4): k · wᵀ are the E-step's logits.

    Dividing the K × d bases once, instead of the T × K logits, takes a pass over T × K out of every iteration.
    """
    return mu / ((mu.norm(dim=-1, keepdim=True) + EPS) * tau)  # (..., K, d)


def _e_step(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """softmax_K(k · wᵀ) (..., c, K). The official code subtracts each row's max logit first, to keep exp from
    overflowing; softmax is unchanged by that shift and torch.softmax makes it itself, so it is not repeated."""
    return torch.softmax(k @ w.transpose(-1, -2), dim=-1)  # (..., c, K)


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part
