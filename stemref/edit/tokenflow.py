"""TokenFlow editing (Geyer, Bar-Tal, Bagon, Dekel, ICLR 2024) on any inversion, as the STEM code runs it.

The paper's pipeline is its Fig. 4: (I) sample keyframes and edit them jointly with extended attention, (II)
propagate their edited tokens to every frame along the source video's correspondences. The numbered steps
below follow one denoising step of it and name the paper's symbols: J_t the edited video's latents, T_base
the keyframes' self-attention outputs, φ the source frames' self-attention features, γ the nearest-neighbour
field, F_γ the propagation.

An edited video is denoised from the inversion's x_T. Each UNet call holds three branches of the same
frames, branch-major: the source (the inversion's latents at the same timestep, with the inversion
prompt), the unconditional branch (the negative prompt) and the conditional branch (the target prompt);
guidance mixes the last two, the source branch's ε is discarded. Every denoising step:

  1. Keyframes: one frame per batch of `batch` frames, drawn from a seeded generator (or given); the paper
     samples keyframes afresh at every step too.
  2. Keyframe pass (Fig. 4, I: joint keyframe editing). The UNet runs on the keyframes only. In every
     self-attention layer the edited branches use *extended* attention, ExtAttn(Q^{i}; [K^{i_1} … K^{i_k}];
     [V^{i_1} … V^{i_k}]): each keyframe's queries attend to the tokens of all keyframes of the same branch;
     the source branch stays per frame. Each layer keeps, for this step only, the source
     keyframes' self-attention inputs and all three branches' self-attention outputs. The pass's ε is
     discarded: it exists to fill that cache (T_base).
  3. Batch passes (Fig. 4, II: propagation). The UNet runs batch by batch; self-attention is not
     computed. Each token p of frame i looks up its nearest neighbour among a keyframe's tokens,
         γ^{i±}[p] = argmin_q D(φ(x^i)[p], φ(x^{i±})[q]),   D the cosine distance,
     with φ the source branch's self-attention inputs, and takes that keyframe token's cached attention
     output in all three branches, blended over two keyframes:
         F_γ(T_base, i, p) = w_i · T_base^{i+}[γ^{i+}[p]] + (1 − w_i) · T_base^{i−}[γ^{i−}[p]].
     In the paper i+ and i− are the keyframes on either side of frame i; here, as in the official code, they
     are the frame's own batch's keyframe and the previous batch's (see Fidelity). That is how the
     keyframes' joint edit flows to every frame.
  4. Plug-and-play injection (Tumanyan et al., CVPR 2023) from the source branch into both edited branches,
     as the paper edits its keyframes with PnP: the residual of
     `up_blocks.1.resnets.1` for the first `pnp_conv` of the steps (both passes), the self-attention q and
     k of decoder layers 4–11 for the first `pnp_attn` (keyframe pass; the batch passes compute no
     attention). FreeU, when on, re-weighs the decoder's features in every call.

Everything plugs into the UNet through its extension points: the attention processors below
(`KeyframeAttention`, `Propagation`), `RunInfo.inject` and the UNet's `freeu` argument.

Fidelity (the official code's behaviour, kept so that results compare with the papers; `blend="official"` is
the default):
- The two keyframes a frame blends are its own batch's and the previous batch's (never the next one), and
  the blend distances are to batch *centres* (i·B + B//2), not to the sampled keyframes; the sigmoid then
  squashes w_i into [0.622, 0.731], so even a keyframe takes 27 % of its tokens' outputs from the previous
  batch's keyframe, and a frame of the first batch takes only its own keyframe. `blend="keyframes"` is the
  variant closer to the paper: distances to the two sampled keyframes, interpolated linearly, so a keyframe
  keeps its own attention output exactly and a frame's share of a keyframe falls off with its distance.
- φ, the features matched, are the self-attention *inputs* of the source branch (as the paper's appendix
  says; its Fig. 4 speaks of outputs).
- In the keyframe pass the source branch attends per frame; only the edited branches use extended attention.
- Where the official code drops frames past the last whole batch, stemref edits them as a last, shorter
  batch: its keyframe is drawn among its own frames and its blend weights come from the same formula
  (distances to i·B + B//2).

Several processes (`group=`, distributed.py): every rank holds a contiguous shard of the frames (and of the
inversion's path) and draws the same keyframe table from the same seed. Each step, the keyframes' latents are
all-gathered (K small latents); the keyframe pass is split evenly over the ranks by keyframe (not by the frames
they own, so no rank idles), its extended attention all-gathering the edited keyframes' keys and values per
layer; with fewer keyframes than ranks every rank runs the whole keyframe pass instead (it then needs no
communication at all). Then each rank fetches, per layer, the features of the keyframes its frames' batches
use (their own and the previous batch's) from whichever ranks computed them, and runs its part of every
batch that overlaps its shard: a batch cut by a shard boundary is run in two pieces, exactly as one, since
the batch pass works frame by frame. (The shards are the even split: they fall on whole batches when F/P is a
multiple of B; moving them there otherwise would make the busiest rank's shard up to B − 1 frames longer.)
Each rank returns its shard's edited latents.

Dimension legend:
  F frames, B frames per batch (the last batch may be shorter), K keyframes (one per batch)
  h heads, N tokens per frame at a layer, C channels, d head dim
  3 branches: source, unconditional, conditional (row = branch · frames + frame)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import distributed
from ..attention import AttnCall, Recorder, RunInfo, from_source, sdpa
from ..context import AllFrames
from ..distributed import Shard
from ..freeu import FreeU
from ..frames import check_finite, non_finite_hint
from ..inversion import Inversion, check_inversion
from ..pipeline import StableDiffusion
from ..sampling import Progress, check_seed

DEFAULT_NEGATIVE = "ugly, blurry, low res, unrealistic, unaesthetic"
PNP_CONV_LAYER = "up_blocks.1.resnets.1"  # 16×16 at 512², 1280 channels in SD1.5
# decoder self-attention layers 4–11: up_blocks.1.attentions.1–2, up_blocks.2.attentions.0–2, up_blocks.3.attentions.0–2
PNP_ATTENTION_LAYERS = tuple(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1"
                             for i, js in ((1, (1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))) for j in js)
MATCH_CHUNK = 4096  # query tokens per nearest-neighbour search: bounds the (chunk × N) similarity matrix


@dataclass
class KeyframeFeatures:
    """What one self-attention layer keeps from the keyframe pass, for one step."""

    inputs: torch.Tensor  # (K, N, C) the source keyframes' self-attention inputs (the tokens matched against)
    outputs: torch.Tensor  # (3, K, h, N, d) all three branches' self-attention outputs (before to_out)
    first: int = 0  # the keyframe (batch) number of row 0: a process holds only the keyframes it uses


class KeyframeAttention:
    """Keyframe pass: per-frame attention for the source branch, extended attention across the keyframes for
    the edited branches, q/k injected from the source in the layers `RunInfo.inject` names. Fills `cache`."""

    def __init__(self, cache: dict[str, KeyframeFeatures], chunk_frames: int = 1):
        self.cache = cache
        self.extended = AllFrames(chunk_frames)  # one query frame at a time: never a K·N × K·N matrix

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        if call.is_cross:
            return sdpa(q, k, v, call)
        K = call.info.frames
        if call.name in call.info.inject:
            q, k = from_source(q, K), from_source(k, K)
        source = sdpa(q[:K], k[:K], v[:K], call)  # (K, h, N, d)
        edited = self.extended(q[K:], k[K:], v[K:], call)  # (2K, h, N, d): each branch its own video
        out = torch.cat([source, edited])  # (3K, h, N, d)
        # a copy of the source rows: a view would keep all three branches' inputs alive until the step ends
        self.cache[call.name] = KeyframeFeatures(call.x[:K].clone(), out.view(3, K, *out.shape[1:]))
        return out


class Propagation:
    """Batch pass: no attention. Every token takes the cached keyframe attention outputs of its nearest
    keyframe tokens (batch `index`'s keyframe, blended with the previous batch's by `weights`)."""

    def __init__(self, cache: dict[str, KeyframeFeatures], index: int, weights: torch.Tensor | None):
        self.cache, self.index, self.weights = cache, index, weights  # weights (B,): own keyframe's share

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        if call.is_cross:
            return sdpa(q, k, v, call)
        features = self.cache[call.name]  # T_base and the keyframes' φ at this layer
        B, (N, C) = call.info.frames, call.x.shape[1:]
        # matched on the source branch's tokens only; fp32 at least: argmax on fp16 cosines would tie too often
        work = torch.promote_types(call.x.dtype, torch.float32)
        tokens = F.normalize(call.x[:B].reshape(B * N, C).to(work), dim=-1)  # (B·N, C)
        nearest = _nearest(features, self.index, tokens)  # (B·N,)
        recorder = call.info.recorder
        if recorder is not None and recorder.wants("matches", call.name, call.info.step):
            recorder.add("matches", call.name, call.info.step, batch=self.index, nearest=nearest.view(B, N),
                         hw=call.info.hw)
        out = _gathered_outputs(features, self.index, nearest, B)  # (3, B, h, N, d): T_base^{i+}[γ^{i+}[p]]
        if self.index > 0:  # F_γ = w_i · T_base^{i+}[γ^{i+}] + (1 − w_i) · T_base^{i−}[γ^{i−}]
            w = self.weights.to(out.device, out.dtype).view(1, B, 1, 1, 1)
            previous = _nearest(features, self.index - 1, tokens)  # (B·N,)
            out = w * out + (1 - w) * _gathered_outputs(features, self.index - 1, previous, B)
        return out.reshape(3 * B, *out.shape[2:])  # (3B, h, N, d)


def _nearest(features: KeyframeFeatures, keyframe: int, tokens: torch.Tensor) -> torch.Tensor:
    """For each of the unit-norm `tokens` (B·N, C), the index of keyframe `keyframe`'s token of highest cosine
    similarity (γ, the nearest-neighbour field): (B·N,) into its N_kf tokens."""
    keys = F.normalize(features.inputs[keyframe - features.first].to(tokens.dtype), dim=-1)  # (N_kf, C)
    return torch.cat([(chunk @ keys.T).argmax(dim=-1) for chunk in tokens.split(MATCH_CHUNK)])  # (B·N,)


def _gathered_outputs(features: KeyframeFeatures, keyframe: int, nearest: torch.Tensor, frames: int) -> torch.Tensor:
    """Keyframe `keyframe`'s attention outputs at the tokens `nearest` (B·N,) of `frames` frames, in all three
    branches: (3, B, h, N, d)."""
    out = features.outputs[:, keyframe - features.first]  # (3, h, N_kf, d)
    gathered = out.index_select(2, nearest)  # (3, h, B·N, d)
    return gathered.view(3, out.shape[1], frames, -1, out.shape[-1]).transpose(1, 2)  # (3, B, h, N, d)


def batch_ranges(frames: int, batch: int) -> list[range]:
    """Consecutive batches of `batch` frames; the last one holds the remainder."""
    return [range(s, min(s + batch, frames)) for s in range(0, frames, batch)]


BLENDS = ("official", "keyframes")


def blend_weights(index: int, frames: range, batch: int, blend: str = "official",
                  keyframes: list[int] | None = None) -> torch.Tensor | None:
    """w_i of the propagation F_γ: the share of batch `index`'s own keyframe for each of its frames (None for
    batch 0: no blend). The paper only asks w_i ∈ [0, 1] to follow the frame's distance to the two keyframes.

    official: with batch centres p = i·B + B//2 and p' = (i−1)·B + B//2, frame s gets
    sigmoid(|s−p'| / (|s−p| + |s−p'|)), in [0.622, 0.731]. keyframes: with the sampled keyframes k_i and
    k_{i−1} (from `keyframes`), frame s gets |s−k_{i−1}| / (|s−k_i| + |s−k_{i−1}|), 1 at its own keyframe.
    """
    if index == 0:
        return None
    s = torch.tensor(list(frames), dtype=torch.float64)
    if blend == "official":
        own, previous = index * batch + batch // 2, (index - 1) * batch + batch // 2
        d_own, d_previous = (s - own).abs(), (s - previous).abs()
        return torch.sigmoid(d_previous / (d_own + d_previous))  # official quirk: a sigmoid of a share in [0, 1]
    d_own, d_previous = (s - keyframes[index]).abs(), (s - keyframes[index - 1]).abs()
    return d_previous / (d_own + d_previous)  # the keyframes lie in different batches: never 0 / 0


def draw_keyframes(generator: torch.Generator, ranges: list[range], batch: int) -> list[int]:
    """One random frame per batch. For whole batches the draw is the official randint(B, (batches,))."""
    whole = [r for r in ranges if len(r) == batch]
    offsets = torch.randint(batch, (len(whole),), generator=generator).tolist()
    if len(whole) < len(ranges):
        offsets += torch.randint(len(ranges[-1]), (1,), generator=generator).tolist()
    return [r.start + o for r, o in zip(ranges, offsets)]


def injected_layers(step: int, steps: int, pnp_attn: float, pnp_conv: float) -> frozenset[str]:
    """Layers whose features come from the source branch at `step`: the first int(steps·threshold) steps."""
    layers = set()
    if step < int(steps * pnp_conv):
        layers.add(PNP_CONV_LAYER)
    if step < int(steps * pnp_attn):
        layers.update(PNP_ATTENTION_LAYERS)
    return frozenset(layers)


def resolve_freeu(freeu: bool | FreeU | tuple | None) -> FreeU | None:
    """None/False: off; True: STEM's settings (b1 1.2, b2 1.4, s1 0.9, s2 0.2); a FreeU or (b1, b2, s1, s2)."""
    if freeu is None or freeu is False:
        return None
    if freeu is True:
        return FreeU()
    if isinstance(freeu, FreeU):
        return freeu
    values = tuple(freeu)
    if len(values) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"freeu must be None, True, False or four finite numbers (b1, b2, s1, s2), got {freeu!r}")
    return FreeU(*map(float, values))


@torch.no_grad()
def edit_latents(sd: StableDiffusion, inversion: Inversion, prompt: str, *, negative_prompt: str = DEFAULT_NEGATIVE,
                 guidance: float = 7.5, batch: int = 8, pnp_attn: float = 0.5, pnp_conv: float = 0.8,
                 freeu: bool | FreeU | tuple | None = None, keyframes: torch.Tensor | list | None = None,
                 seed: int = 1, blend: str = "official", progress: Progress | None = None,
                 recorder: Recorder | None = None, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Edit the inverted video towards `prompt`; returns the edited latents x_0 (F, 4, h, w).

    The source prompt is the inversion's. `keyframes` (steps, batches) fixes the keyframe of every batch at
    every step (absolute frame indices); without it they are drawn from `seed`. Equal arguments give
    bit-identical results. `blend` chooses how a frame mixes two keyframes (see the module docstring).
    `recorder` (stemref.explain) is offered each step's keyframes and every token's keyframe match.
    A sharded `inversion` (from `invert(..., group=)`), or a whole one with `group`, is edited by the
    processes together; each returns its shard's edited latents (module docstring).
    """
    if group is not None and check_inversion(inversion).shard is None:
        inversion = inversion.local(group)
    shard = check_inversion(inversion).shard
    frames = inversion.x_T.shape[0] if shard is None else shard.total
    steps = len(inversion.timesteps)
    ranges = batch_ranges(frames, _positive_int(batch, "batch"))
    table = _keyframe_table(keyframes, steps, ranges)
    _check_settings(guidance, pnp_attn, pnp_conv, blend)
    check_seed(seed)
    freeu = resolve_freeu(freeu)
    timesteps = sd.scheduler.timesteps(steps).tolist()  # descending
    if sorted(timesteps) != list(inversion.timesteps):
        raise ValueError(f"the inversion's timesteps are not a {steps}-step DDIM path of this model's scheduler")
    source, negative, target = sd.encode_prompt([inversion.settings.prompt, negative_prompt, prompt]).split(1)
    path = inversion.latents.to(sd.device, sd.dtype)  # (S + 1, F, 4, h, w): read once, not per step
    generator = torch.Generator().manual_seed(seed)
    self_attention = lambda processor: (lambda name: processor if name.endswith("attn1") else None)
    x = path[-1]
    start = 0 if shard is None else shard.start
    mine = [(b, r) for b, r in enumerate(ranges) if shard is None or _overlap(r, shard)]  # this rank's batches
    for i, t in enumerate(timesteps):
        x_source = path[1 + inversion.timesteps.index(t)]  # the source video's latents at t
        key = table[i] if table is not None else draw_keyframes(generator, ranges, batch)
        inject = injected_layers(i, steps, pnp_attn, pnp_conv)
        if recorder is not None and recorder.wants("keyframes", "", i):
            recorder.add("keyframes", "", i, keyframes=list(key), batches=ranges)
        cache: dict[str, KeyframeFeatures] = {}
        pass_shard, key_source, key_x = _keyframe_pass_inputs(x_source, x, key, shard)
        info = RunInfo(len(key_x), i, inject=inject, recorder=recorder, shard=pass_shard)
        with sd.unet.attention(self_attention(KeyframeAttention(cache))):
            _branches(sd, key_source, key_x, t, (source, negative, target), info, freeu)
        if pass_shard is not None:
            wants = [_keyframes_used(ranges, shard.range_of(r)) for r in range(shard.size)]
            cache = _share_keyframe_features(cache, pass_shard, wants)
        denoised = torch.empty_like(x)
        for b, r in mine:
            r = r if shard is None else _overlap(r, shard)  # the batch's frames on this rank
            frames_b = slice(r.start - start, r.stop - start)
            with sd.unet.attention(self_attention(Propagation(cache, b, blend_weights(b, r, batch, blend, key)))):
                eps = _branches(sd, x_source[frames_b], x[frames_b], t, (source, negative, target),
                                RunInfo(len(r), i, inject=inject, recorder=recorder), freeu)
            _, eps_uncond, eps_cond = eps.chunk(3)  # the source branch's ε is discarded
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            denoised[frames_b] = sd.scheduler.step(eps, t, x[frames_b], steps)  # J_{t−1} = DDIM step (DDIM Eq. 12)
        x = denoised
        del cache  # keyframe features live for one step only
        if progress:
            progress(i + 1, steps)
    check_finite(x, "the edited latents", non_finite_hint(sd.dtype))
    return x


def edit(sd: StableDiffusion, inversion: Inversion, prompt: str, **options) -> torch.Tensor:
    """`edit_latents` decoded: the edited frames (F, 3, H, W) in [0, 1]. Takes the same keyword arguments."""
    return sd.decode_latents(edit_latents(sd, inversion, prompt, **options))


def _overlap(a: range, shard: Shard) -> range:
    return range(max(a.start, shard.start), min(a.stop, shard.stop))


def _keyframes_used(ranges: list[range], frames: range) -> range:
    """The keyframes (batch numbers) that the batches overlapping `frames` read: each its own and the previous."""
    batches = [b for b, r in enumerate(ranges) if max(r.start, frames.start) < min(r.stop, frames.stop)]
    return range(max(batches[0] - 1, 0), batches[-1] + 1)


def _keyframe_pass_inputs(x_source: torch.Tensor, x: torch.Tensor, key: list[int],
                          shard: Shard | None) -> tuple[Shard | None, torch.Tensor, torch.Tensor]:
    """(keyframe-pass shard, source latents, latents) of the keyframes this rank runs in the keyframe pass.

    One process: all keyframes. Several: the K keyframes' latents are all-gathered from the ranks that hold
    them, and each rank runs an even share of the keyframes (the returned shard of K items); with fewer
    keyframes than ranks every rank runs all of them (shard None: nothing to exchange).
    """
    if shard is None:
        return None, x_source[key], x[key]
    own = [f - shard.start for f in key if shard.start <= f < shard.stop]
    holders = shard.split([sum(1 for f in key if f in shard.range_of(r)) for r in range(shard.size)])
    both = distributed.all_gather(torch.stack([x_source[own], x[own]], dim=1), holders)  # (K, 2, 4, h, w)
    if len(key) < shard.size:
        return None, both[:, 0], both[:, 1]
    pass_shard = Shard(shard.group, shard.rank, distributed.even_starts(len(key), shard.size))
    mine = both[pass_shard.start:pass_shard.stop]
    return pass_shard, mine[:, 0], mine[:, 1]


def _share_keyframe_features(cache: dict[str, KeyframeFeatures], pass_shard: Shard,
                             wants: list[range]) -> dict[str, KeyframeFeatures]:
    """Each layer's features of the keyframes wants[rank], fetched from the ranks that ran them (one transfer
    per layer: inputs and outputs travel as one (K, N·C + 3·h·N·d) table)."""
    shared = {}
    for name, f in cache.items():  # the same layers in the same order on every rank
        K, N, C = f.inputs.shape
        three, _, h, _, d = f.outputs.shape
        table = torch.cat([f.inputs.reshape(K, N * C), f.outputs.transpose(0, 1).reshape(K, -1)], dim=1)
        got = distributed.fetch(table, pass_shard, wants)  # (k, N·C + 3·h·N·d)
        k = got.shape[0]
        outputs = got[:, N * C:].reshape(k, three, h, N, d).transpose(0, 1)  # (3, k, h, N, d)
        shared[name] = KeyframeFeatures(got[:, :N * C].reshape(k, N, C), outputs, wants[pass_shard.rank].start)
    return shared


def _branches(sd: StableDiffusion, x_source: torch.Tensor, x: torch.Tensor, t: int, prompts: tuple, info: RunInfo,
              freeu: FreeU | None) -> torch.Tensor:
    """ε of [source, unconditional, conditional] rows (3F, 4, h, w) for F frames."""
    n = x.shape[0]
    context = torch.cat([p.expand(n, -1, -1) for p in prompts])  # (3F, L, D)
    return sd.unet(torch.cat([x_source, x, x]), t, context, info, freeu=freeu)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_settings(guidance: float, pnp_attn: float, pnp_conv: float, blend: str) -> None:
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (7.5 is the official setting), got {guidance!r}")
    for name, value in (("pnp_attn", pnp_attn), ("pnp_conv", pnp_conv)):
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} is the fraction of steps with injection, from 0 to 1; got {value!r}")


def _keyframe_table(keyframes, steps: int, ranges: list[range]) -> list[list[int]] | None:
    """Validate an explicit (steps, batches) table of absolute keyframe indices."""
    if keyframes is None:
        return None
    table = torch.as_tensor(keyframes)
    if table.shape != (steps, len(ranges)) or table.is_floating_point():
        raise ValueError(f"keyframes must be an integer table of shape (steps, batches) = ({steps}, {len(ranges)}), "
                         f"got shape {tuple(table.shape)} of {table.dtype}")
    rows = table.tolist()
    for i, row in enumerate(rows):
        for b, (frame, r) in enumerate(zip(row, ranges)):
            if frame not in r:
                raise ValueError(f"keyframes[{i}][{b}] = {frame} is not in batch {b} (frames {r.start}–{r.stop - 1})")
    return rows
