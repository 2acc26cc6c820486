"""STEM's expectation-maximisation: K key bases μ and value bases ν that summarise T tokens.

For one head, the T = frames·tokens keys k_t of a whole video are explained by K bases. With a
temperature τ, R iterations of

    E-step  z_tk = softmax_k( (k_t · μ̂_kᵀ − max_j k_t · μ̂_jᵀ) / τ ),   μ̂_k = μ_k / (‖μ_k‖ + 1e-4)
    M-step  z̄_tk = z_tk / (Σ_t z_tk + 1e-4),   μ_k = Σ_t z̄_tk k_t

move the bases towards the centres of the token clusters (only μ is normalised in the E-step, the keys
are not). The value bases use the last responsibilities: ν_k = Σ_t z̄_tk v_t. Every frame's queries then
attend to (μ, ν) instead of to all T tokens (see `context.EMAttention`).

Memory: the E-step is independent per token and both M-step sums (Σ_t z and zᵀk, and zᵀv for ν) are
additive over tokens, so the EM streams over token chunks of size `chunk`: no T × K matrix is ever held,
only chunk × K. The unchunked EM is the same code with one chunk. The initial mean and std are streamed
the same way, merged chunk by chunk in float64 (Chan et al.'s parallel variance).

Several processes (`shard`, distributed.py): each holds the tokens of its frames. The same additivity makes the
EM exact across them: each rank forms its sums, one all-reduce per iteration adds them (Σ_t z and zᵀk, with
zᵀv in the last), and every rank divides the same totals, so every rank holds the same bases. The initial
statistics are merged across ranks the same way, and the random draw does not depend on the tokens: the same
seed gives every rank the single process's initial bases.

Precision: all EM arithmetic is float32 (float64 for float64 inputs) whatever the input dtype; τ = 0.01
multiplies logit errors by 100, which fp16 cannot afford. The bases come back in the input dtype.

Dimension legend:
  ...  any leading batch dims (e.g. branches), shared by keys, values and bases
  h    heads, T tokens (frames · tokens per frame), c tokens per chunk
  K    bases, d key dim, dv value dim
"""
from __future__ import annotations

import torch

from .distributed import Shard, all_reduce_sum

EPS = 1e-4  # in the basis normalisation of the E-step and the column normalisation of the M-step
LOW_PRECISION = (torch.float16, torch.bfloat16)


def em_bases(keys: torch.Tensor, values: torch.Tensor, num_bases: int = 256, iters: int = 5, tau: float = 0.01,
             init: torch.Tensor | None = None, generator: torch.Generator | None = None,
             chunk: int | None = None, *, low_precision_products: bool = False,
             shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key bases μ (..., h, K, d) and value bases ν (..., h, K, dv) of keys (..., h, T, d), values (..., h, T, dv).

    The initial bases are μ₀ = mean + std · ε with the per-(head, channel) mean and (unbiased) std of the
    keys over T, and ε = torch.randn((..., h, K, d), generator=generator, dtype=<compute dtype>) drawn on
    the generator's device; `init` (..., h, K, d) replaces that draw. `chunk` bounds the tokens processed at
    once (None: all T in one chunk); the result does not depend on it beyond float rounding.

    `low_precision_products` (off by default; changes the result) runs the M-step products zᵀk and zᵀv in
    the keys' dtype when that is fp16 or bf16 (tensor cores on a GPU), summing them over chunks in fp32; the
    E-step's logits and softmax stay fp32, since τ multiplies the logits' errors by 1/τ = 100.

    `shard`: the keys and values are this rank's tokens of a video sharded over processes (module docstring).
    """
    check_em_options(num_bases, iters, tau, chunk)
    _check_inputs(keys, values, num_bases, init)
    dtype = compute_dtype(keys)
    mu = _initial_bases(keys, num_bases, generator, chunk, dtype, shard) if init is None else init.to(dtype)
    for _ in range(iters - 1):  # mu (..., h, K, d)
        (mu,) = m_step(keys, mu, tau, keys, chunk=chunk, low_precision_products=low_precision_products, shard=shard)
    # the last iteration also pools the values: ν shares the final responsibilities with μ
    mu, nu = m_step(keys, mu, tau, keys, values, chunk=chunk, low_precision_products=low_precision_products,
                    shard=shard)
    return mu.to(keys.dtype), nu.to(values.dtype)


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
    shape = (*keys.shape[:-2], num_bases, keys.shape[-1])
    device = generator.device if generator is not None else keys.device
    noise = torch.randn(shape, generator=generator, dtype=dtype, device=device).to(keys.device)  # (..., h, K, d)
    return mean.to(dtype).unsqueeze(-2) + std.to(dtype).unsqueeze(-2) * noise  # (..., h, K, d)


def _merge_across(n: int, mean: torch.Tensor, m2: torch.Tensor, shard: Shard) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean, M2) of all ranks' tokens from each rank's: M2 = Σ_r M2_r + n_r (mean_r − mean)², in float64."""
    count = torch.tensor([float(n)], dtype=torch.float64, device=mean.device)
    total, weighted = all_reduce_sum([count, mean * n], shard)
    mean_all = weighted / total
    (m2_all,) = all_reduce_sum([m2 + (mean - mean_all).square() * n], shard)
    return int(total.item()), mean_all, m2_all


def _logit_weights(mu: torch.Tensor, tau: float) -> torch.Tensor:
    """w = μ̂ / τ (..., K, d) with μ̂ = μ / (‖μ‖ + 1e-4): k · wᵀ are the E-step's logits.

    Dividing the K × d bases once, instead of the T × K logits, takes two passes over T × K out of every
    iteration; the logits' row max need not be subtracted by hand either, since softmax subtracts it itself.
    """
    return mu / ((mu.norm(dim=-1, keepdim=True) + EPS) * tau)  # (..., K, d)


def _e_step(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.softmax(k @ w.transpose(-1, -2), dim=-1)  # (..., c, K)


def m_step(keys: torch.Tensor, bases: torch.Tensor, tau: float, *pooled: torch.Tensor, chunk: int | None = None,
           low_precision_products: bool = False, shard: Shard | None = None) -> list[torch.Tensor]:
    """One M-step, streamed over token chunks: z̄ᵀx for each x in `pooled`, with z̄ the responsibilities of
    `keys` (..., T, d) to `bases` (..., K, d) normalised over the tokens, z̄_tk = z_tk / (Σ_t z_tk + 1e-4).

    With pooled = (keys,) it is an EM iteration's new μ; with (keys, values) the last one's μ and ν. An editor
    that forms an edited video's bases from the *source* video's responsibilities passes the source keys and
    bases and pools the edited keys and values. Each x is (..., T, ·); results (..., K, ·) in float32 (float64
    for float64 keys). Each chunk's responsibilities are formed once and used at once (Σ_t z and every zᵀx)
    while they are still in cache; context.DEFAULT_CHUNK tokens keep them there on a CPU.
    `low_precision_products`: see em_bases. `shard`: keys and pooled tensors hold this rank's tokens; the sums
    are all-reduced before the division, so every rank gets the whole video's result.
    """
    dtype = compute_dtype(keys)
    w = _logit_weights(bases.to(dtype), tau)  # (..., K, d)
    pieces = [_chunks(x, chunk) for x in pooled]
    product_dtypes = [x.dtype if low_precision_products and x.dtype in LOW_PRECISION else dtype for x in pooled]
    z_sum, sums = None, [None] * len(pooled)
    for i, piece in enumerate(_chunks(keys, chunk)):
        z = _e_step(piece.to(dtype), w)  # (..., c, K): only one chunk is ever upcast
        z_sum = _add(z_sum, z.sum(dim=-2))  # (..., K)
        for j, (x_pieces, product_dtype) in enumerate(zip(pieces, product_dtypes)):
            # in fp32 the transpose is a view: the product reads z in place
            zx = z.transpose(-1, -2).to(product_dtype) @ x_pieces[i].to(product_dtype)  # (..., K, ·)
            sums[j] = _add(sums[j], zx.to(dtype))
    if shard is not None:
        z_sum, *sums = all_reduce_sum([z_sum, *sums], shard)
    norm = z_sum.unsqueeze(-1) + EPS  # (..., K, 1): Σ_t z per basis
    return [total / norm for total in sums]  # each (..., K, ·)


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part
