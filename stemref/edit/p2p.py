"""Prompt-to-prompt's pieces, as FateZero uses them, each a pure function of prompts or tensors.

FateZero fuses the attention maps recorded while inverting the source video (prompt P) into the pass that
denoises it under the target prompt P*. Cross-attention maps are indexed by the 77 CLIP token positions, so
editing them needs a correspondence between the tokens of P and P*:

    word_positions   a word of a prompt -> its token positions (SOT is position 0)
    replace_mapper   word swap ("a cat" -> "a dog"): a 77 × 77 matrix, C' = C_src · mapper
    refine_mapper    any edit: a global token alignment; C'_j = a_j C_src[m_j] + (1 − a_j) C_edit_j
    reweight_vector  scale chosen target words' maps ("watercolor" × 10)
    cross_gate       per step and token, whether the fused map replaces the fresh one (per-word windows)
    self_steps       the steps whose self-attention maps are replaced
    blend_map/mask   where the source words are, from the source cross-attention of the 16² layers
    fuse_self/cross  the fusion of probability maps at one step

The defaults reproduce the official code, quirks included (README, "Fidelity"): words
are whole space-separated words matched exactly, the cross window is int(c·(N+1)), the mask is resized with
legacy nearest interpolation and normalised per frame. Two plainly wrong cases have corrected options,
off by default: `strip_punctuation` finds "countryside" in "... countryside, ..." and `fix_shift` keeps the
replace mapper aligned after a swapped word whose token count changes.

Dimension legend:
  L  text tokens (77), F frames, h heads, n query tokens of a layer (its h' × w' grid), S steps
"""
from __future__ import annotations

import string

import torch
import torch.nn.functional as F

from ..tokenizer import END_OF_WORD, CLIPTokenizer

L = 77


def word_positions(tokenizer: CLIPTokenizer, prompt: str, word: str | int, strip_punctuation: bool = False) -> list[int]:
    """Token positions (1 … 75; 0 is SOT) of every occurrence of `word` (a string, or the index of a word).

    Words are the prompt split on single spaces, as prompt-to-prompt's get_word_inds: "a  dog" has an empty
    word, and "countryside," is not "countryside". A word's tokens are found by walking the prompt's tokens
    and counting the characters each one decodes to. `strip_punctuation` compares words without leading and
    trailing punctuation and leaves out the tokens of that punctuation ("countryside," -> the one token of
    "countryside").
    """
    words = prompt.split(" ")
    places = [word] if isinstance(word, int) else _places(words, word, strip_punctuation)
    if not places:
        return []
    out, length, place = [], 0, 0
    for position, token in enumerate(token_texts(tokenizer, prompt), start=1):
        if place == len(words):
            break
        w = words[place]
        start, length = length, length + len(token)
        if place in places:
            core_start, core_end = len(w) - len(w.lstrip(string.punctuation)), len(w.rstrip(string.punctuation))
            if not strip_punctuation or (start < core_end and length > core_start):
                out.append(position)
        if length >= len(w):
            place, length = place + 1, 0
    return out


def has_word(prompt: str, word: str, strip_punctuation: bool = False) -> bool:
    """Whether `word` is one of the prompt's words, matched as `word_positions` matches them."""
    return bool(_places(prompt.split(" "), word, strip_punctuation))


def _places(words: list[str], word: str, strip_punctuation: bool) -> list[int]:
    core = (lambda w: w.strip(string.punctuation)) if strip_punctuation else (lambda w: w)
    return [i for i, w in enumerate(words) if core(w) == core(word)]


def token_texts(tokenizer: CLIPTokenizer, prompt: str) -> list[str]:
    """The text each token of `prompt` decodes to, without the end-of-word mark: "watercolor" -> ["watercolor"]."""
    by_id = {i: token for token, i in tokenizer.vocab.items()}
    to_byte = {c: b for b, c in tokenizer.byte_chars.items()}
    texts = []
    for i in tokenizer.encode(prompt):
        symbol = by_id[i].removesuffix(END_OF_WORD)
        texts.append(bytes(to_byte[c] for c in symbol).decode("utf-8", errors="replace"))
    return texts


def replace_mapper(tokenizer: CLIPTokenizer, source: str, target: str, fix_shift: bool = False,
                   strip_punctuation: bool = False) -> torch.Tensor:
    """(L, L) float64: C' = C_src · mapper maps source token maps onto the target's positions (word swap).

    The prompts must have as many words. Unchanged tokens map one to one; a swapped word's source tokens
    spread over its target tokens with weights 1/len(target tokens), so each row sums to 1. The official
    code (prompt-to-prompt's seq_aligner) writes the tokens after the last swap at (j, j) instead of (i, j):
    after a swap that changes the token count every later word is misaligned. `fix_shift` writes (i, j).
    """
    words_x, words_y = source.split(" "), target.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(f"a word swap needs prompts with as many words; {source!r} has {len(words_x)}, "
                         f"{target!r} has {len(words_y)} (use the refine controller)")
    swapped = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    source_inds = [word_positions(tokenizer, source, i, strip_punctuation) for i in swapped]
    target_inds = [word_positions(tokenizer, target, i, strip_punctuation) for i in swapped]
    mapper = torch.zeros(L, L, dtype=torch.float64)
    i = j = current = 0
    while i < L and j < L:
        if current < len(source_inds) and source_inds[current] and source_inds[current][0] == i:
            xs, ys = source_inds[current], target_inds[current]
            if len(xs) == len(ys):
                mapper[xs, ys] = 1
            else:
                for y in ys:
                    mapper[xs, y] = 1 / len(ys)
            current += 1
            i, j = i + len(xs), j + len(ys)
        elif current < len(source_inds):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[i if fix_shift else j, j] = 1
            i, j = i + 1, j + 1
    return mapper


def refine_mapper(tokenizer: CLIPTokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper (L,) long, alphas (L,) float64) from a global alignment of the two token sequences.

    Needleman-Wunsch with gap 0, match 1, mismatch −1 over [SOT, tokens, EOT]. Target token j takes the source
    map mapper[j] with alpha 1, or, if it has no source token (new words), alpha 0 and mapper −1 (index L−1).
    Positions after the target's EOT take source position j (official; it can be a source word).
    """
    x = [tokenizer.start_id, *tokenizer.encode(source), tokenizer.end_id]
    y = [tokenizer.start_id, *tokenizer.encode(target), tokenizer.end_id]
    pairs = _align(x, y)  # (j, i or -1) per target token
    mapper = torch.cat([torch.tensor([i for _, i in pairs]), len(y) + torch.arange(L - len(y))])
    alphas = torch.ones(L, dtype=torch.float64)
    alphas[: len(y)] = torch.tensor([float(i != -1) for _, i in pairs], dtype=torch.float64)
    return mapper, alphas


def _align(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """Global alignment of x and y; for each position j of y, the aligned position of x or −1."""
    gap, match, mismatch = 0, 1, -1
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    trace = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]  # 1 left, 2 up, 3 diagonal
    for j in range(1, len(y) + 1):
        score[0][j], trace[0][j] = j * gap, 1
    for i in range(1, len(x) + 1):
        score[i][0], trace[i][0] = i * gap, 2
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1] + gap, score[i - 1][j] + gap
            diagonal = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i][j] = max(left, up, diagonal)
            # ties prefer left, then up, as the official code does
            trace[i][j] = 1 if score[i][j] == left else 2 if score[i][j] == up else 3
    pairs, i, j = [], len(x), len(y)
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i][j] == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    return pairs[::-1]


def reweight_vector(tokenizer: CLIPTokenizer, prompt: str, weights: dict[str, float],
                    strip_punctuation: bool = False) -> torch.Tensor:
    """(L,) float64: weights[word] at each token of each occurrence of the word in `prompt`, 1 elsewhere."""
    e = torch.ones(L, dtype=torch.float64)
    for word, value in weights.items():
        e[word_positions(tokenizer, prompt, word, strip_punctuation)] = float(value)
    return e


def window_bounds(window: float | tuple[float, float]) -> tuple[float, float]:
    """A window as the official configs write it: c means (0, c); (a, b) is itself. Fractions of the steps."""
    start, end = (0.0, window) if isinstance(window, (int, float)) else window
    if not 0 <= start <= end <= 1:
        raise ValueError(f"a window is a fraction of the steps c or a pair (start, end) with 0 ≤ start ≤ end ≤ 1, "
                         f"got {window!r}")
    return float(start), float(end)


def self_steps(steps: int, window: float | tuple[float, float]) -> range:
    """The steps i whose self-attention is fused: int(s0·N) ≤ i < int(s1·N)."""
    start, end = window_bounds(window)
    return range(int(start * steps), int(end * steps))


def cross_gate(tokenizer: CLIPTokenizer, target: str, steps: int, window: float | tuple[float, float],
               word_windows: dict[str, float | tuple[float, float]] | None = None,
               strip_punctuation: bool = False) -> torch.Tensor:
    """(S, L) float64: 1 where step i fuses token j's cross-attention map, else 0.

    The default window covers int(c0·(N+1)) ≤ i < int(c1·(N+1)) (note N+1, as the official code); a word of
    the target prompt named in `word_windows` gets its own window over its tokens.
    """
    gate = torch.zeros(steps + 1, L, dtype=torch.float64)
    for positions, bounds in [(slice(None), window), *[
            (word_positions(tokenizer, target, word, strip_punctuation), w) for word, w in (word_windows or {}).items()]]:
        start, end = window_bounds(bounds)
        gate[:, positions] = 0
        gate[int(start * (steps + 1)): int(end * (steps + 1)), positions] = 1
    return gate[:steps]


def blend_map(cross_maps: list[torch.Tensor], positions: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(F, 1, h', w'): where the words at `positions` are, from cross-attention maps of one grid size.

    cross_maps are probability maps (F, h, h'·w', L) of the 16² layers at one step, all on `grid` (h', w'). The
    words' token maps are summed, averaged over layers and heads, then dilated by a 3 × 3 max-pool. Computed
    in float32 (float64 for float64 maps).
    """
    dtype = torch.float64 if cross_maps[0].dtype == torch.float64 else torch.float32
    maps = torch.cat([m.to(dtype) for m in cross_maps], dim=1)  # (F, layers·h, n, L)
    a = maps[..., positions].sum(-1).mean(1)  # (F, n)
    return F.max_pool2d(a.view(a.shape[0], 1, *grid), 3, stride=1, padding=1)  # (F, 1, h', w')


def blend_mask(a: torch.Tensor, size: tuple[int, int], threshold: float, mode: str = "nearest") -> torch.Tensor:
    """(F, 1, H, W) bool: the blend map a (F, 1, h', w') resized to `size`, divided by each frame's maximum, > τ.

    `mode` "nearest" is the official (legacy) resize; "nearest-exact" centres the samples. A frame without the
    words (all zeros) divides 0 by 0 and gives an empty mask, as the official code does. τ ≥ 1 gives no mask.
    """
    a = F.interpolate(a, size=size, mode=mode)  # (F, 1, H, W)
    peak = a.amax(dim=(-2, -1), keepdim=True)  # (F, 1, 1, 1)
    return (a / peak) > threshold  # NaN > τ is False


def fuse_self(p_src: torch.Tensor, p_edit: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """S = M ⊙ S_edit + (1 − M) ⊙ S_src, with M (F, 1, n, 1) bool per query (None: M ≡ 0, full replacement)."""
    return p_src if mask is None else torch.where(mask, p_edit, p_src)


def fuse_cross(c_src: torch.Tensor, c_edit: torch.Tensor, gate: torch.Tensor, *, mapper: torch.Tensor | None = None,
               refine: tuple[torch.Tensor, torch.Tensor] | None = None,
               reweight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention maps (..., n, L) of the edit at one step: α C'' + (1 − α) C_edit, α = gate (L,).

    C' is C_src · mapper (replace) or a_j C_src[..., m_j] + (1 − a_j) C_edit[..., j] (refine); C'' = C' ⊙ e
    with the reweighting vector e (no renormalisation, as the official code). Exactly one of mapper/refine.
    """
    if (mapper is None) == (refine is None):
        raise ValueError("pass exactly one of mapper (replace) and refine (mapper, alphas)")
    if mapper is not None:
        fused = c_src @ mapper.to(c_src)  # (..., n, L)
    else:
        index, alphas = refine
        alphas = alphas.to(c_src)
        fused = c_src[..., index] * alphas + c_edit * (1 - alphas)  # index −1 reads position L−1, with alpha 0
    if reweight is not None:
        fused = fused * reweight.to(c_src)
    gate = gate.to(c_src)
    return fused * gate + c_edit * (1 - gate)
