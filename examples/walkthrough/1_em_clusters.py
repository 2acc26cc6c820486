"""1. STEM's EM on toy clusters: K bases move to the centres of the token clusters.

STEM summarises the T keys of a whole video by K bases μ (stemref/em.py). Each EM iteration
  E-step: every token's responsibilities z_tk = softmax_k(k_t · μ̂_k / τ), μ̂ = μ / ‖μ‖ (a soft assignment);
  M-step: every basis becomes the responsibility-weighted mean of the tokens, μ_k = Σ_t z̄_tk k_t.
Here the "keys" are 3 clusters of 2-D points; run it and watch the distance from each cluster centre to its
nearest basis fall with the iterations, as k-means would.
"""
import torch

from stemref.em import em_bases, responsibilities

torch.manual_seed(0)
angles = torch.tensor([0.3, 2.4, 4.3])
centres = 3 * torch.stack([angles.cos(), angles.sin()], dim=1)  # (3, 2): three directions, norm 3
keys = torch.cat([c + 0.3 * torch.randn(200, 2) for c in centres])  # (600, 2) tokens
values = torch.arange(3).repeat_interleave(200).float()[:, None]  # each token's cluster id as its value
K, tau = 3, 0.5

print(f"{len(keys)} tokens in 3 clusters at {[tuple(round(x, 2) for x in c) for c in centres.tolist()]}")
print("iterations | distance from each centre to its nearest basis")
for iters in (1, 2, 3, 5, 10):
    # the same initial draw every time (seeded), run for `iters` iterations: the bases' trajectory
    mu, nu = em_bases(keys[None], values[None], num_bases=K, iters=iters, tau=tau,
                      generator=torch.Generator().manual_seed(3))  # (1, K, 2), (1, K, 1)
    distance = torch.cdist(centres, mu[0]).min(dim=1).values  # (3,)
    print(f"{iters:10d} | " + "  ".join(f"{d:.3f}" for d in distance.tolist()))
z = responsibilities(keys[None], mu, tau)[0]  # (600, K): each row sums to 1
print("bases after 10 iterations:", [tuple(round(x, 2) for x in b) for b in mu[0].tolist()])
print("value bases ν (the mean cluster id each basis stands for):", [round(x, 2) for x in nu[0, :, 0].tolist()])
print("share of each cluster's tokens whose largest responsibility is one basis:",
      [round(z[i * 200:(i + 1) * 200].argmax(1).bincount(minlength=K).max().item() / 200, 3) for i in range(3)])

# EM finds a local optimum: an unlucky draw can leave two bases on one cluster. With many more bases than
# clusters (STEM uses K = 256 for a few hundred thousand tokens) every cluster gets some.
for k in (3, 8):
    mu, _ = em_bases(keys[None], keys[None], num_bases=k, iters=10, tau=tau, generator=torch.Generator().manual_seed(2))
    worst = torch.cdist(centres, mu[0]).min(dim=1).values.max().item()
    print(f"an unlucky initial draw, K = {k}: farthest centre from its nearest basis {worst:.3f}")
