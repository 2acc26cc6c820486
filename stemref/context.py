"""Frame-context processors for the UNet's self-attention: what each frame's queries may look at.

    "1-frame"    per_frame       the frame's own tokens (plain self-attention, image-style DDIM inversion)
    "2-frame"    SparseCausal    the tokens of the first frame and of the previous frame
    "all-frame"  AllFrames       every token of every frame of the video ("inflated" DDIM inversion)
    "stem"       EMAttention     K bases estimated by EM from every token of every frame (STEM inversion)
    "fatezero"   SpatialTemporal FateZero's spatial-temporal attention: the middle frame in wide layers, the frame
                                 itself in narrow ones ("mid"), or the previous and the first frame ("first+previous")
                 FineCoarse      the frame's own tokens and the other frames' tokens pooled r×r (EI²'s FFAM;
                                 the self-attention of a tuned EI² model, not an inversion context)

All are processors `(q, k, v, call) -> out` (see attention.py): q, k, v arrive head-split, one row per
frame, branch-major (row = branch·F + frame, F = call.info.frames); each branch (e.g. the conditional and
unconditional halves of a guided batch) is a separate video and never sees another branch's frames.
Cross-attention calls (keys from the text) fall through to plain attention unchanged.

Several processes (`RunInfo.shard`, distributed.py): a call holds only this rank's frames. Each context fetches
exactly what its frames look at and the single process would have used: 2-frame the first frame (broadcast)
and the frame before the shard (from the left neighbour); FateZero's "mid" the middle frame (broadcast);
all-frame every frame's keys and values (all-gathered per layer, queries still one chunk at a time); STEM
nothing but its EM sums (all-reduced, em.py); 1-frame nothing at all. FineCoarse (a tuned EI² model's own
attention; tuning runs on one device) refuses a shard.

Fidelity (the official codes' choices, kept as defaults or reproduced by an option):
- 2-frame: as in Tune-A-Video's and STEM's code, frame 0's "previous frame" is frame 0 itself, so frame 0 sees
  its own tokens twice (which equals seeing them once: duplicating every key and value leaves the
  softmax-weighted average unchanged) and frame 1 sees frame 0 twice; frame i ≥ 2 does not see itself.
- STEM: the official code inverts in 8-frame batches, so its bases summarise 8 frames, not the whole video the
  paper describes. The default follows the paper (scope=None); scope=8 reproduces the code. The EM runs per
  head on the projected keys and pools the projected values, as the official code does; the paper's overview
  figure describes keys and values as projections of the converged bases (the same projections, but
  responsibilities computed from the layer's input features). The EM's own choices are listed in em.py.
- FateZero "mid": the middle frame's keys and values replace the frame's own, as the official code does (the
  paper, as summarised, adds them to the frame's own).

Dimension legend:
  B  branches, F frames per branch, n frames in one EM scope or one query chunk
  h  heads, N tokens per frame, d head dim (dv for values), K bases
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed
from .attention import AttnCall, Processor, sdpa, split_frames
from .distributed import Shard
from .em import check_em_options, em_bases

# Tokens per EM/attention chunk. The EM makes three passes over each chunk's responsibilities (softmax,
# Σ_t z, zᵀk); 1,024 × K per head (1 MiB at K = 256 in fp32, 8 MiB for 8 heads) stays in a CPU's cache
# between them, where 16,384 tokens ran the EM 2-4× slower (bench/README.md). A GPU prefers larger chunks.
DEFAULT_CHUNK = 1024
DOWNSAMPLE = ("avg", "stride")  # FineCoarse's ways to make the other frames' coarse tokens
CONTEXTS = ("1-frame", "2-frame", "all-frame", "stem", "fatezero")
CONTEXT_OPTIONS = {"1-frame": (), "2-frame": (), "all-frame": ("chunk_frames",),
                   "stem": ("num_bases", "iters", "tau", "scope", "chunk", "warm_start_iters",
                            "all_frame_if_few_tokens", "low_precision_products"),
                   "fatezero": ("mode", "min_channels")}


def per_frame(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
    """1-frame context: each frame attends to its own tokens only."""
    return sdpa(q, k, v, call)


class SparseCausal:
    """2-frame context (sparse-causal attention): frame i attends to the tokens of frame 0 and frame i−1 (frame 0's
    previous frame is itself: module docstring, Fidelity)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        if call.is_cross:
            return sdpa(q, k, v, call)
        return _attend_visible(self, q, k, v, call)


def visible_frames(context: Processor, xf: torch.Tensor, channels: int,
                   shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames the F (local) frames of xf (B, F, h, N, d) attend to under `context` (any but STEM and FineCoarse):
    a table (B, U, h, N, d) of frames and, per frame f, the table rows it sees in key order, (F, m) long.

    One process: the table is xf itself. With a shard, the table also holds the other ranks' frames that this
    rank's frames see, fetched here (module docstring); `gather_frames(table, index)` gives every frame's keys.
    `channels` (the layer's width h·d) decides FateZero's "mid" routing.
    """
    frames, device = xf.shape[1], xf.device
    own = torch.arange(frames, device=device)
    first_previous = isinstance(context, SparseCausal) or (
        isinstance(context, SpatialTemporal) and context.mode == "first+previous")
    if first_previous:
        table, first, previous = _first_and_previous(xf, shard)
        pair = [previous, first] if isinstance(context, SpatialTemporal) else [first, previous]
        return table, torch.stack(pair, dim=1)  # (F, 2)
    if isinstance(context, SpatialTemporal) and channels >= context.min_channels:
        total = frames if shard is None else shard.total
        if shard is None:
            return xf, torch.full((frames, 1), (total - 1) // 2, device=device)
        middle = distributed.broadcast_item(xf, (total - 1) // 2, shard, dim=1)  # (B, 1, h, N, d)
        return middle, torch.zeros((frames, 1), dtype=torch.long, device=device)
    if isinstance(context, AllFrames):
        table = xf if shard is None else distributed.all_gather(xf, shard, dim=1)  # (B, F_all, h, N, d)
        return table, torch.arange(table.shape[1], device=device).expand(frames, -1)  # (F, F_all)
    if isinstance(context, (SpatialTemporal, SparseCausal)) or context in (sdpa, per_frame):
        return xf, own[:, None]  # (F, 1)
    raise ValueError(f"{type(context).__name__} has no fixed table of frames each frame attends to")


def _first_and_previous(xf: torch.Tensor, shard: Shard | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table, first, previous): a table of frames (B, U, h, N, d) and, per frame, the rows of the video's first
    frame and of its previous frame (frame 0's previous is frame 0), each (F,) long."""
    frames, device = xf.shape[1], xf.device
    own = torch.arange(frames, device=device)
    if shard is None:
        return xf, torch.zeros_like(own), (own - 1).clamp(min=0)
    first = distributed.broadcast_item(xf, 0, shard, dim=1)  # (B, 1, h, N, d)
    left = distributed.left_neighbour(xf, shard, dim=1)  # (B, 1, h, N, d); (B, 0, h, N, d) on rank 0
    table = torch.cat([first, left, xf], dim=1)  # (B, 1 + l + F, h, N, d)
    # frame i's previous is table row 1 + l + i − 1; rank 0's frame 0 (no left neighbour) is its own previous
    previous = (own + left.shape[1]).clamp(min=1)
    return table, torch.zeros_like(own), previous


def _attend_visible(context: Processor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    call: AttnCall) -> torch.Tensor:
    """Each frame's queries attend to the tokens of the frames `visible_frames` lists for it."""
    frames, d = call.info.frames, k.shape[-1]
    # keys and values travel together: one collective per layer, not two
    kv = split_frames(torch.cat([k, v], dim=-1), frames)  # (B, F, h, N, d + dv)
    table, index = visible_frames(context, kv, q.shape[1] * q.shape[-1], call.info.shard)
    keys_values = _rows(gather_frames(table, index))  # (B·F, h, m·N, d + dv)
    return F.scaled_dot_product_attention(q, keys_values[..., :d], keys_values[..., d:])


class AllFrames:
    """All-frame context: every frame attends to every token of every frame of its video.

    The F·N × F·N score matrix is never formed: queries go to attention `chunk_frames` frames at a time
    against the keys of the whole video, so one call holds at most chunk_frames·N × F·N scores per head.
    """

    def __init__(self, chunk_frames: int = 1):
        if not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive number of query frames per attention call, "
                             f"got {chunk_frames!r}")
        self.chunk_frames = chunk_frames

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        if call.is_cross:
            return sdpa(q, k, v, call)
        frames, shard = call.info.frames, call.info.shard
        k_video, v_video = _all_tokens(split_frames(k, frames), split_frames(v, frames), shard)  # (B, h, F·N, ·)
        qf = split_frames(q, frames)  # (B, F, h, N, d)
        out = [_unmerge(F.scaled_dot_product_attention(_video_tokens(qc), k_video, v_video), qc.shape[1])
               for qc in qf.split(self.chunk_frames, dim=1)]  # each (B, n, h, N, dv)
        return _rows(torch.cat(out, dim=1))  # (B·F, h, N, dv)


class EMAttention:
    """STEM's EM attention (the paper's STEM-SA): every frame attends to K bases estimated from all its video's frames.

        μ, ν = em_bases(keys of every frame, values of every frame)   K bases: R rounds of ST-E and ST-M step (em.py)
        out_f = softmax(q_f μᵀ / √d) ν   for every frame f             scaled dot-product attention to the K bases

    `_stem` is these two lines. Everything else in the class is an option or machinery around them:
    - `scope`: how many consecutive frames share one set of bases; None (the paper's "fixed and global
      representation for the whole video") estimates them from all F frames; scope=8 reproduces the official
      code's 8-frame batches (module docstring, Fidelity).
    - `chunk` bounds the tokens the EM and the attention process at once (em.py); it changes nothing but
      rounding. None processes all tokens at once.
    - `generator` seeds the random initial bases, drawn afresh at every call; with it, runs repeat exactly.
    - Several processes (RunInfo.shard): the EM's sums are all-reduced (em.py), so every rank attends to the
      whole video's bases; scopes other than the whole video run in one process only.

    Options that change the method, all off by default (bench/README.md measures what they change):
    - `warm_start_iters` R′: start the EM from the bases this layer ended with at the previous step
      (RunInfo.step − 1, same scope) and run R′ iterations instead of `iters`; calls without such bases
      (the first step, or a step that does not follow the last one) draw and run `iters` as usual. The
      bases are kept in `self.previous`, keyed by layer name and scope, with the step they belong to.
    - `all_frame_if_few_tokens`: where a scope holds no more tokens than bases (n·N ≤ K), skip the EM and
      attend to all its tokens (all-frame attention: exact, and cheaper than the EM there).
    - `low_precision_products`: the EM's M-step products in the model's fp16/bf16 (see em.em_bases).
    """

    def __init__(self, num_bases: int = 256, iters: int = 5, tau: float = 0.01, scope: int | None = None,
                 chunk: int | None = DEFAULT_CHUNK, generator: torch.Generator | None = None, *,
                 warm_start_iters: int | None = None, all_frame_if_few_tokens: bool = False,
                 low_precision_products: bool = False):
        _check_stem_options(num_bases, iters, tau, chunk, scope, warm_start_iters)
        self.num_bases, self.iters, self.tau = num_bases, iters, tau
        self.scope, self.chunk, self.generator = scope, chunk, generator
        self.warm_start_iters, self.all_frame_if_few_tokens = warm_start_iters, all_frame_if_few_tokens
        self.low_precision_products = low_precision_products
        self.previous: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}  # (layer, scope) -> (step, μ)

    def _stem(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall,
              group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """STEM for the n frames (B, n, h, N, ·) of scope `group`: the output (B, n, h, N, dv) and μ (B, h, K, d)."""
        mu, nu = self.bases(_video_tokens(k), _video_tokens(v), call, group)  # EM over every frame's keys and values
        out = self.attend_to_bases(_video_tokens(q), mu, nu)  # every frame's queries attend to them: (B, h, n·N, dv)
        return _unmerge(out, q.shape[1]), mu

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        if call.is_cross:
            return sdpa(q, k, v, call)
        return self.attend(q, k, v, call)[0]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               call: AttnCall) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The self-attention output (B·F, h, N, dv) and, per scope, the key bases (B, h, K, d) it attended to
        (None for a scope that attended to all its tokens: all_frame_if_few_tokens)."""
        frames, shard = call.info.frames, call.info.shard
        if shard is not None and self.scope is not None:
            raise ValueError(f"scope={self.scope} (bases per {self.scope} frames) is not supported across processes; "
                             "use scope=None (the paper's bases over the whole video) or one process")
        qf, kf, vf = split_frames(q, frames), split_frames(k, frames), split_frames(v, frames)  # (B, F, h, N, ·)
        scope = self.scope or frames
        outs, bases = [], []
        for group, (qs, ks, vs) in enumerate(zip(qf.split(scope, 1), kf.split(scope, 1), vf.split(scope, 1))):
            tokens = ks.shape[3] * (ks.shape[1] if shard is None else shard.total)  # the whole scope's, every rank's
            if self.all_frame_if_few_tokens and tokens <= self.num_bases:
                out, mu = _attend_all_tokens(qs, ks, vs, shard), None
            else:
                out, mu = self._stem(qs, ks, vs, call, group)  # (B, n, h, N, dv), (B, h, K, d)
            outs.append(out)
            bases.append(mu)
        return _rows(torch.cat(outs, dim=1)), bases  # (B·F, h, N, dv)

    def bases(self, k: torch.Tensor, v: torch.Tensor, call: AttnCall,
              group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value bases (B, h, K, d), (B, h, K, dv) of scope `group`'s tokens k (B, h, T, d), v (B, h, T, dv):
        em_bases, started from the previous step's bases with warm_start_iters, offered to RunInfo.recorder."""
        iters, init = self.iters, None
        if self.warm_start_iters is not None:
            if call.info.step is None:
                raise ValueError("warm_start_iters needs the step of every call: pass RunInfo(step=...) to the UNet")
            step, mu = self.previous.get((call.name, group), (None, None))
            if step == call.info.step - 1 and mu.shape[:-2] == k.shape[:-2]:
                iters, init = self.warm_start_iters, mu
        mu, nu = em_bases(k, v, self.num_bases, iters, self.tau, init=init, generator=self.generator,
                          chunk=self.chunk, low_precision_products=self.low_precision_products, shard=call.info.shard)
        if self.warm_start_iters is not None:
            self.previous[(call.name, group)] = (call.info.step, mu)
        recorder = call.info.recorder  # --explain's pictures: each token's basis
        if recorder is not None and recorder.wants("bases", call.name, call.info.step):
            recorder.add("bases", call.name, call.info.step, call=call, group=group, keys=k, bases=mu,
                         tau=self.tau, chunk=self.chunk)
        return mu, nu

    def attend_to_bases(self, q: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """softmax(q μᵀ / √d) ν for queries q (B, h, L, d): scaled dot-product attention (Vaswani et al. 2017, Eq. 1)
        with the bases as keys and values. Each query is independent, so they go in chunks."""
        chunks = q.split(self.chunk or q.shape[-2], dim=-2)  # pieces (B, h, c, d)
        return torch.cat([F.scaled_dot_product_attention(qc, mu, nu) for qc in chunks], dim=-2)  # (B, h, L, dv)


def _check_stem_options(num_bases: int, iters: int, tau: float, chunk: int | None, scope: int | None,
                        warm_start_iters: int | None) -> None:
    """Raise ValueError naming the first bad EMAttention option."""
    check_em_options(num_bases, iters, tau, chunk)
    if scope is not None and (not isinstance(scope, int) or scope < 1):
        raise ValueError(f"scope must be a positive number of frames per set of bases, or None for the whole "
                         f"video (the official code's batches correspond to scope=8), got {scope!r}")
    if warm_start_iters is not None and (not isinstance(warm_start_iters, int) or warm_start_iters < 1):
        raise ValueError(f"warm_start_iters must be a positive number of EM iterations, or None (off), "
                         f"got {warm_start_iters!r}")


class SpatialTemporal:
    """FateZero's spatial-temporal self-attention: per frame, the keys and values of a few chosen frames.

    mode "mid" (FateZero's SD configs): in layers of at least `min_channels` channels every frame attends
    only to the middle frame (F−1)//2, its own frame not included (module docstring, Fidelity); narrower
    layers attend within their own frame. SD1.5's configs use 640 (the
    32², 16² and 8² levels at 512²) or 1280 (16² and 8² only); `min_channels` compares with the layer's
    width h·d, so any model's `block_out_channels` can be named. mode "first+previous" (Tune-A-Video's
    sparse-causal attention, FateZero's default without an index): every layer, frame i attends to frame
    i−1 (frame 0: itself) then frame 0, keys in that order.

    `visible_frames` gives the frames each frame attends to, so an editor can rebuild the attention maps.
    """

    MODES = ("mid", "first+previous")

    def __init__(self, mode: str = "mid", min_channels: int = 640):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f"min_channels must be a positive channel count (FateZero's SD configs use 640 or "
                             f"1280), got {min_channels!r}")
        self.mode, self.min_channels = mode, min_channels

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        if call.is_cross:
            return sdpa(q, k, v, call)
        return _attend_visible(self, q, k, v, call)


def gather_frames(xf: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per frame f, the tokens of frames index[f] side by side: (B, U, h, N, d), (F, m) -> (B, F, h, m·N, d)."""
    picked = xf[:, index]  # (B, F, m, h, N, d)
    B, F_, m, h, N, d = picked.shape
    return picked.permute(0, 1, 3, 2, 4, 5).reshape(B, F_, h, m * N, d)  # (B, F, h, m·N, d)


class FineCoarse:
    """EI²'s Fine-coarse Frame Attention (FFAM, paper Eq. 10): frame i attends to its own N tokens (fine) and to
    the tokens of every other frame of its video downsampled by r on the latent grid (coarse):
    N + (F − 1)·⌈H/r⌉·⌈W/r⌉ keys per query, one softmax over all of them.

    Pooling the projected keys and values equals projecting pooled tokens (the projections are linear and
    bias-free), so the processor pools k and v. `downsample` is the paper's unspecified downsample(·, r):
    "avg" averages each r×r cell (anti-aliased; partial cells at odd sizes average what they hold), "stride"
    keeps every r-th token in each direction. With one frame, FFAM is plain self-attention.
    """

    def __init__(self, r: int = 2, downsample: str = "avg"):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive integer downsampling factor (the paper uses 2 or 4), got {r!r}")
        if downsample not in DOWNSAMPLE:
            raise ValueError(f"downsample must be one of {', '.join(DOWNSAMPLE)}, got {downsample!r}")
        self.r, self.downsample = r, downsample

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        if call.info.shard is not None:
            raise ValueError("FineCoarse (EI²'s tuned attention) runs in one process: it sees every frame of the video")
        if call.is_cross or call.info.frames == 1:
            return sdpa(q, k, v, call)
        frames, (H, W) = call.info.frames, call.info.hw
        # others[i] = the frames j ≠ i, in order: (F, F − 1)
        others = torch.arange(frames, device=k.device).expand(frames, frames)[~torch.eye(frames, dtype=torch.bool)]
        others = others.view(frames, frames - 1)
        keys = torch.cat([k, self._coarse(k, frames, H, W, others)], dim=-2)  # (B·F, h, N + (F−1)·n, d)
        values = torch.cat([v, self._coarse(v, frames, H, W, others)], dim=-2)  # (B·F, h, N + (F−1)·n, dv)
        return F.scaled_dot_product_attention(q, keys, values)

    def _coarse(self, x: torch.Tensor, frames: int, H: int, W: int, others: torch.Tensor) -> torch.Tensor:
        """The other frames' downsampled tokens for every frame: (B·F, h, N, d) -> (B·F, h, (F − 1)·n, d)."""
        BF, h, N, d = x.shape
        grid = x.reshape(BF * h, H, W, d).permute(0, 3, 1, 2)  # (B·F·h, d, H, W)
        if self.downsample == "avg":
            grid = F.avg_pool2d(grid, self.r, ceil_mode=True)  # (B·F·h, d, ⌈H/r⌉, ⌈W/r⌉)
        else:
            grid = grid[:, :, ::self.r, ::self.r]  # (B·F·h, d, ⌈H/r⌉, ⌈W/r⌉)
        n = grid.shape[-2] * grid.shape[-1]
        coarse = split_frames(grid.reshape(BF, h, d, n).transpose(-1, -2), frames)  # (B, F, h, n, d)
        return _rows(gather_frames(coarse, others))  # (B·F, h, (F − 1)·n, d)


def context_processor(name: str, generator: torch.Generator | None = None, **options) -> Processor:
    """The processor for a context name in CONTEXTS, with its options (see CONTEXT_OPTIONS).

    Only "stem" is random; the generator seeds it and is ignored by the other contexts.
    """
    if name not in CONTEXTS:
        raise ValueError(f"unknown context {name!r}; choose one of {', '.join(CONTEXTS)}")
    unknown = sorted(set(options) - set(CONTEXT_OPTIONS[name]))
    if unknown:
        takes = f"takes only {', '.join(CONTEXT_OPTIONS[name])}" if CONTEXT_OPTIONS[name] else "takes no options"
        raise ValueError(f"context {name!r} {takes}; got {', '.join(unknown)}")
    if name == "1-frame":
        return per_frame
    if name == "2-frame":
        return SparseCausal()
    if name == "all-frame":
        return AllFrames(**options)
    if name == "fatezero":
        return SpatialTemporal(**options)
    return EMAttention(generator=generator, **options)


def _all_tokens(kf: torch.Tensor, vf: torch.Tensor, shard: Shard | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every frame's keys and values as one sequence each, (B, F, h, N, ·) -> (B, h, F·N, ·); with a shard, every
    rank's frames, all-gathered (keys and values in one collective)."""
    if shard is None:
        return _video_tokens(kf), _video_tokens(vf)
    d = kf.shape[-1]
    # laid out as attention reads them, (B, h, F, N, ·), before they travel: no re-layout of every rank's tokens
    kv = torch.cat([kf.transpose(1, 2), vf.transpose(1, 2)], dim=-1)  # (B, h, n, N, d + dv)
    kv = distributed.all_gather(kv, shard, dim=2).flatten(2, 3)  # (B, h, F_all·N, d + dv)
    return kv[..., :d], kv[..., d:]


def _attend_all_tokens(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """Every query of n frames (B, n, h, N, d) attends to every token of the n frames (of every rank): (B, n, h, N, dv)."""
    k_all, v_all = _all_tokens(kf, vf, shard)  # (B, h, n·N, ·)
    return _unmerge(F.scaled_dot_product_attention(_video_tokens(qf), k_all, v_all), qf.shape[1])


def _video_tokens(xf: torch.Tensor) -> torch.Tensor:
    """All tokens of each video in one sequence, frame after frame: (B, F, h, N, d) -> (B, h, F·N, d)."""
    B, n, h, N, d = xf.shape
    return xf.permute(0, 2, 1, 3, 4).reshape(B, h, n * N, d)  # (B, h, F·N, d)


def _unmerge(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of _video_tokens: (B, h, F·N, d) -> (B, F, h, N, d)."""
    B, h, T, d = x.shape
    return x.view(B, h, frames, T // frames, d).transpose(1, 2)  # (B, F, h, N, d)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, F, h, N, d) -> (B·F, h, N, d), branch-major rows as the UNet lays them out."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # (B·F, h, N, d)
