"""FateZero's settings and its plan: what to fuse, where and when (the official code's "controller").

Everything a FateZero edit decides before its first UNet call is fixed here, from the settings and the two
prompts, by prompt-to-prompt's pure functions (p2p.py):

    self_steps     edit steps i whose self-attention is fused: int(s0·S) ≤ i < int(s1·S)
    gate           (S, L) cross-attention gate: 1 where step i fuses token j, int(c0·(S+1)) ≤ i < int(c1·(S+1))
                   by default, per-word windows over their tokens
    mapper/refine  how source token maps reach target positions: word swap ("replace", when the prompts have
                   as many words) or refine (a token alignment)
    reweight       (L,) factors of the target words' maps
    blend words    token positions of the source and target blend words, and the 16² cross-attention layers
                   whose maps locate them
    fused(n)       which layers are fused (and stored): those with at most `max_tokens` queries

The recorder (what inversion stores) and the fusion (what the edit replaces) both read the same plan, so
they agree on every layer and step.

Dimension legend: S steps, L = 77 text tokens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..attention import AttnCall
from ..pipeline import StableDiffusion
from ..sampling import check_guidance
from . import p2p

LATENT_BLEND_WINDOW = (0.2, 0.8)  # the official code's fixed window for latent blending


@dataclass
class FateZeroSettings:
    """One official `p2p_config` entry under readable names (official key in brackets)."""

    cross_window: float | tuple[float, float] = 0.8  # [cross_replace_steps.default_] c or (c0, c1)
    word_windows: dict[str, float | tuple[float, float]] = field(default_factory=dict)  # [cross_replace_steps.<word>]
    self_window: float | tuple[float, float] = 0.6  # [self_replace_steps] s or (s0, s1)
    controller: str = "replace"  # [is_replace_controller] "replace" (refine when word counts differ) or "refine"
    reweight: dict[str, float] = field(default_factory=dict)  # [eq_params] target word -> factor
    blend_words: tuple[list[str], list[str]] | None = None  # [blend_words] (source words, target words)
    blend_self_attention: bool = False  # [blend_self_attention] mask the self-attention fusion
    blend_latents: bool = False  # [blend_latents]
    blend_threshold: float = 0.3  # [blend_th[0]]
    guidance: float = 7.5  # [guidance_scale]
    negative_prompt: str = ""  # the unconditional prompt (the official code: "")
    max_tokens: int | None = 1024  # fuse (and store) layers with at most this many queries; None: all layers
    chunk_frames: int = 8  # frames whose maps are formed at once in a fused layer (memory only)
    # corrected behaviour, off by default (p2p.py)
    fix_shift: bool = False  # replace mapper stays aligned after a swap that changes the token count
    strip_punctuation: bool = False  # "countryside," matches the word "countryside"
    mask_resize: str = "nearest"  # "nearest" (official, legacy) or "nearest-exact"

    def __post_init__(self):
        p2p.window_bounds(self.cross_window)
        p2p.window_bounds(self.self_window)
        for window in self.word_windows.values():
            p2p.window_bounds(window)
        for word, factor in self.reweight.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise ValueError(f"reweight[{word!r}] must be a finite number (10 is the official setting), "
                                 f"got {factor!r}")
        check_guidance(self.guidance)
        if isinstance(self.blend_threshold, bool) or not isinstance(self.blend_threshold, (int, float)) \
                or not math.isfinite(self.blend_threshold):
            raise ValueError(f"blend_threshold must be a finite number (0.3 is the official setting), "
                             f"got {self.blend_threshold!r}")
        if self.controller not in ("replace", "refine"):
            raise ValueError(f"controller must be 'replace' or 'refine', got {self.controller!r}")
        if self.blend_words is not None and (len(self.blend_words) != 2 or
                                             not all(isinstance(ws, (list, tuple)) for ws in self.blend_words)):
            raise ValueError(f"blend_words must be (source words, target words), two lists, got {self.blend_words!r}")
        # without blend words the official code builds no blender, so blend_self_attention means no mask (its
        # reconstruction configs say blend_words: None, blend_self_attention: True); latent blending needs them
        if self.blend_latents and not self.blend_words:
            raise ValueError("blend_latents needs blend_words (source words, target words)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive number of query tokens or None, got {self.max_tokens!r}")
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {self.chunk_frames!r}")
        if self.mask_resize not in ("nearest", "nearest-exact"):
            raise ValueError(f"mask_resize must be 'nearest' or 'nearest-exact', got {self.mask_resize!r}")


@dataclass
class Plan:
    """Everything the recorder and the fusion need to know, fixed before the first UNet call."""

    settings: FateZeroSettings
    steps: int
    timesteps: list[int]  # descending, edit order: edit step i runs at timesteps[i]
    self_steps: range
    gate: torch.Tensor  # (S, L) cross gate
    cross_steps: frozenset[int]  # steps with any token fused
    blend_steps: frozenset[int]  # steps that need the source maps of the blend layers
    blend_layers: frozenset[str]  # the 16² cross-attention layers (at 512²)
    blend_level: int
    mask_self: bool  # blend_self_attention with blend words: the self-attention fusion is masked (3b)
    source_positions: list[int]  # token positions of the source blend words
    target_positions: list[int]
    mapper: torch.Tensor | None  # replace
    refine: tuple[torch.Tensor, torch.Tensor] | None
    reweight: torch.Tensor | None
    source_prompt: str
    target_prompt: str

    @classmethod
    def make(cls, sd: StableDiffusion, s: FateZeroSettings, steps: int, source: str, target: str) -> "Plan":
        tok = sd.tokenizer
        check_words(s, source, target)
        for prompt in (source, target):
            if tok.token_count(prompt) > tok.max_length - 2:
                raise ValueError(f"prompt is longer than CLIP's {tok.max_length - 2} tokens; shorten it: {prompt[:60]!r}")
        timesteps = sd.scheduler.timesteps(steps).tolist()
        gate = p2p.cross_gate(tok, target, steps, s.cross_window, s.word_windows, s.strip_punctuation)
        self_steps = p2p.self_steps(steps, s.self_window)
        blend_steps = set()
        mask_self = s.blend_self_attention and bool(s.blend_words)
        if mask_self:
            blend_steps |= set(self_steps)
        if s.blend_latents:
            blend_steps |= set(latent_blend_steps(steps))
        word_swap = s.controller == "replace" and len(source.split(" ")) == len(target.split(" "))
        mapper = p2p.replace_mapper(tok, source, target, s.fix_shift, s.strip_punctuation) if word_swap else None
        refine = None if word_swap else p2p.refine_mapper(tok, source, target)
        reweight = p2p.reweight_vector(tok, target, s.reweight, s.strip_punctuation) if s.reweight else None
        # each token position once, however often its word is listed (the official code sets its weight once)
        positions = [sorted({p for w in words for p in p2p.word_positions(tok, prompt, w, s.strip_punctuation)})
                     for words, prompt in zip(s.blend_words or ([], []), (source, target))]
        levels = len(sd.unet.config.block_out_channels)
        level = min(2, levels - 1)  # SD1.5's 16² level at 512²: down_blocks.2 and up_blocks.1
        pattern = re.compile(rf"^(down_blocks\.{level}|up_blocks\.{levels - 1 - level})\.attentions\.\d+\..*attn2$")
        blend_layers = frozenset(n for n in sd.unet.attention_layers if pattern.search(n))
        return cls(s, steps, timesteps, self_steps, gate, frozenset(i for i in range(steps) if gate[i].any()),
                   frozenset(blend_steps), blend_layers, level, mask_self, positions[0], positions[1], mapper, refine, reweight,
                   source, target)

    def fused(self, n: int) -> bool:
        """Whether a layer with n queries is fused (and stored)."""
        return self.settings.max_tokens is None or n <= self.settings.max_tokens

    def records(self, call: AttnCall, n: int, i: int) -> bool:
        """Whether edit step i needs the store entry of this layer."""
        if call.is_cross:
            return (self.fused(n) and i in self.cross_steps) or (call.name in self.blend_layers and i in self.blend_steps)
        return self.fused(n) and i in self.self_steps

    def stored_steps(self) -> list[int]:
        """The edit steps with any store entry, ascending."""
        return sorted(set(self.self_steps) | self.cross_steps | self.blend_steps)


def check_words(s: FateZeroSettings, source: str, target: str) -> None:
    """ValueError naming the first word of the settings that is not a word of its prompt: reweighting and word
    windows name target words, blend_words (source words, target words). A word not there would be ignored."""
    source_words, target_words = s.blend_words or ([], [])
    for what, words, prompt in (("reweight", s.reweight, target), ("word_windows", s.word_windows, target),
                                ("blend source", source_words, source), ("blend target", target_words, target)):
        for word in words:
            if not isinstance(word, str) or not p2p.has_word(prompt, word, s.strip_punctuation):
                attached = isinstance(word, str) and not s.strip_punctuation and p2p.has_word(prompt, word, True)
                raise ValueError(f"FateZero {what} word {word!r} is not a word of the prompt {prompt!r}"
                                 + ("; it has punctuation attached there: turn strip_punctuation on" if attached else
                                    "; words are whole, space-separated words of the prompt"))


def latent_blend_steps(steps: int) -> range:
    """Steps i with int(0.2N) < i + 1 < int(0.8N), as the official code blends latents."""
    start, end = (int(w * steps) for w in LATENT_BLEND_WINDOW)
    return range(start, max(start, end - 1))


def level_grid(size: tuple[int, int], level: int) -> tuple[int, int]:
    """The token grid of UNet level `level` for latents of `size`: each downsampling halves, rounding up."""
    h, w = size
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w
