"""Prompt-to-prompt pieces (stemref.edit.p2p) on the real CLIP tokenizer, against references written here."""
from __future__ import annotations

import pytest
import torch

from stemref.edit import p2p
from stemref.tokenizer import CLIPTokenizer

L = 77
SOURCE = "a silver jeep driving down a curvy road in the countryside"


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.openai()


def reference_positions(tok, prompt: str, word: str) -> list[int]:
    """Token positions of `word`, from each space-separated word's own token count (prompts without punctuation)."""
    out, position = [], 1
    for w in prompt.split(" "):
        n = len(tok.encode(w))
        if w == word:
            out += range(position, position + n)
        position += n
    return out


@pytest.mark.parametrize("word", ["a", "jeep", "countryside", "silver", "missing"])
def test_word_positions_match_a_word_by_word_count(tok, word):
    assert p2p.word_positions(tok, SOURCE, word) == reference_positions(tok, SOURCE, word)


def test_word_positions_of_multi_token_words(tok):
    prompt = "a painting by makoto shinkai"
    assert len(tok.encode("makoto")) == 2 and len(tok.encode("shinkai")) == 2
    assert p2p.word_positions(tok, prompt, "shinkai") == reference_positions(tok, prompt, "shinkai") == [6, 7]
    assert p2p.word_positions(tok, prompt, 4) == [6, 7]  # a word given by its index


def test_punctuation_is_official_by_default_and_stripped_on_request(tok):
    prompt = SOURCE + ", watercolor painting"
    # official: "countryside," is the word, so "countryside" is not found
    assert p2p.word_positions(tok, prompt, "countryside") == []
    assert p2p.word_positions(tok, prompt, "countryside,") == [11, 12]  # the word and its comma
    assert p2p.word_positions(tok, prompt, "countryside", strip_punctuation=True) == [11]
    # tokens after the punctuated word keep their places
    assert p2p.word_positions(tok, prompt, "watercolor") == [13]


def test_double_space_shifts_later_words_as_officially(tok):
    assert p2p.word_positions(tok, "a  jeep", "jeep") == []  # the empty word consumes the token


def test_replace_mapper_is_identity_for_equal_token_counts(tok):
    target = SOURCE.replace("jeep", "car").replace("silver", "red")
    mapper = p2p.replace_mapper(tok, SOURCE, target)
    assert torch.equal(mapper, torch.eye(L, dtype=torch.float64))  # rows one-hot: position j -> j


def reference_shifted_mapper(swap_at: int, n_target: int) -> torch.Tensor:
    """One source token at `swap_at` becomes n_target tokens; every later token moves by n_target - 1."""
    m = torch.zeros(L, L, dtype=torch.float64)
    shift = n_target - 1
    for i in range(swap_at):
        m[i, i] = 1
    m[swap_at, swap_at: swap_at + n_target] = 1 / n_target
    for i in range(swap_at + 1, L - shift):
        m[i, i + shift] = 1
    return m


def test_replace_mapper_with_a_longer_word(tok):
    source, target = "a cat on grass", "a shinkai on grass"  # 1 -> 2 tokens at position 2
    official = p2p.replace_mapper(tok, source, target)
    fixed = p2p.replace_mapper(tok, source, target, fix_shift=True)
    assert torch.equal(fixed, reference_shifted_mapper(2, 2))
    torch.testing.assert_close(fixed[:L - 1].sum(1), torch.ones(L - 1, dtype=torch.float64), rtol=0, atol=0)
    # official: after the swap the tail maps j -> j, so source "on" (3) is dropped and "grass" (4) lands on "on"
    assert official[3].sum() == 0 and official[4, 4] == 1 and official[4, 5] == 0
    assert torch.equal(official[:3], fixed[:3])


def test_replace_mapper_refuses_different_word_counts(tok):
    with pytest.raises(ValueError, match="as many words"):
        p2p.replace_mapper(tok, "a cat", "a fluffy cat")


def test_refine_mapper_for_identical_prompts_is_identity(tok):
    mapper, alphas = p2p.refine_mapper(tok, SOURCE, SOURCE)
    assert torch.equal(mapper, torch.arange(L)) and torch.equal(alphas, torch.ones(L, dtype=torch.float64))


@pytest.mark.parametrize("target", ["a silver fluffy jeep driving down a curvy road in the countryside",
                                    "a jeep driving down a road in the countryside",
                                    "a red jeep driving down a curvy road in the countryside"])
def test_refine_alphas_are_zero_exactly_on_new_tokens(tok, target):
    mapper, alphas = p2p.refine_mapper(tok, SOURCE, target)
    new_words = [w for w in target.split(" ") if w not in SOURCE.split(" ")]
    new = {p for w in new_words for p in reference_positions(tok, target, w)}
    x = [tok.start_id, *tok.encode(SOURCE), tok.end_id]
    y = [tok.start_id, *tok.encode(target), tok.end_id]
    for j in range(len(y)):
        if j in new:
            assert alphas[j] == 0 and mapper[j] == -1
        else:
            assert alphas[j] == 1 and x[mapper[j]] == y[j]  # aligned to the same token of the source
    assert torch.equal(alphas[len(y):], torch.ones(L - len(y), dtype=torch.float64))
    assert torch.equal(mapper[len(y):], torch.arange(len(y), L))  # official: padding j takes source column j


def test_reweight_vector(tok):
    target = "a jeep in the style of makoto shinkai"
    e = p2p.reweight_vector(tok, target, {"makoto": 10, "shinkai": 5, "absent": 3})
    expected = torch.ones(L, dtype=torch.float64)
    expected[reference_positions(tok, target, "makoto")] = 10
    expected[reference_positions(tok, target, "shinkai")] = 5
    assert torch.equal(e, expected)
    assert torch.equal(p2p.reweight_vector(tok, target, {"absent": 3}), torch.ones(L, dtype=torch.float64))


@pytest.mark.parametrize("window", [0.8, 0.95, (0.2, 0.7), 1.0, 0.0])
def test_cross_gate_rows_use_n_plus_one(tok, window):
    steps = 50
    gate = p2p.cross_gate(tok, SOURCE, steps, window)
    start, end = (0.0, window) if isinstance(window, float) else window
    on = [i for i in range(steps) if gate[i].any()]
    assert on == [i for i in range(int(start * (steps + 1)), int(end * (steps + 1))) if i < steps]
    assert torch.equal(gate[on], torch.ones(len(on), L, dtype=torch.float64))
    if window == 0.95:
        assert len(on) == 48  # int(0.95·51); int(0.95·50) would be 47


def test_cross_gate_word_windows(tok):
    steps = 20
    gate = p2p.cross_gate(tok, SOURCE, steps, 0.5, {"jeep": (0.0, 1.0), "road": 0.0})
    jeep, road = reference_positions(tok, SOURCE, "jeep"), reference_positions(tok, SOURCE, "road")
    assert gate[:, jeep].eq(1).all()  # its own window: every step
    assert gate[:, road].eq(0).all()  # empty window
    other = [j for j in range(L) if j not in jeep + road]
    assert torch.equal(gate[:, other].any(1), torch.arange(steps) < int(0.5 * (steps + 1)))


def test_self_steps():
    assert p2p.self_steps(50, 0.6) == range(0, 30)
    assert p2p.self_steps(50, (0.2, 0.5)) == range(10, 25)
    assert len(p2p.self_steps(50, 0.0)) == 0
    with pytest.raises(ValueError, match="window"):
        p2p.self_steps(50, (0.5, 0.2))


def cross_maps(frames=2, heads=3, side=4, seed=0, layers=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(frames, heads, side * side, L, generator=g, dtype=torch.float64), -1)
            for _ in range(layers)]


def reference_blend_mask(maps, positions, side, size, threshold):
    """Written out with loops: word sum, mean over layers and heads, 3×3 max, nearest (floor) resize, /max, > τ."""
    frames = maps[0].shape[0]
    mask = torch.zeros(frames, 1, *size, dtype=torch.bool)
    for f in range(frames):
        a = sum(m[f][..., positions].sum(-1).mean(0) for m in maps) / len(maps)  # (n,)
        a = a.view(side, side)
        pooled = torch.zeros_like(a)
        for y in range(side):
            for x in range(side):
                pooled[y, x] = a[max(y - 1, 0): y + 2, max(x - 1, 0): x + 2].max()
        resized = torch.zeros(size, dtype=a.dtype)
        for y in range(size[0]):
            for x in range(size[1]):
                resized[y, x] = pooled[y * side // size[0], x * side // size[1]]  # legacy nearest: floor
        mask[f, 0] = resized / resized.max() > threshold
    return mask


@pytest.mark.parametrize("size", [(4, 4), (2, 2), (8, 8)])
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_blend_mask_against_reference(size, threshold):
    maps = cross_maps()
    a = p2p.blend_map(maps, [3, 5], (4, 4))
    got = p2p.blend_mask(a, size, threshold)
    assert got.dtype == torch.bool and got.shape == (2, 1, *size)
    assert torch.equal(got, reference_blend_mask(maps, [3, 5], 4, size, threshold))


def test_blend_mask_extremes_and_invariances():
    maps = cross_maps()
    a = p2p.blend_map(maps, [3], (4, 4))
    assert not p2p.blend_mask(a, (8, 8), 1.0).any() and not p2p.blend_mask(a, (8, 8), 2.0).any()
    assert p2p.blend_mask(a, (8, 8), 0.0).flatten(1).any(1).all()  # each frame's maximum passes τ = 0
    assert torch.equal(p2p.blend_mask(a, (8, 8), 0.4), p2p.blend_mask(7 * a, (8, 8), 0.4))
    # only the source words' columns matter
    changed = [m.clone() for m in maps]
    for m in changed:
        m[..., 10:] = m[..., 10:].flip(-2)
    assert torch.equal(p2p.blend_map(changed, [3], (4, 4)), a)
    # a word that is not there: 0/0, no mask (official)
    assert not p2p.blend_mask(p2p.blend_map(maps, [], (4, 4)), (4, 4), 0.3).any()


def test_fuse_self():
    g = torch.Generator().manual_seed(1)
    p_src, p_edit = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64).unbind(0)
    assert torch.equal(p2p.fuse_self(p_src, p_edit, None), p_src)
    mask = torch.rand(2, 1, 16, 1, generator=g) > 0.5
    fused = p2p.fuse_self(p_src[None].expand(2, -1, -1, -1), p_edit[None].expand(2, -1, -1, -1), mask)
    for f in range(2):
        for n in range(16):
            assert torch.equal(fused[f, :, n], (p_edit if mask[f, 0, n, 0] else p_src)[:, n])


def test_fuse_cross(tok):
    c_src, c_edit = cross_maps(layers=2, seed=3)
    target = "a silver fluffy jeep driving down a curvy road in the countryside"
    mapper, alphas = p2p.refine_mapper(tok, SOURCE, target)
    e = p2p.reweight_vector(tok, target, {"fluffy": 4.0})
    ones, zeros = torch.ones(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    # a zero gate (outside every window) returns the edit maps unchanged
    assert torch.equal(p2p.fuse_cross(c_src, c_edit, zeros, refine=(mapper, alphas), reweight=e), c_edit)
    assert torch.equal(p2p.fuse_cross(c_src, c_edit, zeros, mapper=torch.eye(L, dtype=torch.float64)), c_edit)
    # identity replace inside the window gives the source maps
    assert torch.equal(p2p.fuse_cross(c_src, c_edit, ones, mapper=torch.eye(L, dtype=torch.float64)), c_src)
    # refine + reweight, written out per token
    fused = p2p.fuse_cross(c_src, c_edit, ones, refine=(mapper, alphas), reweight=e)
    for j in range(L):
        expected = (c_src[..., int(mapper[j])] if alphas[j] == 1 else c_edit[..., j]) * e[j]
        torch.testing.assert_close(fused[..., j], expected, rtol=0, atol=1e-15)
    # per-token gate: gated tokens fused, others fresh
    gate = zeros.clone()
    gate[:5] = 1
    half = p2p.fuse_cross(c_src, c_edit, gate, refine=(mapper, alphas), reweight=e)
    assert torch.equal(half[..., 5:], c_edit[..., 5:])
    torch.testing.assert_close(half[..., :5], fused[..., :5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        p2p.fuse_cross(c_src, c_edit, ones)
