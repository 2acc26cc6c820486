"""3. DDIM inversion under each self-attention context, and how well each reconstructs the video.

Inversion runs DDIM backwards, x_0 → x_T, predicting the noise of each step with the UNet; sampling from
x_T with the same prompt and context should give x_0 back. It does not exactly, because each inverse step
uses ε predicted at the *next* level from the current latent (ε(x_t, t) ≈ ε(x_{t−1}, t)): the error the
table measures. The context decides what each frame's self-attention sees (context.py):
  1-frame    the frame itself (image DDIM inversion, frame by frame)
  2-frame    the first and the previous frame (sparse-causal, Tune-A-Video's)
  all-frame  every frame of the video
  stem       K bases estimated by EM from every frame
An editor later denoises from these latents with attention across frames. A latent inverted with a
context that sees the whole video fits that denoising better than one inverted frame by frame, which is
STEM's argument; its bases give that context at about the cost of the 1-frame inversion.

The tiny model's weights are random, and its ε changes far faster with x than a trained UNet's, so this
script scales its output layer by 0.02 (common.tiny(gentle=True)) to reach the small-step regime a
trained model is in: the error then shrinks as the steps grow. The numbers show the mechanics, not the
paper's ranking of the contexts (Table A3 of the STEM paper, `python -m stemref.invert --compare`).
"""
import torch
from common import PROMPT, frames, tiny

import stemref
from stemref.attention import RunInfo
from stemref.context import context_processor
from stemref.metrics import psnr
from stemref.sampling import ddim_sample_loop, predict_noise

sd = tiny(gentle=True)
video = frames(count=4, size=64)  # (4, 3, 64, 64)
cond = sd.encode_prompt(PROMPT)  # (1, 77, D)
x0 = sd.encode_frames(video)  # (4, 4, 8, 8)
round_trip = sd.decode_latents(x0)  # what the VAE alone gives back: the best a reconstruction can do
print(f"{len(video)} frames of {video.shape[-1]}², prompt {PROMPT!r}")
print("context    | steps | latent error ‖x̂_0 − x_0‖ / ‖x_0‖ | decoded x̂_0: PSNR vs the VAE round trip")
for context, options in (("1-frame", {}), ("2-frame", {}), ("all-frame", {}), ("stem", {"num_bases": 16})):
    for steps in (4, 16):
        inversion = stemref.invert(sd, video, PROMPT, steps=steps, context=context, **options)  # x_0 … x_T kept
        # sampling is the same loop run forwards, from x_T, with the same context in every self-attention layer
        processor = context_processor(context, torch.Generator().manual_seed(0), **options)
        eps = lambda x, t, i: predict_noise(sd, x, t, cond, None, 1.0, RunInfo(frames=len(video), step=i))
        with sd.unet.attention(lambda name: processor if name.endswith("attn1") else None):
            x0_hat = ddim_sample_loop(sd.scheduler, inversion.x_T, eps, steps)
        error = ((x0_hat - x0).norm() / x0.norm()).item()
        print(f"{context:10s} | {steps:5d} | {error:33.5f} | {psnr(sd.decode_latents(x0_hat), round_trip):.1f} dB")
print("an inversion keeps every latent on its path:", tuple(inversion.latents.shape), "= (steps + 1, F, 4, h, w)")
