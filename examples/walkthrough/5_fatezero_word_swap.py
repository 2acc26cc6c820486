"""5. FateZero's attention fusion for a word swap: "rabbit" → "bear".

FateZero (stemref/edit/fatezero.py) records the attention maps of the *source* video while inverting it,
and fuses them into the denoising under the target prompt, so the edit keeps the source's layout and
motion. The pieces are prompt-to-prompt's (stemref/edit/p2p.py):
  cross-attention   maps over the 77 text tokens; a word swap maps the source word's map onto the target
                    word's position (replace_mapper), during the first part of the steps (the cross window),
                    optionally scaled per word (reweight);
  self-attention    the source's maps replace the edit's during the self window, except inside the blend
                    mask: where the source word's cross-attention is strong, the edit keeps its own maps.
This script records one cross-attention layer of the tiny UNet for both prompts on the shipped clip and
prints the maps (brighter = more attention), then the fused map, the gate and the blend mask.
"""
import torch
from common import frames, picture, side_by_side, tiny

from stemref.attention import RunInfo
from stemref.edit import p2p

SOURCE, TARGET = "a grey rabbit on a grassy hill", "a grey bear on a grassy hill"
LAYER = "up_blocks.3.attentions.2.transformer_blocks.0.attn2"  # cross-attention on the 8 × 8 grid
sd = tiny()
tokenizer = sd.tokenizer
video = frames(count=2, size=64)  # (2, 3, 64, 64)
maps = {}


def record(q, k, v, call):
    """A processor that computes the attention probabilities explicitly and keeps them (FateZero's recorder)."""
    p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, h, n, 77)
    maps[call.name] = p
    return p @ v


x = sd.encode_frames(video)  # (F, 4, 8, 8)
F = len(video)
with torch.no_grad(), sd.unet.attention(lambda name: record if name == LAYER else None):
    context = torch.cat([p.expand(F, -1, -1) for p in sd.encode_prompt([SOURCE, TARGET]).split(1)])  # (2F, 77, D)
    sd.unet(torch.cat([x, x]), 501, context, RunInfo(frames=F))
c_src, c_edit = maps[LAYER].chunk(2)  # (F, h, 64, 77) each: source prompt, target prompt

rabbit, bear = p2p.word_positions(tokenizer, SOURCE, "rabbit"), p2p.word_positions(tokenizer, TARGET, "bear")
print(f"token positions: 'rabbit' {rabbit} in the source, 'bear' {bear} in the target (0 is the start token)")
mapper = p2p.replace_mapper(tokenizer, SOURCE, TARGET)  # (77, 77): C' = C_src · mapper
print(f"replace mapper row of 'rabbit': nonzero at {mapper[rabbit[0]].nonzero().flatten().tolist()}; "
      f"'grey' (position 2) stays at {mapper[2].nonzero().flatten().tolist()}")

steps = 10
gate = p2p.cross_gate(tokenizer, TARGET, steps, window=0.8)  # (S, 77): 1 where step i takes the fused map
print(f"cross window 0.8 of {steps} steps: the fused maps replace the fresh ones at steps "
      f"{gate[:, bear[0]].nonzero().flatten().tolist()} (int(0.8 · (steps + 1)) = {int(0.8 * (steps + 1))}, "
      "as the official code)")
reweight = p2p.reweight_vector(tokenizer, TARGET, {"bear": 2.0})
grid = lambda c, position: c[0, :, :, position].mean(0).view(8, 8)  # frame 0, mean over heads -> (8, 8)
fused_in = p2p.fuse_cross(c_src, c_edit, gate[0], mapper=mapper, reweight=reweight)  # step 0: inside the window
fused_out = p2p.fuse_cross(c_src, c_edit, gate[-1], mapper=mapper, reweight=reweight)  # last step: outside
print(side_by_side(["src 'rabbit'", "edit 'bear'", "fused step 0", "fused step 9"],
                   [grid(c_src, rabbit[0]), grid(c_edit, bear[0]), grid(fused_in, bear[0]), grid(fused_out, bear[0])]))
print("step 0: the 'bear' map is the source 'rabbit' map × 2 (reweight):",
      torch.allclose(fused_in[..., bear[0]], 2 * c_src[..., rabbit[0]]))
print("step 9: outside the window the edit keeps its own map:",
      torch.equal(fused_out[..., bear[0]], c_edit[..., bear[0]]))

a = p2p.blend_map([c_src], rabbit, (8, 8))  # (F, 1, 8, 8): where 'rabbit' is, dilated by a 3 × 3 max-pool
mask = p2p.blend_mask(a, (8, 8), threshold=0.7)  # (F, 1, 8, 8) bool: > 0.7 of each frame's maximum
low = (a[0, 0].min() / a[0, 0].max()).item()
print(f"the blend map below is drawn on its own range, {low:.2f} to 1 × its maximum: a mid shade can be above 0.7")
print("blend map of 'rabbit'   blend mask (> 0.7 of the maximum; # = inside)")
for line, row in zip(picture(a[0, 0]), mask[0, 0].tolist()):
    print(line + "       " + " ".join("#" if inside else "." for inside in row))
print(f"inside the mask ({mask[0].float().mean():.0%} of frame 0) the edit keeps its own self-attention; "
      "elsewhere the source's maps replace it (p2p.fuse_self)")
