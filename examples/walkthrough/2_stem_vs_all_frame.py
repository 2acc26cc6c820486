"""2. STEM attention against all-frame attention, as the number of bases K grows.

All-frame attention lets each frame's queries look at every token of every frame: F·N × F·N scores, the
square of the video's length. STEM attends to K bases instead (F·N × K scores, and the EM's F·N × K per
iteration): linear in the length. It works because the tokens of a real video cluster (the same objects
seen in every frame), and K bases can stand for the clusters.

Part 1 builds such a video: 12 objects move across 8 frames of 64 tokens; a token's key, query and value
are its object's, plus noise. Once K reaches the number of objects, STEM's output is all-frame attention's
to a fraction of a percent. Far more bases than objects split the clusters, and since attention to the
bases does not weigh a basis by how many tokens it stands for, the difference grows a little again.
Part 2 takes the tiny random-weight UNet's first self-attention layer on the shipped clip: random weights
make tokens that do not cluster, and K bases summarise them less well.
"""
import torch
from common import PROMPT, frames, tiny

from stemref.attention import AttnCall, RunInfo
from stemref.context import AllFrames, EMAttention, per_frame

KS = (1, 2, 4, 8, 12, 16, 64, 256)


def compare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int) -> None:
    """q, k, v (F, h, N, d), one row per frame: print how far per-frame and STEM attention are from all-frame."""
    call = AttnCall("demo.attn1", False, RunInfo(frames=frames))
    exact = AllFrames()(q, k, v, call)  # (F, h, N, d): every frame attends to all F·N tokens
    distance = lambda out: ((out - exact).norm() / exact.norm()).item()
    T = frames * q.shape[2]
    print(f"  {frames} frames × {q.shape[2]} tokens = {T} tokens; all-frame attention: {T * T:,} scores per head")
    print(f"  per-frame attention (1-frame): relative difference {distance(per_frame(q, k, v, call)):.4f}")
    for K in KS:
        stem = EMAttention(num_bases=K, generator=torch.Generator().manual_seed(0))(q, k, v, call)
        print(f"  STEM, K = {K:3d}: {6 * T * K:>9,d} scores per head (5 EM iterations + attention), "
              f"relative difference {distance(stem):.4f}")


print("1. a video of 12 moving objects")
g = torch.Generator().manual_seed(0)
F, N, d, objects = 8, 64, 16, 12
directions = torch.nn.functional.normalize(torch.randn(objects, d, generator=g), dim=-1)  # (12, d)
values = torch.randn(objects, d, generator=g)  # (12, d)
ids = torch.stack([(torch.arange(N) // 6 + f) % objects for f in range(F)])  # (F, N): each token's object, moving
noisy = lambda x: (x + 0.1 * torch.randn(x.shape, generator=g))[:, None]  # (F, 1, N, d): one head
q, k, v = noisy(6 * directions[ids]), noisy(6 * directions[ids]), noisy(values[ids])
compare(q, k, v, F)

print("2. the tiny random-weight UNet, first self-attention layer, 6 frames of the shipped clip")
sd = tiny()
video = frames(count=6, size=64)  # (6, 3, 64, 64)
layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # 8 × 8 latent grid: 64 tokens per frame
captured = {}


def capture(q, k, v, call):
    """A processor (attention.py's extension point) that keeps q, k, v and attends per frame, as SD does."""
    captured.update(q=q, k=k, v=v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


with torch.no_grad(), sd.unet.attention(lambda name: capture if name == layer else None):
    prompt = sd.encode_prompt(PROMPT).expand(len(video), -1, -1)  # (F, 77, D)
    sd.unet(sd.encode_frames(video), 501, prompt, RunInfo(frames=len(video)))
compare(captured["q"], captured["k"], captured["v"], len(video))
