"""Text-driven video editors on top of stemref's inversions, one readable module per method.

    tokenflow.py         TokenFlow (Geyer et al., ICLR 2024) as the STEM paper edits: plug-and-play injection,
                         keyframe extended attention, nearest-neighbour token propagation, FreeU
    fatezero.py          FateZero (Qi et al., ICCV 2023): inversion attention fused into the edit (the numbered
                         algorithm and its loop), with
    fatezero_plan.py     its settings and plan: the windows, word swap/refine/reweight, blend words, fused layers,
    fatezero_fusion.py   its two attention processors: the recorder (inversion) and the fusion (edit, blend masks),
    p2p.py               prompt-to-prompt's word swap, refinement, reweighting and blend masks as pure functions,
    attention_store.py   and a compact attention store that spills to disk beyond a memory budget
    tuning.py            one-shot tuning of an inflated video UNet on the input video: Tune-A-Video (Wu et al.,
                         ICCV 2023) and EI² (STAM + FFAM, NeurIPS 2023); tuned weights as a small safetensors file
    tuned.py             editing with a tuned model: DDIM inversion with the empty prompt (or STEM's EM attention),
                         then guided sampling with the target prompt
    cache.py             the on-disk cache of inversions (and other costly preparations) keyed by what they depend on

`python -m stemref.edit` is the command (stemref/cli/edit.py). Editors take frames or an `Inversion`
and return frames (F, 3, H, W) in [0, 1] or latents; they never print, and report progress through a
callback `(done, total)`.
"""
