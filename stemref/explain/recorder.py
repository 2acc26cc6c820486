"""The recorder: keeps, from a run, what the pictures need, and nothing else.

A `Recorder` rides along in `RunInfo.recorder` (attention.py). The attention layers and processors ask it
`wants(what, layer, step)` and, only if it does, hand it what they computed (`add`). It keeps:

- "attention" (every attention layer): the output tokens of `feature_layer` (the last decoder
  self-attention, STEM's Fig. 6 layer): whole at `feature_step`, and at every step the mean cosine similarity
  of consecutive frames' features (reduced at once: the whole features of every step would not fit);
  and the cross-attention maps of `word_layers`, averaged over heads and layers, at every step.
- "bases" (STEM's EMAttention in `bases_layers`, at `bases_step`): each token's basis, the argmax of its
  responsibilities (one E-step against the bases the layer attended to), for every head.
- "keyframes" (TokenFlow's editor, every step): the keyframe of each batch.
- "matches" (TokenFlow's propagation in `match_layer` at `match_step`): each token's nearest token of its
  batch's keyframe.
- "blend_mask" (FateZero's editor, every step that blends): the source words' mask.

Only the last branch of each call is kept (rows branch-major: the conditional branch under guidance, the
video itself in an inversion). Everything is stored on the CPU, in float32 (float64 for float64 runs).

Dimension legend: F frames, h heads, N tokens of a layer (h' × w' grid), C channels, L text tokens, K bases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..em import responsibilities
from ..metrics import COSINE_EPS, LAST_DECODER_SELF_ATTENTION


@dataclass
class Recorder:
    feature_layer: str | None = LAST_DECODER_SELF_ATTENTION  # None: no features, no similarity curve
    feature_step: int | None = None  # the step whose whole features are kept (PCA); None: none
    bases_layers: tuple[str, ...] = ()  # STEM layers whose token-to-basis assignment is kept
    bases_step: int | None = None
    word_layers: frozenset[str] = frozenset()  # cross-attention layers whose maps are kept, every step
    word_tokens: int = 77  # text positions kept of each map (the prompt's tokens and its start token)
    match_layer: str | None = None  # TokenFlow: the layer whose keyframe matches are kept
    match_step: int | None = None
    keyframes: bool = False  # TokenFlow: keep each step's keyframes
    blend_masks: bool = False  # FateZero: keep each step's blend mask

    # what was recorded
    features: torch.Tensor | None = None  # (F, C, h', w') at feature_step
    similarity: dict[int, float] = field(default_factory=dict)  # step -> mean cosine of consecutive frames
    assignments: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (F, h, h', w') basis indices
    word_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (F, word_tokens, h', w')
    chosen_keyframes: dict[int, list[int]] = field(default_factory=dict)  # step -> keyframe of each batch
    batches: list[range] = field(default_factory=list)  # TokenFlow's batches of frames
    matches: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> (B, h', w') index into keyframe grid
    match_grid: tuple[int, int] | None = None
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (F, 1, h, w) bool

    # running state: per step, (sum of cosines, pairs, last frame's features) across calls of that step
    _pairs: dict[int, tuple[float, int, torch.Tensor]] = field(default_factory=dict, repr=False)
    _features: list[torch.Tensor] = field(default_factory=list, repr=False)
    _words: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict, repr=False)
    _bases: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def wants(self, what: str, name: str, step: int | None) -> bool:
        if what == "attention":
            return name == self.feature_layer or name in self.word_layers
        if what == "bases":
            return step == self.bases_step and name in self.bases_layers
        if what == "matches":
            return step == self.match_step and name == self.match_layer
        if what == "keyframes":
            return self.keyframes
        if what == "blend_mask":
            return self.blend_masks
        return False

    def add(self, what: str, name: str, step: int | None, **values: Any) -> None:
        getattr(self, f"_add_{what}")(name, step, **values)

    # ---- handlers ------------------------------------------------------------------------------------------
    def _add_attention(self, name: str, step: int | None, call, q: torch.Tensor, k: torch.Tensor,
                       out: torch.Tensor) -> None:
        frames, (h, w) = call.info.frames, call.info.hw
        if call.is_cross:
            if name in self.word_layers:
                self._add_words(step, q[-frames:], k[-frames:], h, w)
            return
        tokens = out[-frames:].detach().to(torch.promote_types(out.dtype, torch.float32))  # (F, N, C): last branch
        maps = tokens.transpose(1, 2).reshape(frames, -1, h, w)  # (F, C, h', w')
        self._add_similarity(step, maps)
        if step == self.feature_step:
            self._features.append(maps.cpu())
            self.features = torch.cat(self._features)

    def _add_similarity(self, step: int, maps: torch.Tensor) -> None:
        """Cosines of consecutive frames within this call, and across from the previous call of the same step
        (the 1-frame context can split a step's frames into several calls)."""
        total, pairs, last = self._pairs.get(step, (0.0, 0, None))
        video = maps if last is None else torch.cat([last.to(maps.device), maps])  # (n, C, h', w')
        if len(video) > 1:
            a, b = video[:-1], video[1:]
            cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(COSINE_EPS)  # (n − 1, h', w')
            total, pairs = total + cosine.mean(dim=(1, 2)).sum().item(), pairs + len(cosine)
        self._pairs[step] = (total, pairs, video[-1:].cpu())
        if pairs:
            self.similarity[step] = total / pairs

    def _add_words(self, step: int, q: torch.Tensor, k: torch.Tensor, h: int, w: int) -> None:
        """Mean over heads of softmax(q kᵀ/√d), (F, h, N, L) -> (F, L', h', w'), summed over the word layers."""
        work = torch.promote_types(q.dtype, torch.float32)
        scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * q.shape[-1] ** -0.5  # (F, h, N, L)
        maps = scores.softmax(dim=-1).mean(dim=1)[..., : self.word_tokens]  # (F, N, L')
        maps = maps.transpose(1, 2).reshape(q.shape[0], -1, h, w).cpu()  # (F, L', h', w')
        total, count = self._words.get(step, (0, 0))
        if count and total.shape[-2:] != maps.shape[-2:]:
            raise ValueError(f"word_layers must all be on one grid; got {tuple(total.shape[-2:])} and {(h, w)}")
        self._words[step] = (total + maps, count + 1)
        self.word_maps[step] = self._words[step][0] / self._words[step][1]

    def _add_bases(self, name: str, step: int | None, call, group: int, keys: torch.Tensor, bases: torch.Tensor,
                   tau: float, chunk: int | None) -> None:
        """Each token's basis in every head: argmax of its responsibilities to the bases (last branch)."""
        keys, mu = keys[-1], bases[-1]  # (h, T, d), (h, K, d)
        labels = torch.cat([responsibilities(piece, mu, tau).argmax(dim=-1)
                            for piece in keys.split(chunk or keys.shape[-2], dim=-2)], dim=-1)  # (h, T)
        hh, ww = call.info.hw
        per_frame = labels.view(labels.shape[0], -1, hh, ww).transpose(0, 1).cpu()  # (n, h, h', w')
        parts = self._bases.setdefault(name, [])
        if group == 0:
            parts.clear()
        parts.append(per_frame)
        self.assignments[name] = torch.cat(parts)  # (F, h, h', w')

    def _add_keyframes(self, name: str, step: int, keyframes: list[int], batches: list[range]) -> None:
        self.chosen_keyframes[step] = list(keyframes)
        self.batches = list(batches)

    def _add_matches(self, name: str, step: int, batch: int, nearest: torch.Tensor, hw: tuple[int, int]) -> None:
        self.matches[batch] = nearest.view(nearest.shape[0], *hw).cpu()  # (B, h', w')
        self.match_grid = hw

    def _add_blend_mask(self, name: str, step: int, mask: torch.Tensor) -> None:
        self.masks[step] = mask.cpu()


def level_layers(unet, level: int, kind: str = "attn1") -> list[str]:
    """The attention layers (`kind`: attn1 self, attn2 cross) of UNet level `level` (0: the latent grid, 1: half
    of it, …), encoder and decoder, in checkpoint order."""
    levels = len(unet.config.block_out_channels)
    prefixes = (f"down_blocks.{level}.", f"up_blocks.{levels - 1 - level}.")
    return [name for name in unet.attention_layers if name.startswith(prefixes) and name.endswith(kind)]



def inversion_recorder(unet, steps: int) -> Recorder:
    """What an inversion report shows: the features (PCA at the middle step, similarity at every step) and, under
    STEM, the bases of the last decoder self-attention layer at the 32² and 16² levels (at 512²), middle step."""
    bases = tuple(layers[-1] for layers in (level_layers(unet, 1), level_layers(unet, 2)) if layers)
    return Recorder(feature_step=steps // 2, bases_layers=bases, bases_step=steps // 2)


def tokenflow_recorder(unet, steps: int) -> Recorder:
    """Every step's keyframes, and the matches of the last decoder self-attention at the 32² level, middle step."""
    layers = level_layers(unet, 1)
    return Recorder(feature_layer=None, keyframes=True, match_layer=layers[-1] if layers else None,
                    match_step=steps // 2)


def fatezero_recorders(unet, tokenizer, source: str, target: str) -> tuple[Recorder, Recorder]:
    """(inversion, edit): the cross-attention maps of the 16² level (FateZero's blend layers) at every step, for
    the prompt's tokens; the edit's also the blend masks."""
    layers = frozenset(level_layers(unet, 2, "attn2"))
    tokens = lambda prompt: tokenizer.token_count(prompt) + 1  # the start token, then the prompt's
    return (Recorder(feature_layer=None, word_layers=layers, word_tokens=tokens(source)),
            Recorder(feature_layer=None, word_layers=layers, word_tokens=tokens(target), blend_masks=True))
