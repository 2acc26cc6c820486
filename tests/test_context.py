"""Frame-context processors (stemref.context) against naive attention written out in the test.

Inputs are head-split rows laid out branch-major (row = branch·F + frame), as the UNet hands them over.
"""
from __future__ import annotations

import math

import pytest
import torch

from stemref.attention import AttnCall, RunInfo
from stemref.context import AllFrames, EMAttention, SparseCausal, context_processor, per_frame
from test_em import naive_em

H, N, D = 2, 6, 8


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v with the full score matrix, (..., L, d) x (..., S, d) -> (..., L, dv)."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (..., L, S)
    return torch.softmax(scores, dim=-1) @ v.double()


def qkv(branches: int, frames: int, seed: int = 0, tokens: int = N):
    g = torch.Generator().manual_seed(seed)
    shape = (branches * frames, H, tokens, D)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def self_call(frames: int) -> AttnCall:
    return AttnCall("down_blocks.0.attentions.0.transformer_blocks.0.attn1", False, RunInfo(frames=frames))


def frame_rows(x: torch.Tensor, frames: int) -> torch.Tensor:
    return x.view(-1, frames, *x.shape[1:])  # (B, F, h, N, d)


PROCESSORS = [per_frame, SparseCausal(), AllFrames(), AllFrames(chunk_frames=3)]


@pytest.mark.parametrize("processor", PROCESSORS)
def test_one_frame_is_plain_self_attention(processor):
    q, k, v = qkv(branches=2, frames=1)
    torch.testing.assert_close(processor(q, k, v, self_call(1)), naive_attention(q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("processor", PROCESSORS + [EMAttention(num_bases=4, generator=torch.Generator())])
def test_cross_attention_passes_through(processor):
    q, _, _ = qkv(branches=1, frames=3)
    text = torch.randn(3, H, 7, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # 7 text tokens
    call = AttnCall("mid_block.attentions.0.transformer_blocks.0.attn2", True, RunInfo(frames=3))
    out = processor(q, text, 2 * text, call)
    torch.testing.assert_close(out, naive_attention(q, text, 2 * text), rtol=0, atol=1e-12)


def test_per_frame_attends_to_its_own_frame():
    q, k, v = qkv(branches=2, frames=3)
    torch.testing.assert_close(per_frame(q, k, v, self_call(3)), naive_attention(q, k, v), rtol=0, atol=1e-12)


def test_sparse_causal_equals_first_and_previous_frame_reference():
    frames = 5
    q, k, v = qkv(branches=2, frames=frames)
    out = frame_rows(SparseCausal()(q, k, v, self_call(frames)), frames)
    qf, kf, vf = frame_rows(q, frames), frame_rows(k, frames), frame_rows(v, frames)
    for b in range(2):
        for i in range(frames):
            p = max(i - 1, 0)  # frame 0's previous frame is itself: it sees its own tokens twice
            keys = torch.cat([kf[b, 0], kf[b, p]], dim=-2)  # (h, 2N, d)
            values = torch.cat([vf[b, 0], vf[b, p]], dim=-2)
            torch.testing.assert_close(out[b, i], naive_attention(qf[b, i], keys, values), rtol=0, atol=1e-12)
    # attending to frame 0 twice is attending to it once
    torch.testing.assert_close(out[:, 0], naive_attention(qf[:, 0], kf[:, 0], vf[:, 0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("i", [0, 1, 2, 4])
def test_sparse_causal_frame_depends_only_on_first_previous_and_itself(i):
    frames = 5
    q, k, v = qkv(branches=1, frames=frames)
    call = self_call(frames)
    out = frame_rows(SparseCausal()(q, k, v, call), frames)[0, i]

    def perturbed(f):
        rows = slice(f, f + 1)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[rows] += 1.0
        return frame_rows(SparseCausal()(q2, k2, v2, call), frames)[0, i]

    for f in set(range(frames)) - {0, i - 1, i}:
        torch.testing.assert_close(perturbed(f), out, rtol=0, atol=0)
    for f in {0, max(i - 1, 0), i}:
        assert not torch.allclose(perturbed(f), out)


@pytest.mark.parametrize("chunk_frames", [1, 2, 3, 5, 8])
def test_all_frames_equals_full_matrix_reference(chunk_frames):
    frames = 5
    q, k, v = qkv(branches=2, frames=frames)
    out = frame_rows(AllFrames(chunk_frames)(q, k, v, self_call(frames)), frames)
    qf, kf, vf = frame_rows(q, frames), frame_rows(k, frames), frame_rows(v, frames)
    for b in range(2):
        keys = torch.cat(list(kf[b]), dim=-2)  # (h, F·N, d): every token of the branch's video
        values = torch.cat(list(vf[b]), dim=-2)
        queries = torch.cat(list(qf[b]), dim=-2)  # (h, F·N, d)
        ref = naive_attention(queries, keys, values).view(H, frames, N, D).transpose(0, 1)  # (F, h, N, d)
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-12)


def test_all_frames_keeps_branches_independent():
    frames = 4
    q, k, v = qkv(branches=2, frames=frames)
    out = AllFrames(2)(q, k, v, self_call(frames))
    k2, v2 = k.clone(), v.clone()
    k2[frames:] += 1.0  # change only the second branch's keys and values
    v2[frames:] -= 1.0
    out2 = AllFrames(2)(q, k2, v2, self_call(frames))
    torch.testing.assert_close(out2[:frames], out[:frames], rtol=0, atol=0)
    assert not torch.allclose(out2[frames:], out[frames:])


def test_all_frames_over_identical_frames_is_per_frame_attention():
    frames = 4
    q, k, v = qkv(branches=1, frames=frames)
    k, v = k[:1].expand_as(k).clone(), v[:1].expand_as(v).clone()  # every frame has frame 0's keys and values
    torch.testing.assert_close(AllFrames()(q, k, v, self_call(frames)), naive_attention(q, k, v), rtol=0, atol=1e-12)


def run_stem(q, k, v, frames, seed, **options):
    """EMAttention with a fresh generator seeded with `seed`, on self-attention rows of `frames`-frame videos."""
    stem = EMAttention(generator=torch.Generator().manual_seed(seed), **options)
    return stem(q, k, v, self_call(frames))


def naive_em_attention(q, k, v, frames, num_bases, seed, scope=None, iters=5, tau=0.01):
    """STEM attention from the naive EM of test_em: per branch and scope, bases from all the scope's tokens
    (frame after frame), then softmax(q μᵀ/√d) ν for every frame. Each scope draws its initial noise for all
    branches at once, scopes in order, from one generator (what a shared generator does)."""
    qf, kf, vf = frame_rows(q, frames), frame_rows(k, frames), frame_rows(v, frames)
    branches, scope = qf.shape[0], scope or frames
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(qf)
    for s in range(0, frames, scope):
        e = min(s + scope, frames)
        keys = torch.stack([torch.cat(list(kf[b, s:e]), dim=-2) for b in range(branches)])  # (B, h, n·N, d)
        values = torch.stack([torch.cat(list(vf[b, s:e]), dim=-2) for b in range(branches)])
        noise = torch.randn((branches, H, num_bases, D), generator=g, dtype=torch.float64)
        mu0 = keys.mean(dim=-2, keepdim=True) + keys.std(dim=-2, keepdim=True) * noise
        for b in range(branches):
            for h in range(H):
                mu, nu = naive_em(keys[b, h], values[b, h], mu0[b, h], iters, tau)
                for f in range(s, e):
                    out[b, f, h] = naive_attention(qf[b, f, h], mu, nu)
    return out.reshape(q.shape)


def test_em_attention_equals_naive_reference():
    frames = 3
    q, k, v = qkv(branches=2, frames=frames, seed=3)
    stem = EMAttention(num_bases=5, generator=torch.Generator().manual_seed(7))
    out = stem(q, k, v, self_call(frames))
    torch.testing.assert_close(out, naive_em_attention(q, k, v, frames, 5, seed=7), rtol=0, atol=1e-10)


def test_em_attention_scope_equals_naive_per_scope_reference():
    frames = 5
    q, k, v = qkv(branches=1, frames=frames, seed=4)
    stem = EMAttention(num_bases=4, scope=2, generator=torch.Generator().manual_seed(8))
    out = stem(q, k, v, self_call(frames))
    torch.testing.assert_close(out, naive_em_attention(q, k, v, frames, 4, seed=8, scope=2), rtol=0, atol=1e-10)


def test_em_attention_scope_covering_the_video_is_the_whole_video():
    frames = 4
    q, k, v = qkv(branches=2, frames=frames, seed=5)
    whole = run_stem(q, k, v, frames, seed=9, num_bases=4)
    torch.testing.assert_close(run_stem(q, k, v, frames, seed=9, num_bases=4, scope=frames), whole, rtol=0, atol=0)


def test_whole_video_bases_differ_from_official_8_frame_chunks():
    frames = 16
    q, k, v = qkv(branches=1, frames=frames, seed=6, tokens=4)
    whole = run_stem(q, k, v, frames, seed=10, num_bases=4)
    assert not torch.allclose(run_stem(q, k, v, frames, seed=10, num_bases=4, scope=8), whole, atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_em_attention_chunked_equals_unchunked(chunk):
    frames = 3
    q, k, v = qkv(branches=2, frames=frames, seed=11)
    whole = run_stem(q, k, v, frames, seed=12, num_bases=4)
    torch.testing.assert_close(run_stem(q, k, v, frames, seed=12, num_bases=4, chunk=chunk), whole, rtol=0, atol=1e-10)


def test_em_attention_repeats_with_a_seed_and_keeps_the_input_dtype():
    frames = 2
    q, k, v = (x.half() for x in qkv(branches=1, frames=frames, seed=13))
    a, b, c = (run_stem(q, k, v, frames, seed=seed, num_bases=4) for seed in (0, 0, 1))
    assert a.dtype == torch.float16 and a.shape == q.shape
    assert torch.equal(a, b) and not torch.equal(a, c)


def naive_video_em_attention(q, k, v, frames, mu0, iters, tau=0.01):
    """STEM attention over whole videos from given initial bases mu0 (B, h, K, d): (output, final key bases)."""
    qf, kf, vf = frame_rows(q, frames), frame_rows(k, frames), frame_rows(v, frames)
    out, bases = torch.empty_like(qf), torch.empty_like(mu0)
    for b in range(qf.shape[0]):
        keys, values = torch.cat(list(kf[b]), dim=-2), torch.cat(list(vf[b]), dim=-2)  # (h, F·N, d)
        for h in range(H):
            bases[b, h], nu = naive_em(keys[h], values[h], mu0[b, h], iters, tau)
            for f in range(frames):
                out[b, f, h] = naive_attention(qf[b, f, h], bases[b, h], nu)
    return out.reshape(q.shape), bases


def naive_initial_bases(k, frames, num_bases, noise):
    """mean + std · noise per branch, head and channel over each video's tokens; noise (B, h, K, d)."""
    kf = frame_rows(k, frames)
    keys = torch.stack([torch.cat(list(kf[b]), dim=-2) for b in range(kf.shape[0])])  # (B, h, F·N, d)
    return keys.mean(dim=-2, keepdim=True) + keys.std(dim=-2, keepdim=True) * noise


def step_call(frames: int, step: int | None, name="down_blocks.0.attentions.0.transformer_blocks.0.attn1") -> AttnCall:
    return AttnCall(name, False, RunInfo(frames=frames, step=step))


def test_warm_start_continues_from_the_previous_steps_bases_of_the_same_layer():
    frames, K = 3, 4
    (q0, k0, v0), (q1, k1, v1) = qkv(branches=2, frames=frames, seed=14), qkv(branches=2, frames=frames, seed=15)
    g = torch.Generator().manual_seed(16)
    noise = [torch.randn((2, H, K, D), generator=g, dtype=torch.float64) for _ in range(3)]
    stem = EMAttention(num_bases=K, generator=torch.Generator().manual_seed(16), warm_start_iters=2)
    # step 0 has no previous bases: the usual random draw and 5 iterations
    ref0, bases0 = naive_video_em_attention(q0, k0, v0, frames, naive_initial_bases(k0, frames, K, noise[0]), 5)
    torch.testing.assert_close(stem(q0, k0, v0, step_call(frames, 0)), ref0, rtol=0, atol=1e-10)
    # step 1 of the same layer starts from step 0's bases and runs 2 iterations (no draw)
    ref1, bases1 = naive_video_em_attention(q1, k1, v1, frames, bases0, 2)
    torch.testing.assert_close(stem(q1, k1, v1, step_call(frames, 1)), ref1, rtol=0, atol=1e-10)
    # another layer at step 2 has no step-1 bases of its own: a cold start (the generator's second draw)
    other = step_call(frames, 2, name="up_blocks.1.attentions.0.transformer_blocks.0.attn1")
    ref2, _ = naive_video_em_attention(q1, k1, v1, frames, naive_initial_bases(k1, frames, K, noise[1]), 5)
    torch.testing.assert_close(stem(q1, k1, v1, other), ref2, rtol=0, atol=1e-10)
    # a step that does not follow the layer's last one (a new loop starting at 0) is cold as well
    ref3, _ = naive_video_em_attention(q0, k0, v0, frames, naive_initial_bases(k0, frames, K, noise[2]), 5)
    torch.testing.assert_close(stem(q0, k0, v0, step_call(frames, 0)), ref3, rtol=0, atol=1e-10)
    assert not torch.allclose(ref1, naive_video_em_attention(q1, k1, v1, frames, bases0, 5)[0])


def test_warm_start_needs_the_step():
    q, k, v = qkv(branches=1, frames=2)
    stem = EMAttention(num_bases=4, generator=torch.Generator(), warm_start_iters=1)
    with pytest.raises(ValueError, match="RunInfo\\(step"):
        stem(q, k, v, step_call(2, None))
    with pytest.raises(ValueError, match="warm_start_iters"):
        EMAttention(warm_start_iters=0)


@pytest.mark.parametrize("num_bases", [3 * N, 3 * N - 1])
def test_all_frame_if_few_tokens_is_all_frame_attention_up_to_k_tokens(num_bases):
    frames = 3  # 3·N tokens per video
    q, k, v = qkv(branches=2, frames=frames, seed=17)
    out = run_stem(q, k, v, frames, seed=18, num_bases=num_bases, all_frame_if_few_tokens=True)
    if num_bases >= frames * N:
        torch.testing.assert_close(out, AllFrames()(q, k, v, self_call(frames)), rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(out, run_stem(q, k, v, frames, seed=18, num_bases=num_bases), rtol=0, atol=0)


def test_context_processor_names_and_options():
    assert context_processor("1-frame") is per_frame
    assert isinstance(context_processor("2-frame", generator=torch.Generator()), SparseCausal)
    assert context_processor("all-frame", chunk_frames=2).chunk_frames == 2
    stem = context_processor("stem", generator=torch.Generator(), num_bases=8, scope=8)
    assert isinstance(stem, EMAttention) and (stem.num_bases, stem.scope) == (8, 8)
    assert context_processor("stem", warm_start_iters=2, all_frame_if_few_tokens=True).warm_start_iters == 2
    with pytest.raises(ValueError, match="choose one of"):
        context_processor("3-frame")
    with pytest.raises(ValueError, match="takes no options"):
        context_processor("2-frame", num_bases=8)
    with pytest.raises(ValueError, match="scope"):
        context_processor("stem", scope=0)
    with pytest.raises(ValueError, match="chunk_frames"):
        AllFrames(0)


def test_rows_not_a_whole_number_of_videos_raise():
    q, k, v = qkv(branches=1, frames=5)
    with pytest.raises(ValueError, match="whole number"):
        AllFrames()(q, k, v, self_call(2))
