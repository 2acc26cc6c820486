"""FateZero's two attention processors: the Recorder (inversion: store) and the Fusion (edit: fuse).

Both run every attention layer; both consult the Plan (fatezero_plan.py) for whether a layer at a step is
fused, and otherwise run the layer's plain context.

The paper (FateZero, Qi et al., ICCV 2023, section "FateZero Video Editing"). "Inversion Attention Fusion":
DDIM inversion under the source prompt keeps the self- and cross-attention maps s_t^src, c_t^src of every
step t, and the edit's attention at step t is fused with them; cross-attention as in Prompt-to-Prompt (Hertz
et al., ICLR 2023: word swap, refinement, re-weighting; p2p.py), self-attention replaced. "Attention Map
Blending": M_t = HeavisideStep(c_t^src, τ), a binary mask thresholded from the source cross-attention of the
edited words, and s_t^fused = M_t ⊙ s_t^edit + (1 − M_t) ⊙ s_t^src (`Fusion._self`; M: `Fusion._self_mask`,
recipe and the official code's additions in fatezero.py, step 3b).

Recomputed maps. The store (attention_store.py) never holds a map. A layer's q and k are its own projections
of its input tokens x (`AttnCall.x`), so the Recorder keeps x of every frame of the conditional branch (for
cross-attention also the source prompt's keys, for STEM the bases μ), and the Fusion recomputes
q = to_q(x), k = to_k(x) and the map softmax(q kᵀ/√d) at edit time: the maps come back bit for bit.

Self-attention maps under a fixed context. For every context but STEM, frame f attends to the tokens of a
fixed list of frames (`context.visible_frames`), so a map is softmax(q_f K_fᵀ/√d) over the same key set in inversion and
edit, and S = M ⊙ S_edit + (1 − M) ⊙ S_src mixes like with like.

Self-attention maps under STEM. Frame f attends to K bases μ estimated by EM from all tokens of the video:
the inversion's map is A_src = softmax(q_src μ_srcᵀ/√d), (F, h, N, K). A fresh EM on the edit's tokens would
give bases in another order and place, so basis k of the edit would not be basis k of the source and the
fused map would mix unrelated columns. So inside the self window the edit does not run its own EM: it forms
its bases from the *source's responsibilities*. With z = E-step(k_src, μ_src) (each source token's soft
assignment to the source bases) and z̄ = z normalised over tokens,

    μ_edit = z̄ᵀ k_edit,   ν_edit = z̄ᵀ v_edit,   A_edit = softmax(q_edit μ_editᵀ/√d),   out = A ν_edit,

so basis k summarises the same tokens (the same places of the same frames) in both branches, and both maps
attend over the same key set. Where the edit leaves a token's features alone, μ_edit is μ_src after one more
EM iteration; where it changes them, the bases carry the new features, and the fused map (A_src outside the
mask) decides only *where* each query looks, as FateZero intends. z̄ is recomputed at edit time from the
stored x and μ_src. Outside the self window (and in the unconditional branch) STEM runs as during
inversion, with fresh bases.

Several processes (RunInfo.shard): a rank holds its frames' store and edits its frames. Under a fixed context
the Fusion fetches, with `visible_frames`, the source keys and the edited keys and values of the frames its
frames see (one transfer per layer); under STEM, z̄ᵀk_edit, z̄ᵀv_edit and Σ_t z are sums over tokens,
all-reduced across the ranks (em.weighted_means), so every rank forms the single process's μ_edit and ν_edit.

Dimension legend:
  F frames, h heads, N query tokens of a layer, d head dim, L = 77 text tokens, K bases, G EM scopes,
  C channels
"""
from __future__ import annotations

import torch

from ..attention import AttnCall, Processor, split_heads
from ..context import EMAttention, gather_frames, visible_frames
from ..distributed import Shard
from ..em import compute_dtype, weighted_means
from ..pipeline import StableDiffusion
from . import p2p
from .attention_store import AttentionStore, StepReader
from .fatezero_plan import Plan


# ---- attention maps ----------------------------------------------------------------------------------------
def probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) over the keys, the softmax in float32 (float64 for float64): (..., N, d), (..., M, d) -> (..., N, M).

    q and k are made contiguous first: a matrix product's rounding depends on its operands' memory layout, and
    the source maps must come out the same however q and k were viewed (store, gather or head split).
    """
    scores = (q.contiguous() @ k.contiguous().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (..., N, M)
    return torch.softmax(scores, dim=-1, dtype=compute_dtype(q)).to(q.dtype)


def _video(x: torch.Tensor) -> torch.Tensor:
    """Frames as one token sequence: (..., n, h, N, d) -> (..., h, n·N, d)."""
    return x.transpose(-4, -3).flatten(-3, -2)  # (..., h, n·N, d)


def _frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _video: (..., h, n·N, d) -> (..., n, h, N, d)."""
    *lead, h, T, d = x.shape
    return x.view(*lead, h, n, T // n, d).transpose(-4, -3)  # (..., n, h, N, d)


# ---- step 2: recording -------------------------------------------------------------------------------------
class Recorder:
    """Inversion's processor for every layer: runs the layer's context and stores what the edit will fuse.

    Inversion step j runs at the timestep of edit step i = S − 1 − j; the store is keyed by that timestep.
    Only the conditional (last) branch is stored: each layer's input tokens x (from which its own to_q and
    to_k give back q and k exactly), the source prompt's keys of cross-attention layers (L tokens, stored as
    computed rather than recomputed, so that they match to the last bit), and under STEM the key bases.
    """

    def __init__(self, plan: Plan, store: AttentionStore, contexts: dict[str, Processor]):
        self.plan, self.store, self.contexts = plan, store, contexts

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        plan, frames = self.plan, call.info.frames
        i = plan.steps - 1 - call.info.step
        context = self.contexts[call.name]
        if not plan.records(call, q.shape[-2], i):
            return context(q, k, v, call)
        t = plan.timesteps[i]
        x = call.x[-frames:]  # (F, N, C): q and k are recomputed from it with the layer's projections
        if call.is_cross:  # the prompt's keys, one frame's: the same for every frame and tiny (L tokens)
            self.store.add(t, call.name, {"x": x, "k": k[-1:]})
            return context(q, k, v, call)
        if not isinstance(context, EMAttention):
            self.store.add(t, call.name, {"x": x})
            return context(q, k, v, call)
        out, bases = context.attend(q, k, v, call)
        if any(mu is None for mu in bases):
            raise ValueError("FateZero fuses STEM attention through its bases: turn all_frame_if_few_tokens off")
        self.store.add(t, call.name, {"x": x, "mu": torch.stack([mu[-1] for mu in bases])})  # (G, h, K, d)
        return out


# ---- step 3: fusing ----------------------------------------------------------------------------------------
class Fusion:
    """The edit's processor for every layer: the plain context, except in the conditional branch of fused layers
    inside their windows, where the maps are fused with the source maps recomputed from the store."""

    def __init__(self, sd: StableDiffusion, plan: Plan, contexts: dict[str, Processor], blend_grid: tuple[int, int]):
        self.plan, self.contexts, self.layers = plan, contexts, sd.unet.attention_layers
        self.blend_grid = blend_grid  # the blend layers' token grid (h', w')
        self.reader: tuple[int, StepReader] | None = None  # (edit step, its store entry), set by `denoise`
        self.target_sums: dict[str, torch.Tensor] = {}  # latent blending: running sums of target-word maps
        self._blend: tuple[int, torch.Tensor] | None = None  # (step, source blend map) cache

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        i, frames, n = call.info.step, call.info.frames, q.shape[-2]
        context = self.contexts[call.name]
        if call.is_cross:
            fuse = self.plan.fused(n) and i in self.plan.cross_steps  # 3c
            track = self.plan.settings.blend_latents and call.name in self.plan.blend_layers  # for 5
            if not (fuse or track):
                return context(q, k, v, call)
            cond = self._cross(q[-frames:], k[-frames:], v[-frames:], call, fuse, track)
        else:
            if not (self.plan.fused(n) and i in self.plan.self_steps):  # 3a
                return context(q, k, v, call)
            cond = self._self(q[-frames:], k[-frames:], v[-frames:], call, context)
        if q.shape[0] == frames:
            return cond
        rest = context(q[:-frames], k[:-frames], v[:-frames], call)  # the unconditional branch, never fused
        return torch.cat([rest, cond])

    def _step(self, i: int) -> StepReader:
        step, reader = self.reader
        if step != i:
            raise RuntimeError(f"store entry of step {step} open during step {i}")
        return reader

    def _stored(self, call: AttnCall, key: str, like: torch.Tensor) -> torch.Tensor:
        x = self._step(call.info.step).get(call.name, key)
        if x is None:
            raise RuntimeError(f"the attention store has no {key} of {call.name} at step {call.info.step}")
        return x.to(like.device)

    def source_qk(self, call: AttnCall, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's q (F, h, N, d) and k: (F, h, N, d) for self-attention, the source prompt's (1, h, L, d) for
        cross-attention. q and self-attention k are the stored x through the layer's own projections."""
        return source_qk(self.layers[call.name], self._step(call.info.step), call.name, call.is_cross, like.device)

    def _cross(self, q, k, v, call: AttnCall, fuse: bool, track: bool) -> torch.Tensor:
        """3c: the cross-attention output from the fused map; with `track`, adds up the target words' maps (5)."""
        c_edit = probabilities(q, k)  # (F, h, N, L)
        plan, i = self.plan, call.info.step
        if track:
            words = c_edit[..., plan.target_positions]
            self.target_sums[call.name] = self.target_sums.get(call.name, 0) + words
        c = c_edit
        if fuse:
            c_src = probabilities(*self.source_qk(call, q))
            # Inversion Attention Fusion of the cross-attention: Prompt-to-Prompt's edits of c^src, inside the gate
            c = p2p.fuse_cross(c_src, c_edit, plan.gate[i], mapper=plan.mapper, refine=plan.refine,
                               reweight=plan.reweight)
        return c @ v

    def _self(self, q, k, v, call: AttnCall, context: Processor) -> torch.Tensor:
        """3a: the self-attention output from S = M ⊙ S_edit + (1 − M) ⊙ S_src (FateZero's Attention Map Blending),
        under a fixed context or STEM."""
        frames, chunk = q.shape[0], self.plan.settings.chunk_frames
        mask = self._self_mask(call)  # (F, 1, N, 1) or None
        q_src, k_src = self.source_qk(call, q)
        if isinstance(context, EMAttention):
            return self._self_stem(q, k, v, q_src, k_src, self._stored(call, "mu", q), context, mask, call.info.shard)
        d = k.shape[-1]
        # the source keys and the edited keys and values of the frames each frame sees: one table, one transfer
        table, index = visible_frames(context, torch.cat([k_src, k, v], dim=-1)[None], q.shape[1] * d,
                                      call.info.shard)  # (1, U, h, N, 2d + dv), (F, m)
        outs = []
        for f in range(0, frames, chunk):
            rows = slice(f, f + chunk)
            seen = gather_frames(table, index[rows])[0]  # (n, h, m·N, 2d + dv)
            p_src = probabilities(q_src[rows], seen[..., :d])  # (n, h, N, m·N)
            p_edit = probabilities(q[rows], seen[..., d:2 * d])
            p = p2p.fuse_self(p_src, p_edit, None if mask is None else mask[rows])  # FateZero's s_t^fused
            outs.append(p @ seen[..., 2 * d:].contiguous())  # (n, h, N, dv)
        return torch.cat(outs)

    def _self_stem(self, q, k, v, q_src, k_src, mu_src, context: EMAttention, mask,
                   shard: Shard | None) -> torch.Tensor:
        """STEM inside the self window: the edit's bases from the source's responsibilities (module docstring; not in
        either paper: the maps fused are query-to-basis maps, (h, n·N, K), not FateZero's token-to-token maps)."""
        scope = context.scope or q.shape[0]
        outs = []
        for g, f in enumerate(range(0, q.shape[0], scope)):
            rows = slice(f, f + scope)
            mu_edit, nu_edit = bases_from_source(_video(k_src[rows]), mu_src[g], _video(k[rows]), _video(v[rows]),
                                                 context.tau, context.chunk, shard)  # (h, K, ·)
            a_src = probabilities(_video(q_src[rows]), mu_src[g])  # (h, n·N, K)
            a_edit = probabilities(_video(q[rows]), mu_edit)
            m = None if mask is None else mask[rows].reshape(1, -1, 1)  # (1, n·N, 1)
            outs.append(_frames(p2p.fuse_self(a_src, a_edit, m) @ nu_edit, q[rows].shape[0]))  # (n, h, N, dv)
        return torch.cat(outs)

    def _self_mask(self, call: AttnCall) -> torch.Tensor | None:
        """3b: M on this layer's grid, (F, 1, N, 1) bool, or None (M ≡ 0) without `blend_self_attention` and words."""
        s = self.plan.settings
        if not self.plan.mask_self:
            return None
        mask = p2p.blend_mask(self.source_blend_map(call.info.step), call.info.hw, s.blend_threshold, s.mask_resize)
        return mask.flatten(2)[..., None]  # (F, 1, N, 1)

    def source_blend_map(self, i: int) -> torch.Tensor:
        """(F, 1, h', w'): the source words' blend map at step i, from the stored 16² cross-attention queries."""
        if self._blend is None or self._blend[0] != i:
            reader, device = self._step(i), next(iter(self.layers.values())).to_q.weight.device
            maps = [probabilities(*source_qk(self.layers[name], reader, name, True, device))
                    for name in sorted(self.plan.blend_layers)]
            self._blend = (i, p2p.blend_map(maps, self.plan.source_positions, self.blend_grid))
        return self._blend[1]

    def latent_mask(self, i: int, size: tuple[int, int]) -> torch.Tensor:
        """5: the latent mask (F, 1, h, w) bool, source words (inversion maps) ∪ target words (running sums of the
        edit's maps)."""
        s = self.plan.settings
        source = p2p.blend_mask(self.source_blend_map(i), size, s.blend_threshold, s.mask_resize)
        sums = [self.target_sums[name] for name in sorted(self.plan.blend_layers)]
        positions = list(range(len(self.plan.target_positions)))
        target = p2p.blend_mask(p2p.blend_map(sums, positions, self.blend_grid), size, s.blend_threshold,
                                s.mask_resize)
        return source | target


def source_qk(layer, reader: StepReader, name: str, is_cross: bool,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's source q and k from its store entry (see Fusion.source_qk)."""
    x = reader.get(name, "x")
    if x is None:
        raise RuntimeError(f"the attention store has no entry of {name} at this step")
    x = x.to(device)
    q = split_heads(layer.to_q(x), layer.heads)
    if not is_cross:
        return q, split_heads(layer.to_k(x), layer.heads)
    # the prompt's keys, one copy per frame as inversion had them (a broadcast product would round differently)
    return q, reader.get(name, "k").to(device).expand(q.shape[0], -1, -1, -1)


def bases_from_source(k_src: torch.Tensor, mu_src: torch.Tensor, k_edit: torch.Tensor, v_edit: torch.Tensor,
                      tau: float, chunk: int | None, shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """μ_edit = z̄ᵀ k_edit, ν_edit = z̄ᵀ v_edit with z̄ the source tokens' responsibilities to the source bases.

    k_src, k_edit (h, T, d), v_edit (h, T, dv), mu_src (h, K, d) -> (h, K, d), (h, K, dv): one M-step of the
    source's EM (em.weighted_means): responsibilities from the source, pooling the edit's keys and values. With a
    shard, the tokens are this rank's and the sums are all-reduced: every rank gets the whole video's bases.
    """
    mu, nu = weighted_means(k_src, mu_src, tau, pool=[k_edit, v_edit], chunk=chunk, shard=shard)
    return mu.to(k_edit.dtype), nu.to(v_edit.dtype)
