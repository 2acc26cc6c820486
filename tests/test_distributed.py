"""Frame sharding across processes (stemref.distributed): N gloo processes on the CPU give the single process's
results, frame for frame, in float64.

For N = 2 and 3, one module fixture starts N processes with torch.multiprocessing (a gloo group through a file);
each builds the tiny model (tiny_sd's `stemref.tiny_model(0)`), runs every case below (collectives, inversions, TokenFlow, FateZero) and saves its
shard's results; the tests compare every rank's shard with the same frames of a single-process run in this
process. 7 frames on 2 and 3 processes give uneven shards (4 + 3, 3 + 2 + 2). One start per N: starting
processes is the expensive part.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import stemref
from stemref.distributed import Shard, all_gather, even_starts, fetch, left_neighbour, shard_frames
from stemref.em import em_bases, plain_em

SOURCE, TARGET = "a cat on the grass", "a dog on the grass"
FRAMES = 7
STEPS = 2
INVERSIONS = {  # name -> invert keyword arguments
    "1-frame": dict(context="1-frame"),
    "2-frame": dict(context="2-frame"),
    "all-frame": dict(context="all-frame"),
    "stem": dict(context="stem", num_bases=4, seed=3),
    "stem-guided": dict(context="stem", num_bases=4, guidance=3.0),
    "fatezero-mid": dict(context="fatezero", min_channels=64),
    "fatezero-first+previous": dict(context="fatezero", mode="first+previous"),
}


def video(frames: int = FRAMES, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- running N processes -------------------------------------------------------------------------------------
def _worker(rank: int, size: int, job, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=size)
    try:
        results = job(dist.group.WORLD, *args)
        save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def run_ranks(size: int, job, tmp_path: Path, *args) -> list[dict[str, torch.Tensor]]:
    """job(group, *args) -> {name: tensor} in `size` processes; every rank's results."""
    mp.start_processes(_worker, args=(size, job, str(tmp_path), args), nprocs=size, join=True, start_method="spawn")
    return [load_file(tmp_path / f"rank{r}.safetensors") for r in range(size)]


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """≤ 1e-10 relative to the expected values' magnitude."""
    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert error <= 1e-10 * scale, f"{what}: max error {error:.3g} at scale {scale:.3g}"


def _all_cases(group, inversion_file):
    out = {}
    for prefix, job in (("collectives", _collectives), ("invert", _inversions), ("tokenflow", _tokenflows),
                        ("fatezero", _fatezeros)):
        out.update({f"{prefix}/{name}": value for name, value in job(group, inversion_file).items()})
    return out


@pytest.fixture(scope="module")
def whole_inversion(tiny_sd):
    """A single-process inversion that the editors start from (all-frame: FateZero replays it)."""
    return stemref.invert(tiny_sd, video(), SOURCE, steps=STEPS, context="all-frame")


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, whole_inversion, tmp_path_factory):
    """(N, every rank's results of every case), from one start of N processes."""
    size, folder = request.param, tmp_path_factory.mktemp(f"ranks{request.param}")
    whole_inversion.save(folder / "inversion.safetensors")
    return size, run_ranks(size, _all_cases, folder, folder / "inversion.safetensors")


def of(ranks: list[dict[str, torch.Tensor]], prefix: str) -> list[dict[str, torch.Tensor]]:
    """Every rank's results of one job, by case name."""
    return [{key.split("/", 1)[1]: value for key, value in r.items() if key.startswith(prefix + "/")} for r in ranks]


# ---- the collectives ----------------------------------------------------------------------------------------
def test_even_starts_are_contiguous_and_as_even_as_possible():
    assert even_starts(7, 2) == (0, 4, 7)
    assert even_starts(7, 3) == (0, 3, 5, 7)
    assert even_starts(6, 3) == (0, 2, 4, 6)
    assert shard_frames(7, None) is None


WANTS = [range(2, 6), range(0), range(6, 7)]  # what each rank fetches: across shards, nothing, the last frame


def _collectives(group, inversion_file):
    shard = shard_frames(FRAMES, group)
    items = torch.arange(FRAMES, dtype=torch.float64).view(FRAMES, 1)[shard.start:shard.stop] * torch.ones(1, 2)
    keys, values = em_tokens()
    mine = slice(EM_TOKENS * shard.start, EM_TOKENS * shard.stop)  # this rank's frames' tokens
    mu, nu = em_bases(keys[:, mine], values[:, mine], num_bases=4, chunk=2, generator=torch.Generator().manual_seed(12),
                      shard=shard)
    return {"gathered": all_gather(items, shard), "left": left_neighbour(items, shard),
            "fetched": fetch(items, shard, WANTS[:shard.size]), "transposed": all_gather(items.T, shard, dim=1),
            "em-mu": mu, "em-nu": nu}


EM_TOKENS = 3  # per frame


def em_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (h, F·N, d) and values (h, F·N, dv) of a 7-frame video, frame after frame."""
    g = torch.Generator().manual_seed(11)
    return (torch.randn(2, FRAMES * EM_TOKENS, 4, generator=g, dtype=torch.float64),
            torch.randn(2, FRAMES * EM_TOKENS, 5, generator=g, dtype=torch.float64))


def test_collectives_move_the_right_items(ranks):
    size, ranks = ranks[0], of(ranks[1], "collectives")
    whole = torch.arange(FRAMES, dtype=torch.float64).view(FRAMES, 1) * torch.ones(1, 2)
    starts = even_starts(FRAMES, size)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["gathered"], whole, rtol=0, atol=0)
        torch.testing.assert_close(got["transposed"], whole.T, rtol=0, atol=0)
        torch.testing.assert_close(got["left"], whole[starts[r] - 1:starts[r]] if r else whole[:0], rtol=0, atol=0)
        wanted = WANTS[r]
        torch.testing.assert_close(got["fetched"], whole[wanted.start:wanted.stop], rtol=0, atol=0)


def test_sharded_em_is_the_plain_em_of_the_whole_video(ranks):
    """Every rank's bases, from its own frames' tokens and the all-reduced sums, are the plain EM's of all tokens."""
    mu, nu = plain_em(*em_tokens(), num_bases=4, generator=torch.Generator().manual_seed(12))
    for r, got in enumerate(of(ranks[1], "collectives")):
        assert_same(got["em-mu"], mu, f"key bases on rank {r}")
        assert_same(got["em-nu"], nu, f"value bases on rank {r}")


# ---- inversion and reconstruction ---------------------------------------------------------------------------
def _inversions(group, inversion_file):
    sd = stemref.tiny_model(0, dtype=torch.float64)  # tiny_sd, built again in this process
    frames, out, shard = video(), {}, shard_frames(FRAMES, group)
    for name, options in INVERSIONS.items():
        if name == "stem":  # only this rank's frames, as the command's ranks > 0 hold them
            inv = stemref.invert(sd, frames[shard.start:shard.stop], SOURCE, steps=STEPS, group=group, total=FRAMES,
                                 **options)
        else:
            inv = stemref.invert(sd, frames, SOURCE, steps=STEPS, group=group, **options)
        out[name] = inv.latents
        if name == "stem":
            out["stem-reconstruction"] = stemref.reconstruct(sd, inv)
            out["stem-whole"] = inv.whole().latents
    return out


def test_sharded_inversion_equals_one_process(tiny_sd, ranks):
    size, ranks = ranks[0], of(ranks[1], "invert")
    starts = even_starts(FRAMES, size)
    for name, options in INVERSIONS.items():
        inv = stemref.invert(tiny_sd, video(), SOURCE, steps=STEPS, **options)
        for r, got in enumerate(ranks):
            assert_same(got[name], inv.latents[:, starts[r]:starts[r + 1]], f"{name} on rank {r} of {size}")
            if name == "stem":
                assert_same(got["stem-whole"], inv.latents, f"gathered stem on rank {r}")
                assert_same(got["stem-reconstruction"], stemref.reconstruct(tiny_sd, inv)[starts[r]:starts[r + 1]],
                            f"stem reconstruction on rank {r} of {size}")


def test_frames_of_a_shard_need_the_group_and_the_total(tiny_sd):
    with pytest.raises(ValueError, match="3 frames given with total=7: pass all 7 frames$"):
        stemref.invert(tiny_sd, video()[:3], SOURCE, steps=STEPS, total=FRAMES)


# ---- TokenFlow ------------------------------------------------------------------------------------------------
TOKENFLOWS = {  # name -> edit_latents keyword arguments; 7 frames
    "batch3": dict(batch=3),  # 3 keyframes; on 2 ranks (4 + 3 frames) the middle batch is cut in two
    "batch4-keyframes-blend": dict(batch=4, blend="keyframes"),  # 2 keyframes: fewer than 3 ranks
    "batch2-freeu": dict(batch=2, freeu=True, pnp_attn=1.0),
}


def _tokenflows(group, inversion_file):
    from stemref.edit import tokenflow

    sd = stemref.tiny_model(0, dtype=torch.float64)  # tiny_sd, built again in this process
    inv = stemref.Inversion.load(inversion_file)
    return {name: tokenflow.edit_latents(sd, inv, TARGET, group=group, **options)
            for name, options in TOKENFLOWS.items()}


def test_sharded_tokenflow_equals_one_process(tiny_sd, whole_inversion, ranks):
    from stemref.edit import tokenflow

    size, ranks, inv = ranks[0], of(ranks[1], "tokenflow"), whole_inversion
    starts = even_starts(FRAMES, size)
    for name, options in TOKENFLOWS.items():
        expected = tokenflow.edit_latents(tiny_sd, inv, TARGET, **options)
        for r, got in enumerate(ranks):
            assert_same(got[name], expected[starts[r]:starts[r + 1]], f"{name} on rank {r} of {size}")


# ---- FateZero -------------------------------------------------------------------------------------------------
FATEZEROS = {  # name -> edit_latents keyword arguments (the inversion runs inside, sharded, unless "replay")
    "stem": dict(context="stem", context_options=dict(num_bases=4), self_window=1.0, cross_window=1.0),
    "fatezero-mid-blend": dict(context="fatezero", context_options=dict(min_channels=64),
                               blend_words=(["cat"], ["dog"]), blend_self_attention=True, blend_threshold=0.5),
    "fatezero-first+previous": dict(context="fatezero", context_options=dict(mode="first+previous")),
    "all-frame-replay": dict(),  # from a saved whole all-frame Inversion: the store is recorded by replaying it
}


def _fatezeros(group, inversion_file):
    from stemref.edit import fatezero

    sd = stemref.tiny_model(0, dtype=torch.float64)  # tiny_sd, built again in this process
    return {name: fatezero.edit_latents(sd, stemref.Inversion.load(inversion_file) if name.endswith("replay")
                                        else video(), SOURCE, TARGET, steps=STEPS, max_tokens=16, group=group,
                                        **options)
            for name, options in FATEZEROS.items()}


def test_sharded_fatezero_equals_one_process(tiny_sd, whole_inversion, ranks):
    from stemref.edit import fatezero

    size, ranks, inv = ranks[0], of(ranks[1], "fatezero"), whole_inversion
    starts = even_starts(FRAMES, size)
    for name, options in FATEZEROS.items():
        expected = fatezero.edit_latents(tiny_sd, inv if name.endswith("replay") else video(), SOURCE, TARGET,
                                         steps=STEPS, max_tokens=16, **options)
        for r, got in enumerate(ranks):
            assert_same(got[name], expected[starts[r]:starts[r + 1]], f"{name} on rank {r} of {size}")
