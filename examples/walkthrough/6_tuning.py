"""6. A few one-shot tuning steps of Tune-A-Video and EI², with their loss.

One-shot tuned editing (stemref/edit/tuning.py) first *inflates* the image UNet into a video UNet: a
temporal module in every transformer block attends over the frames at each location, and self-attention
looks at other frames (Tune-A-Video: sparse-causal, the first and previous frame; EI²: FFAM, the frame
itself plus the other frames pooled 2 × 2). Then it fine-tunes a few of its tensors on the one video, with
the ordinary diffusion loss: noise the clip's latents to a random timestep t, predict the noise, and take
the mean squared error ‖ε − ε_θ(x_t, t, prompt)‖². EI²'s temporal module (STAM) adds instance centring and
spectral normalisation so the tuned model keeps its feature statistics (the EI² paper's Theorems 1–2).
After tuning, the clip is DDIM-inverted and re-sampled with the target prompt (stemref/edit/tuned.py).
"""
import torch
from common import PROMPT, frames, tiny

from stemref.edit import tuning

sd = tiny(torch.float32)  # the tuned tensors train in float32 (on a GPU: fp16 autocast over float32 weights)
video = frames(count=4, size=64)  # (4, 3, 64, 64)
for method in ("tune-a-video", "ei2"):
    losses = []
    result = tuning.tune(sd, video, PROMPT, method, steps=4, lr=1e-3,
                         progress=lambda step, steps, loss: losses.append(loss))
    trained = sum(t.numel() for t in result.tensors.values())
    print(f"{method:12s}: {len(result.tensors)} tuned tensors ({trained:,} values; the temporal modules and the "
          f"attention queries); loss per step {[round(loss, 4) for loss in losses]}")
print("Each step draws its own timestep and noise, so the loss moves from step to step; the papers tune for 500.")
