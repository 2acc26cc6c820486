"""FateZero (Qi et al., ICCV 2023): edit a video by fusing the attention of its inversion into the edit.

    frames ─VAE─► x_0 ─DDIM inversion, source prompt P, any context─► x_T      records the store
    x_T ─DDIM with CFG ("" / target P*)─► x̂_0 ─VAE─► edited frames          fuses the store, conditional half only

At edit step i (timestep t_i) the conditional branch's attention in every fused layer (query length ≤ 1024 by
default, i.e. all but the 64² level at 512²) uses the source maps recomputed from the store entry inversion
wrote at the same t_i:
- self-attention, for i in the self window: S = M ⊙ S_edit + (1 − M) ⊙ S_src, M the blend mask of the source
  words (from the source cross-attention of the 16² layers), or M ≡ 0 without blending;
- cross-attention, per token inside its window: prompt-to-prompt replace (word swap), refine (token alignment)
  and reweighting of the target words (p2p.py), else the fresh map;
- optionally latent blending: outside the union of the source and target word masks the latents are reset to
  the inversion's.
The unconditional branch, the 64² layers and the steps outside the windows run the plain context.

Contexts. Inversion and edit use the same self-attention context (stemref.context): FateZero's own
spatial-temporal attention ("fatezero": the middle frame in layers of ≥ 640 channels), or "1-frame",
"2-frame", "all-frame", "stem". For every context but STEM, frame f attends to the tokens of a fixed list of
frames (`context.visible_frames`), so a map is softmax(q_f K_fᵀ/√d) over the same key set in inversion and edit.

STEM. Under STEM, frame f attends to K bases μ estimated by EM from all tokens of the video: the inversion's
map is A_src = softmax(q_src μ_srcᵀ/√d), (F, h, N, K). A fresh EM on the edit's tokens would give bases in
another order and place, so basis k of the edit would not be basis k of the source and S = M ⊙ A_edit +
(1 − M) ⊙ A_src would mix unrelated columns. So inside the self window the edit does not run its own EM:
it forms its bases from the *source's responsibilities*. With z = E-step(k_src, μ_src) (each source token's
soft assignment to the source bases) and z̄ = z normalised over tokens,

    μ_edit = z̄ᵀ k_edit,   ν_edit = z̄ᵀ v_edit,   A_edit = softmax(q_edit μ_editᵀ/√d),   out = A ν_edit,

so basis k summarises the same tokens (the same places of the same frames) in both branches, and both maps
attend over the same key set. Where the edit leaves a token's features alone, μ_edit is μ_src after one more
EM iteration; where it changes them, the bases carry the new features, and the fused map (A_src outside the
mask) decides only *where* each query looks, as FateZero intends. The store holds the layer's input tokens
of every frame (which give q_src and k_src) and μ_src (G, h, K, d) per EM scope; z̄ is recomputed at edit
time. Outside the self window (and in the unconditional branch) STEM runs as during inversion, with fresh
bases.

Store. Maps are recomputed, never stored (attention_store.py). A layer's q and k are its own projections of
its input tokens x (`AttnCall.x`), so the store keeps x of every frame of the conditional branch, once per
layer and step, and recomputes q = to_q(x), k = to_k(x) at edit time: the maps come back bit for bit. The
cross-attention keys are the source prompt's, 77 per layer whatever the frames. At 512² in fp16 that is
20 MB per frame per step (11 self- and 11 cross-attention layers below 64², any context; STEM adds K bases
per layer and step, not per frame) against the official code's 97 MB of maps, and only the steps inside the
windows are recorded. The store spills to disk beyond a memory budget. Given a saved `Inversion` instead of
frames, the inversion's UNet calls are replayed on its latents to record the store (the same calls, so the
same maps).

Several processes (`group=`, distributed.py): each rank encodes, inverts and edits its contiguous shard of the
frames, and keeps the store of its own frames (spilling as usual). The contexts fetch what crosses shards as in
inversion (FateZero's middle frame is broadcast, 2-frame's first and previous frames, all-frame's keys and
values); the fusion fetches the source and edited keys and edited values of those same frames in one transfer
per layer, and under STEM the edit's bases come from all-reduced sums of the source responsibilities, so every
rank fuses exactly what the single process fuses. Each rank returns its shard's edited latents.

Official quirks kept (../shared/notes/fatezero.md): inversion without CFG; windows int(s·N)
for self and int(c·(N+1)) for cross; replace falls back to refine when the word counts differ; the blend mask
is nearest-resized, per-frame normalised and only used with `blend_self_attention`; latent blending resets to
the inversion latent one level noisier, for int(0.2N) < i+1 < int(0.8N). Not kept: FateZero's random VAE
sample (stemref encodes the posterior mean) and its Tune-A-Video temporal modules (identity at init).

Dimension legend:
  F frames, B branches (uncond, cond), h heads, N query tokens of a layer, d head dim, L = 77 text tokens,
  K bases, G EM scopes, S steps, C channels
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import torch.distributed as dist

from ..attention import AttnCall, Processor, RunInfo, sdpa, split_heads
from ..context import EMAttention, context_processor, gather_frames, visible_frames
from ..distributed import Shard, shard_frames
from ..em import compute_dtype, m_step
from ..inversion import SELF_ATTENTION, Inversion, InversionSettings
from ..pipeline import StableDiffusion, check_encodable
from ..sampling import Progress, ddim_inversion_loop, predict_noise
from . import p2p
from .attention_store import AttentionStore, StepReader

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
        if self.controller not in ("replace", "refine"):
            raise ValueError(f"controller must be 'replace' or 'refine', got {self.controller!r}")
        if self.blend_words is not None and (len(self.blend_words) != 2 or
                                             not all(isinstance(ws, (list, tuple)) for ws in self.blend_words)):
            raise ValueError(f"blend_words must be (source words, target words), two lists, got {self.blend_words!r}")
        if (self.blend_self_attention or self.blend_latents) and not self.blend_words:
            raise ValueError("blend_self_attention and blend_latents need blend_words (source words, target words)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive number of query tokens or None, got {self.max_tokens!r}")
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {self.chunk_frames!r}")
        if self.mask_resize not in ("nearest", "nearest-exact"):
            raise ValueError(f"mask_resize must be 'nearest' or 'nearest-exact', got {self.mask_resize!r}")


def edit(sd: StableDiffusion, frames_or_inversion: torch.Tensor | Inversion, source_prompt: str, target_prompt: str,
         **options) -> torch.Tensor:
    """Edit `frames` (F, 3, H, W) in [0, 1] (or a saved `Inversion` of them); the edited frames (see edit_latents)."""
    return sd.decode_latents(edit_latents(sd, frames_or_inversion, source_prompt, target_prompt, **options))


def edit_latents(sd: StableDiffusion, frames_or_inversion: torch.Tensor | Inversion, source_prompt: str,
                 target_prompt: str, *, steps: int = 50, context: str = "stem", context_options: dict | None = None,
                 seed: int = 0, memory_budget: int = 2**30, store_dir: str | Path | None = None,
                 keep_store: bool = False, progress: Progress | None = None, group: dist.ProcessGroup | None = None,
                 **settings) -> torch.Tensor:
    """The edited latents x_0 (F, 4, h, w) of `frames` (F, 3, H, W) in [0, 1], or of a saved `Inversion` of them.

    `context` and `context_options` choose the self-attention context of inversion and edit (ignored for an
    Inversion, which names its own), `seed` seeds STEM's EM. `settings` are FateZeroSettings' fields. The
    attention store keeps up to `memory_budget` bytes in memory and spills the rest to `store_dir` (a
    temporary folder by default), deleted at the end unless `keep_store`. With `group` the processes of the
    group edit together, each its shard of the frames (module docstring), and each returns its shard's latents.
    """
    unknown = sorted(set(settings) - {f.name for f in fields(FateZeroSettings)})
    if unknown:
        raise ValueError(f"unknown FateZero settings: {', '.join(unknown)}; "
                         f"known: {', '.join(f.name for f in fields(FateZeroSettings))}")
    s = FateZeroSettings(**settings)
    if isinstance(frames_or_inversion, Inversion):
        inversion, frames, shard = frames_or_inversion, None, None
        if group is not None and inversion.shard is None:
            inversion = inversion.local(group)
        if inversion.settings.prompt != source_prompt:
            raise ValueError(f"the inversion was made with the prompt {inversion.settings.prompt!r}, not the source "
                             f"prompt {source_prompt!r}; FateZero's source maps come from the inversion's prompt")
        inv = inversion.settings
    else:
        frames, inversion = frames_or_inversion, None
        check_encodable(frames)
        shard = shard_frames(frames.shape[0], group)
        inv = InversionSettings(source_prompt, steps, context, 1.0, SELF_ATTENTION, seed, dict(context_options or {}))
    plan = Plan.make(sd, s, inv.steps, source_prompt, target_prompt)
    with AttentionStore(memory_budget, store_dir, keep_store) as store:
        if inversion is None:
            inversion = record_inversion(sd, frames, inv, plan, store, progress, shard)
        else:
            replay_inversion(sd, inversion, plan, store, progress)
        return denoise(sd, inversion, plan, store, progress)


# ---- what to fuse, where and when ----------------------------------------------------------------------------
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
        for prompt in (source, target):
            if tok.token_count(prompt) > tok.max_length - 2:
                raise ValueError(f"prompt is longer than CLIP's {tok.max_length - 2} tokens; shorten it: {prompt[:60]!r}")
        timesteps = sd.scheduler.timesteps(steps).tolist()
        gate = p2p.cross_gate(tok, target, steps, s.cross_window, s.word_windows, s.strip_punctuation)
        self_steps = p2p.self_steps(steps, s.self_window)
        blend_steps = set()
        if s.blend_self_attention:
            blend_steps |= set(self_steps)
        if s.blend_latents:
            blend_steps |= set(latent_blend_steps(steps))
        word_swap = s.controller == "replace" and len(source.split(" ")) == len(target.split(" "))
        mapper = p2p.replace_mapper(tok, source, target, s.fix_shift, s.strip_punctuation) if word_swap else None
        refine = None if word_swap else p2p.refine_mapper(tok, source, target)
        reweight = p2p.reweight_vector(tok, target, s.reweight, s.strip_punctuation) if s.reweight else None
        positions = [[p for w in words for p in p2p.word_positions(tok, prompt, w, s.strip_punctuation)]
                     for words, prompt in zip(s.blend_words or ([], []), (source, target))]
        levels = len(sd.unet.config.block_out_channels)
        level = min(2, levels - 1)  # SD1.5's 16² level at 512²: down_blocks.2 and up_blocks.1
        pattern = re.compile(rf"^(down_blocks\.{level}|up_blocks\.{levels - 1 - level})\.attentions\.\d+\..*attn2$")
        blend_layers = frozenset(n for n in sd.unet.attention_layers if pattern.search(n))
        return cls(s, steps, timesteps, self_steps, gate, frozenset(i for i in range(steps) if gate[i].any()),
                   frozenset(blend_steps), blend_layers, level, positions[0], positions[1], mapper, refine, reweight,
                   source, target)

    def fused(self, n: int) -> bool:
        """Whether a layer with n queries is fused (and stored)."""
        return self.settings.max_tokens is None or n <= self.settings.max_tokens

    def records(self, call: AttnCall, n: int, i: int) -> bool:
        """Whether edit step i needs the store entry of this layer."""
        if call.is_cross:
            return (self.fused(n) and i in self.cross_steps) or (call.name in self.blend_layers and i in self.blend_steps)
        return self.fused(n) and i in self.self_steps


def latent_blend_steps(steps: int) -> range:
    """Steps i with int(0.2N) < i + 1 < int(0.8N), as the official code blends latents."""
    start, end = (int(w * steps) for w in LATENT_BLEND_WINDOW)
    return range(start, max(start, end - 1))


def probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) over the keys, the softmax in float32 (float64 for float64): (..., N, d), (..., M, d) -> (..., N, M).

    q and k are made contiguous first: a matrix product's rounding depends on its operands' memory layout, and
    the source maps must come out the same however q and k were viewed (store, gather or head split).
    """
    scores = (q.contiguous() @ k.contiguous().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (..., N, M)
    return torch.softmax(scores, dim=-1, dtype=compute_dtype(q)).to(q.dtype)


def _layer_contexts(sd: StableDiffusion, inv: InversionSettings) -> dict[str, Processor]:
    """Each attention layer's processor as the inversion ran it: the context where `inv.layers` matches."""
    generator = torch.Generator(sd.device).manual_seed(inv.seed)
    context = context_processor(inv.context, generator=generator, **inv.options)
    pattern = re.compile(inv.layers)
    return {name: context if pattern.search(name) else sdpa for name in sd.unet.attention_layers}


def _video(x: torch.Tensor) -> torch.Tensor:
    """Frames as one token sequence: (..., n, h, N, d) -> (..., h, n·N, d)."""
    return x.transpose(-4, -3).flatten(-3, -2)  # (..., h, n·N, d)


def _frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _video: (..., h, n·N, d) -> (..., n, h, N, d)."""
    *lead, h, T, d = x.shape
    return x.view(*lead, h, n, T // n, d).transpose(-4, -3)  # (..., n, h, N, d)


# ---- recording ---------------------------------------------------------------------------------------------
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


def _recording_eps(sd: StableDiffusion, inv: InversionSettings, frames: int, store: AttentionStore,
                   shard: Shard | None = None):
    cond = sd.encode_prompt(inv.prompt)
    uncond = sd.encode_prompt("") if inv.guidance != 1.0 else None

    def eps_fn(x: torch.Tensor, t: int, j: int) -> torch.Tensor:
        eps = predict_noise(sd, x, t, cond, uncond, inv.guidance, RunInfo(frames=frames, step=j, shard=shard))
        store.end_step(t)
        return eps
    return eps_fn


def record_inversion(sd: StableDiffusion, frames: torch.Tensor, inv: InversionSettings, plan: Plan,
                     store: AttentionStore, progress: Progress | None = None, shard: Shard | None = None) -> Inversion:
    """DDIM-invert `frames` under the inversion's context, recording the store on the way (with a shard: this
    rank's frames, returning its shard's Inversion)."""
    recorder = Recorder(plan, store, _layer_contexts(sd, inv))
    x = sd.encode_frames(frames if shard is None else frames[shard.start:shard.stop])
    eps_fn = _recording_eps(sd, inv, x.shape[0], store, shard)
    with sd.unet.attention(lambda name: recorder):
        path = ddim_inversion_loop(sd.scheduler, x, eps_fn, inv.steps, _phase(progress, 0, 2 * inv.steps))
    return Inversion(torch.stack(path), sd.scheduler.timesteps(inv.steps).flip(0).tolist(), inv, shard)


@torch.no_grad()
def replay_inversion(sd: StableDiffusion, inversion: Inversion, plan: Plan, store: AttentionStore,
                     progress: Progress | None = None) -> None:
    """Record the store of a saved inversion by running its UNet calls again on its latents.

    Call j saw latents[j] at ascending timestep j, so replaying it gives the same maps. STEM draws random
    bases at every call, so its replay runs every call up to the last one needed, in order.
    """
    inv = inversion.settings
    steps, ascending = inv.steps, inversion.timesteps
    needed = sorted(plan.steps - 1 - i for i in set(plan.self_steps) | plan.cross_steps | plan.blend_steps)
    if not needed:
        return
    contexts = _layer_contexts(sd, inv)
    random = any(isinstance(c, EMAttention) for c in contexts.values())
    calls = range(needed[-1] + 1) if random else needed
    recorder = Recorder(plan, store, contexts)
    eps_fn = _recording_eps(sd, inv, inversion.latents.shape[1], store, inversion.shard)
    with sd.unet.attention(lambda name: recorder):
        for j in calls:
            eps_fn(inversion.latents[j].to(sd.device, sd.dtype), ascending[j], j)
            if progress:
                progress(j + 1, 2 * steps)


def _phase(progress: Progress | None, done: int, total: int) -> Progress | None:
    return None if progress is None else (lambda n, _: progress(done + n, total))


# ---- editing -----------------------------------------------------------------------------------------------
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
            fuse = self.plan.fused(n) and i in self.plan.cross_steps
            track = self.plan.settings.blend_latents and call.name in self.plan.blend_layers
            if not (fuse or track):
                return context(q, k, v, call)
            cond = self._cross(q[-frames:], k[-frames:], v[-frames:], call, fuse, track)
        else:
            if not (self.plan.fused(n) and i in self.plan.self_steps):
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
        c_edit = probabilities(q, k)  # (F, h, N, L)
        plan, i = self.plan, call.info.step
        if track:
            words = c_edit[..., plan.target_positions]
            self.target_sums[call.name] = self.target_sums.get(call.name, 0) + words
        c = c_edit
        if fuse:
            c_src = probabilities(*self.source_qk(call, q))
            c = p2p.fuse_cross(c_src, c_edit, plan.gate[i], mapper=plan.mapper, refine=plan.refine,
                               reweight=plan.reweight)
        return c @ v

    def _self(self, q, k, v, call: AttnCall, context: Processor) -> torch.Tensor:
        frames, chunk = q.shape[0], self.plan.settings.chunk_frames
        mask = self._self_mask(call)  # (F, 1, N, 1) or None
        q_src, k_src = self.source_qk(call, q)
        if isinstance(context, EMAttention):
            return self._self_stem(q, k, v, q_src, k_src, self._stored(call, "mu", q), context, mask, call.info.shard)
        d = k.shape[-1]
        # the source keys, the edited keys and values of the frames each frame sees: one table, one transfer
        table, index = visible_frames(context, torch.cat([k_src, k, v], dim=-1)[None], q.shape[1] * d,
                                      call.info.shard)  # (1, U, h, N, 2d + dv), (F, m)
        outs = []
        for f in range(0, frames, chunk):
            rows = slice(f, f + chunk)
            seen = gather_frames(table, index[rows])[0]  # (n, h, m·N, 2d + dv)
            p_src = probabilities(q_src[rows], seen[..., :d])  # (n, h, N, m·N)
            p_edit = probabilities(q[rows], seen[..., d:2 * d])
            p = p2p.fuse_self(p_src, p_edit, None if mask is None else mask[rows])
            outs.append(p @ seen[..., 2 * d:].contiguous())  # (n, h, N, dv)
        return torch.cat(outs)

    def _self_stem(self, q, k, v, q_src, k_src, mu_src, context: EMAttention, mask,
                   shard: Shard | None) -> torch.Tensor:
        """STEM inside the self window: the edit's bases from the source's responsibilities (module docstring)."""
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
        s = self.plan.settings
        if not s.blend_self_attention:
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
        """(F, 1, h, w) bool: source words (inversion maps) ∪ target words (running sums of the edit's maps)."""
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
    source's EM (em.m_step), pooling the edit's keys and values. With a shard, the tokens are this rank's and
    the sums are all-reduced: every rank gets the whole video's bases.
    """
    mu, nu = m_step(k_src, mu_src, tau, k_edit, v_edit, chunk=chunk, shard=shard)
    return mu.to(k_edit.dtype), nu.to(v_edit.dtype)


@torch.no_grad()
def denoise(sd: StableDiffusion, inversion: Inversion, plan: Plan, store: AttentionStore,
            progress: Progress | None = None) -> torch.Tensor:
    """The edit: DDIM from the inversion's x_T with CFG ("" / target), fusing the store; returns x_0 (F, 4, h, w)."""
    s, steps = plan.settings, plan.steps
    x = inversion.x_T.to(sd.device, sd.dtype)
    frames, size, shard = x.shape[0], tuple(x.shape[-2:]), inversion.shard
    fusion = Fusion(sd, plan, _layer_contexts(sd, inversion.settings), level_grid(size, plan.blend_level))
    cond = sd.encode_prompt(plan.target_prompt)
    uncond = sd.encode_prompt(s.negative_prompt) if s.guidance != 1.0 else None
    blend = set(latent_blend_steps(steps)) if s.blend_latents else set()
    with sd.unet.attention(lambda name: fusion):
        for i, t in enumerate(plan.timesteps):
            with store.read(t) as reader:
                fusion.reader = (i, reader)
                eps = predict_noise(sd, x, t, cond, uncond, s.guidance, RunInfo(frames=frames, step=i, shard=shard))
                x = sd.scheduler.step(eps, t, x, steps)
                if i in blend:
                    # official quirk: the inversion latent at t_i, while x is already at the next level
                    x_inv = inversion.latents[steps - i].to(x)
                    x = x_inv + fusion.latent_mask(i, size).to(x.dtype) * (x - x_inv)
            fusion.reader = None
            if progress:
                progress(steps + i + 1, 2 * steps)
    return x


def level_grid(size: tuple[int, int], level: int) -> tuple[int, int]:
    """The token grid of UNet level `level` for latents of `size`: each downsampling halves, rounding up."""
    h, w = size
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w
