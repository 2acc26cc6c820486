"""FateZero (Qi et al., ICCV 2023): edit a video by fusing the attention of its inversion into the edit.

FateZero inverts the source video under the source prompt P, remembering the attention maps of every step,
then denoises the inverted latents under the target prompt P* while replacing the edit's maps by the
source's inside chosen windows (prompt-to-prompt, extended to video). The source maps carry the layout and
motion; the target prompt's cross-attention carries the new content. The algorithm, for S DDIM steps at the
timesteps t_0 > t_1 > … > t_{S−1} (edit step i runs at t_i, and so does the inversion call it reads from):

  1. Plan (fatezero_plan.py). From the settings and the two prompts: the self window (steps
     int(s0·S) ≤ i < int(s1·S)), the cross gate (per step and token, int(c0·(S+1)) ≤ i < int(c1·(S+1)), words
     with their own windows), word swap or refine, the reweighting vector, the blend words' token positions,
     and the fused layers (at most `max_tokens` queries: all but SD1.5's 64² level at 512²).
  2. Invert and store. Encode the frames, x_0 = VAE(frames), and run DDIM inversion under P (no CFG) in the
     chosen self-attention context. In every fused layer inside a window, the Recorder stores what the
     conditional branch's maps are made of (its input tokens; see fatezero_fusion.py), keyed by timestep.
     A saved `Inversion` is replayed instead: its UNet calls run again on its latents and give the same maps.
  3. Edit step i, from x = x_T: the UNet with CFG ("" / P*). Its conditional branch's attention, in every
     fused layer (the Fusion processor), recomputes the source maps of step i from the store and fuses:
       a. self-attention, i in the self window:  S = M ⊙ S_edit + (1 − M) ⊙ S_src;
       b. M, the blend mask (with `blend_self_attention` and blend words): where the source blend words
          are, from the stored 16² cross-attention maps, summed over the words' tokens, averaged over
          layers and heads, 3×3 max-pooled (a dilation), resized to the layer's grid, divided by each
          frame's maximum, > τ. Without it M ≡ 0 and the source self-attention replaces the edit's;
       c. cross-attention, per token inside its window: word swap C' = C_src · mapper (prompts with as many
          words, "replace"), or refine C'_j = a_j C_src[m_j] + (1 − a_j) C_edit_j (aligned tokens take the
          source map); then reweight C'' = C' ⊙ e; the fused map C = α C'' + (1 − α) C_edit, α the gate.
     The unconditional branch, the layers over `max_tokens` and the steps outside the windows run the plain
     context, unfused.
  4. DDIM step: x ← step(ε, t_i, x), with ε = ε_u + w (ε_c − ε_u).
  5. Latent blending (`blend_latents`), for int(0.2S) < i + 1 < int(0.8S): the latent mask M_l is the source
     words' mask (as in 3b, at the latent size) ∪ the target words' mask (the same recipe on running sums
     of the edit's own cross-attention maps of the target words); outside it, the latents go back to the
     inversion's: x ← x_inv + M_l ⊙ (x − x_inv).
  6. Decode x_0 with the VAE.

`edit_latents` runs 1 and 2; `denoise` is the loop of 3–5, numbered the same.

Contexts. Inversion and edit use the same self-attention context (stemref.context): FateZero's own
spatial-temporal attention ("fatezero": the middle frame in layers of ≥ 640 channels), or "1-frame",
"2-frame", "all-frame", "stem". How maps are fused under STEM's bases is in fatezero_fusion.py.

Store. Maps are recomputed, never stored (attention_store.py). At 512² in fp16 the store holds 20 MB per
frame per step (11 self- and 11 cross-attention layers below 64², any context; STEM adds K bases per layer
and step, not per frame) against the official code's 97 MB of maps, and only the steps inside the windows
are recorded. The store spills to disk beyond a memory budget.

Fidelity: the official code's behaviour kept, quirks included. Inversion without CFG; windows int(s·N) for
self and int(c·(N+1)) for cross; replace falls back to refine when the word counts differ; the blend mask is
nearest-resized, per-frame normalised and only used with `blend_self_attention` and blend words (without
words, as in the official reconstruction configs, there is no mask); a word listed twice weighs its tokens
once; latent blending resets to the inversion latent one level noisier than x (x_inv at t_i while x is
already at t_{i+1}). Not kept: FateZero's random VAE sample (stemref encodes the posterior mean), its
Tune-A-Video temporal modules (identity at init), and its silence about reweight, window or blend words
that are not in their prompt (stemref refuses them, naming word and prompt).

Dimension legend:
  F frames, h × w latent grid, S steps, L = 77 text tokens
"""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import torch

from ..attention import Processor, RunInfo, sdpa
from ..attention import Recorder as RunRecorder  # explanations (stemref.explain); `Recorder` below stores maps
from ..context import EMAttention, context_processor
from ..frames import check_finite
from ..inversion import NON_FINITE_HINT, SELF_ATTENTION, Inversion, InversionSettings, check_inversion
from ..pipeline import StableDiffusion, check_encodable
from ..sampling import Progress, ddim_inversion_loop, predict_noise
from . import p2p
from .attention_store import AttentionStore
from .fatezero_fusion import Fusion, Recorder
from .fatezero_plan import FateZeroSettings, Plan, latent_blend_steps, level_grid


def edit(sd: StableDiffusion, frames_or_inversion: torch.Tensor | Inversion, source_prompt: str, target_prompt: str,
         **options) -> torch.Tensor:
    """Edit `frames` (F, 3, H, W) in [0, 1] (or a saved `Inversion` of them); the edited frames (see edit_latents)."""
    return sd.decode_latents(edit_latents(sd, frames_or_inversion, source_prompt, target_prompt, **options))  # 6.


def edit_latents(sd: StableDiffusion, frames_or_inversion: torch.Tensor | Inversion, source_prompt: str,
                 target_prompt: str, *, steps: int = 50, context: str = "stem", context_options: dict | None = None,
                 seed: int = 0, memory_budget: int = 2**30, store_dir: str | Path | None = None,
                 keep_store: bool = False, progress: Progress | None = None, recorder: RunRecorder | None = None,
                 source_recorder: RunRecorder | None = None, **settings) -> torch.Tensor:
    """The edited latents x_0 (F, 4, h, w) of `frames` (F, 3, H, W) in [0, 1], or of a saved `Inversion` of them.

    `context` and `context_options` choose the self-attention context of inversion and edit (ignored for an
    Inversion, which names its own), `seed` seeds STEM's EM. `settings` are FateZeroSettings' fields. The
    attention store keeps up to `memory_budget` bytes in memory and spills the rest to `store_dir` (a
    temporary folder by default), deleted at the end unless `keep_store`. `recorder` (stemref.explain) is offered
    what the edit computes and the blend mask of every step that uses one; `source_recorder` what the inversion
    (or its replay) computes.
    """
    unknown = sorted(set(settings) - {f.name for f in fields(FateZeroSettings)})
    if unknown:
        raise ValueError(f"unknown FateZero settings: {', '.join(unknown)}; "
                         f"known: {', '.join(f.name for f in fields(FateZeroSettings))}")
    s = FateZeroSettings(**settings)
    if isinstance(frames_or_inversion, Inversion):
        inversion, frames = check_inversion(frames_or_inversion), None
        if inversion.settings.prompt != source_prompt:
            raise ValueError(f"the inversion was made with the prompt {inversion.settings.prompt!r}, not the source "
                             f"prompt {source_prompt!r}; FateZero's source maps come from the inversion's prompt")
        inv = inversion.settings
    else:
        frames, inversion = frames_or_inversion, None
        check_encodable(frames)
        inv = InversionSettings(source_prompt, steps, context, 1.0, SELF_ATTENTION, seed, dict(context_options or {}))
    plan = Plan.make(sd, s, inv.steps, source_prompt, target_prompt)  # 1.
    with AttentionStore(memory_budget, store_dir, keep_store) as store:
        if inversion is None:  # 2.
            inversion = record_inversion(sd, frames, inv, plan, store, progress, source_recorder)
        else:
            replay_inversion(sd, inversion, plan, store, progress, source_recorder)
        x = denoise(sd, inversion, plan, store, progress, recorder)  # 3.–5.
    check_finite(x, "the edited latents", NON_FINITE_HINT)
    return x


# ---- 2. inversion, recording the store -------------------------------------------------------------------
def record_inversion(sd: StableDiffusion, frames: torch.Tensor, inv: InversionSettings, plan: Plan,
                     store: AttentionStore, progress: Progress | None = None,
                     recorder: RunRecorder | None = None) -> Inversion:
    """DDIM-invert `frames` under the inversion's context, recording the store on the way."""
    storing = Recorder(plan, store, _layer_contexts(sd, inv))
    x = sd.encode_frames(frames)
    eps_fn = _recording_eps(sd, inv, x.shape[0], store, recorder)
    with sd.unet.attention(lambda name: storing):
        path = ddim_inversion_loop(sd.scheduler, x, eps_fn, inv.steps, _phase(progress, 0, 2 * inv.steps))
    return Inversion(torch.stack(path), sd.scheduler.timesteps(inv.steps).flip(0).tolist(), inv)


@torch.no_grad()
def replay_inversion(sd: StableDiffusion, inversion: Inversion, plan: Plan, store: AttentionStore,
                     progress: Progress | None = None, recorder: RunRecorder | None = None) -> None:
    """Record the store of a saved inversion by running its UNet calls again on its latents.

    Call j saw latents[j] at ascending timestep j, so replaying it gives the same maps. STEM draws random
    bases at every call, so its replay runs every call up to the last one needed, in order.
    """
    inv = inversion.settings
    steps, ascending = inv.steps, inversion.timesteps
    needed = sorted(plan.steps - 1 - i for i in plan.stored_steps())
    if not needed:
        return
    contexts = _layer_contexts(sd, inv)
    random = any(isinstance(c, EMAttention) for c in contexts.values())
    calls = range(needed[-1] + 1) if random else needed
    storing = Recorder(plan, store, contexts)
    eps_fn = _recording_eps(sd, inv, inversion.latents.shape[1], store, recorder)
    with sd.unet.attention(lambda name: storing):
        for j in calls:
            eps_fn(inversion.latents[j].to(sd.device, sd.dtype), ascending[j], j)
            if progress:
                progress(j + 1, 2 * steps)


def _recording_eps(sd: StableDiffusion, inv: InversionSettings, frames: int, store: AttentionStore,
                   recorder: RunRecorder | None = None):
    cond = sd.encode_prompt(inv.prompt)
    uncond = sd.encode_prompt("") if inv.guidance != 1.0 else None

    def eps_fn(x: torch.Tensor, t: int, j: int) -> torch.Tensor:
        eps = predict_noise(sd, x, t, cond, uncond, inv.guidance, RunInfo(frames=frames, step=j, recorder=recorder))
        store.end_step(t)
        return eps
    return eps_fn


def _layer_contexts(sd: StableDiffusion, inv: InversionSettings) -> dict[str, Processor]:
    """Each attention layer's processor as the inversion ran it: the context where `inv.layers` matches."""
    generator = torch.Generator().manual_seed(inv.seed)  # as inversion._chooser: CPU draws on every device
    context = context_processor(inv.context, generator=generator, **inv.options)
    pattern = re.compile(inv.layers)
    return {name: context if pattern.search(name) else sdpa for name in sd.unet.attention_layers}


def _phase(progress: Progress | None, done: int, total: int) -> Progress | None:
    return None if progress is None else (lambda n, _: progress(done + n, total))


# ---- 3.–5. the edit ----------------------------------------------------------------------------------------
@torch.no_grad()
def denoise(sd: StableDiffusion, inversion: Inversion, plan: Plan, store: AttentionStore,
            progress: Progress | None = None, recorder: RunRecorder | None = None) -> torch.Tensor:
    """The edit: DDIM from the inversion's x_T with CFG ("" / target), fusing the store; returns x_0 (F, 4, h, w)."""
    s, steps = plan.settings, plan.steps
    x = inversion.x_T.to(sd.device, sd.dtype)
    frames, size = x.shape[0], tuple(x.shape[-2:])
    fusion = Fusion(sd, plan, _layer_contexts(sd, inversion.settings), level_grid(size, plan.blend_level))
    cond = sd.encode_prompt(plan.target_prompt)
    uncond = sd.encode_prompt(s.negative_prompt) if s.guidance != 1.0 else None
    blend = set(latent_blend_steps(steps)) if s.blend_latents else set()
    with sd.unet.attention(lambda name: fusion):
        for i, t in enumerate(plan.timesteps):
            with store.read(t) as reader:
                fusion.reader = (i, reader)  # 3. the source maps of step i, for 3a–3c inside the UNet
                info = RunInfo(frames=frames, step=i, recorder=recorder)
                eps = predict_noise(sd, x, t, cond, uncond, s.guidance, info)
                if recorder is not None and i in plan.blend_steps and recorder.wants("blend_mask", "", i):
                    recorder.add("blend_mask", "", i, mask=p2p.blend_mask(fusion.source_blend_map(i), size,
                                                                          s.blend_threshold, s.mask_resize))
                x = sd.scheduler.step(eps, t, x, steps)  # 4.
                if i in blend:  # 5. (official quirk: x_inv is at t_i while x is already at t_{i+1})
                    x_inv = inversion.latents[steps - i].to(x)
                    x = x_inv + fusion.latent_mask(i, size).to(x.dtype) * (x - x_inv)
            fusion.reader = None
            if progress:
                progress(steps + i + 1, 2 * steps)
    return x
