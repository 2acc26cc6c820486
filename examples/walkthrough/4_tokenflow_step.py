"""4. One TokenFlow denoising step: keyframes, the keyframe pass, nearest-neighbour propagation.

TokenFlow (stemref/edit/tokenflow.py) edits a video with an image model without flicker by editing only a
few keyframes jointly and carrying their self-attention outputs to every other frame along the source
video's own token correspondences. Each UNet call holds three branches of the same frames, branch-major:
[source | unconditional | conditional] (docs/tokenflow-step.svg draws one step). Per step:
  1. one keyframe per batch of frames, drawn at random;
  2. keyframe pass: the keyframes of the edited branches attend to each other (extended attention); each
     self-attention layer caches its inputs (source branch) and outputs (all branches);
  3. batch passes: no self-attention is computed; each token takes the cached output of its nearest
     neighbour (cosine similarity of the *source* branch's inputs) in its batch's keyframe, blended with
     the previous batch's keyframe.
This script runs step 1 of a 4-step edit by hand with the module's own pieces and prints what happens.
"""
import torch
import torch.nn.functional as F
from common import PROMPT, frames, picture, tiny

import stemref
from stemref.attention import RunInfo
from stemref.edit import tokenflow

TARGET = "a big brown bear stretching on a grassy hill"
LAYER = "up_blocks.3.attentions.2.transformer_blocks.0.attn1"  # the last self-attention layer: 8 × 8 tokens here
sd = tiny(gentle=True)  # see common.tiny
video = frames(count=6, size=64)  # (6, 3, 64, 64)
inversion = stemref.invert(sd, video, PROMPT, steps=4, context="stem", num_bases=16)
batch, steps = 2, len(inversion.timesteps)
ranges = tokenflow.batch_ranges(len(video), batch)
keyframes = tokenflow.draw_keyframes(torch.Generator().manual_seed(1), ranges, batch)
print(f"{len(video)} frames in batches {[list(r) for r in ranges]}; keyframes this step: {keyframes}")

t = sd.scheduler.timesteps(steps)[0].item()  # the first (noisiest) step
x, x_source = inversion.x_T, inversion.at(t)  # the latent being edited, and the source video's at t
prompts = sd.encode_prompt([PROMPT, tokenflow.DEFAULT_NEGATIVE, TARGET]).split(1)  # source, negative, target
inject = tokenflow.injected_layers(0, steps, pnp_attn=0.5, pnp_conv=0.8)
print(f"plug-and-play injection at step 0 in {len(inject)} layers: {sorted(inject)[:2]} …")
self_attention = lambda processor: (lambda name: processor if name.endswith("attn1") else None)

# 2. keyframe pass: the UNet on [source, uncond, cond] × keyframes; its ε is discarded, its caches kept
cache: dict[str, tokenflow.KeyframeFeatures] = {}
with torch.no_grad(), sd.unet.attention(self_attention(tokenflow.KeyframeAttention(cache))):
    context = torch.cat([p.expand(len(keyframes), -1, -1) for p in prompts])  # (3K, 77, D)
    rows = torch.cat([x_source[keyframes], x[keyframes], x[keyframes]])  # (3K, 4, h, w), branch-major
    sd.unet(rows, t, context, RunInfo(len(keyframes), 0, inject=inject))
features = cache[LAYER]
print(f"cached at {LAYER}: inputs {tuple(features.inputs.shape)} (K, N, C), "
      f"outputs {tuple(features.outputs.shape)} (3 branches, K, heads, N, d)")


class Watch(tokenflow.Propagation):
    """Propagation that also keeps the source-branch tokens it matches at LAYER, to print them below."""

    seen: dict[int, torch.Tensor] = {}

    def __call__(self, q, k, v, call):
        if call.name == LAYER:
            self.seen[self.index] = call.x[:call.info.frames]  # (B, N, C): the source branch's rows
        return super().__call__(q, k, v, call)


# 3. batch passes: every frame's self-attention output comes from the keyframes' cache
for b, r in enumerate(ranges):
    weights = tokenflow.blend_weights(b, r, batch)
    with torch.no_grad(), sd.unet.attention(self_attention(Watch(cache, b, weights))):
        context = torch.cat([p.expand(len(r), -1, -1) for p in prompts])
        sd.unet(torch.cat([x_source[r.start:r.stop], x[r.start:r.stop], x[r.start:r.stop]]), t, context,
                RunInfo(len(r), 0, inject=inject))
    shares = "" if weights is None else f", own keyframe's share {[round(w, 3) for w in weights.tolist()]}"
    print(f"batch {b} (frames {list(r)}): keyframe {keyframes[b]}"
          f"{'' if b == 0 else f' and the previous batch keyframe {keyframes[b - 1]}'}{shares}")

# the nearest-neighbour matches of one frame at LAYER, drawn as the matched token's row and column
b = 1
frame = next(f for f in ranges[b] if f != keyframes[b])
tokens = F.normalize(Watch.seen[b][frame - ranges[b].start], dim=-1)  # (N, C)
keys = F.normalize(features.inputs[b], dim=-1)  # (N, C): keyframe b's tokens
nearest = (tokens @ keys.T).argmax(dim=-1)  # (N,)
side = int(nearest.numel() ** 0.5)
rows, cols = (nearest // side).view(side, side), (nearest % side).view(side, side)
here = torch.arange(side)
print(f"frame {frame}: each token's nearest token in keyframe {keyframes[b]} (row, column); "
      f"{(rows == here[:, None]).logical_and(cols == here[None]).float().mean():.0%} at the same place,"
      f" {((rows - here[:, None]).abs().le(1) & (cols - here[None]).abs().le(1)).float().mean():.0%} within one token")
for r_, c_ in zip(rows.tolist(), cols.tolist()):
    print("  " + " ".join(f"{a}{c}" for a, c in zip(r_, c_)))
print("the source frame's brightness and the keyframe's, for comparison:")
for line_a, line_b in zip(picture(video[frame].mean(0)[::8, ::8]), picture(video[keyframes[b]].mean(0)[::8, ::8])):
    print("  " + line_a + "   " + line_b)

edited = tokenflow.edit_latents(sd, inversion, TARGET, batch=batch, seed=1)  # the whole edit, every step as above
change = ((edited - inversion.latents[0]).norm() / inversion.latents[0].norm()).item()
print(f"the whole 4-step edit: edited latents {tuple(edited.shape)} differ from the source's by {change:.3f} (relative)")
