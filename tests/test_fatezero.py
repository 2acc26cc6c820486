"""FateZero (stemref.edit.fatezero): spatial-temporal context, compact store, fusion, and the editor end to end.

The tiny random-weight SD runs in float64 on 64×64 frames (latents 8×8: 64 query tokens at the top level,
16 below, 4 at the "16²" blend level, 1 in the middle block); `max_tokens=16` plays the role of SD1.5's
1024 (every level but the top one is fused). `min_channels=64` plays the role of 640: the tiny UNet's 64-wide
levels attend to the middle frame, its 32-wide levels within their own frame.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stemref
from stemref.attention import AttnCall, RunInfo
from stemref.context import SpatialTemporal, context_processor, gather_frames, visible_frames
from stemref.edit import fatezero, fatezero_fusion, p2p
from stemref.edit.attention_store import AttentionStore, StepReader, write_safetensors
from stemref.edit.fatezero import FateZeroSettings, Plan, edit, edit_latents
from stemref.em import EPS
from test_context import naive_attention

SOURCE, TARGET = "a cat on the grass", "a dog on the grass"
STEPS = 3
CONTEXTS = {"stem": dict(num_bases=4), "fatezero": dict(min_channels=64), "2-frame": {}}
TINY = dict(max_tokens=16)


def video(frames: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, size, size, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def inversions(tiny_sd):
    """A stemref.invert inversion of the same clip under each context."""
    return {name: stemref.invert(tiny_sd, video(), SOURCE, steps=STEPS, context=name, **options)
            for name, options in CONTEXTS.items()}


# ---- the spatial-temporal context -------------------------------------------------------------------------
def rows(branches, frames, channels, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = 2
    return [torch.randn(branches * frames, heads, tokens, channels // heads, generator=g, dtype=torch.float64)
            for _ in range(3)]


def call(frames, cross=False):
    return AttnCall("mid_block.attentions.0.transformer_blocks.0.attn1", cross, RunInfo(frames=frames))


@pytest.mark.parametrize("channels", [8, 16])
def test_mid_attends_to_the_middle_frame_in_wide_layers(channels):
    frames = 4
    q, k, v = rows(2, frames, channels)
    out = SpatialTemporal("mid", min_channels=16)(q, k, v, call(frames))
    for b in range(2):
        for f in range(frames):
            r = b * frames + f
            key = b * frames + (frames - 1) // 2 if channels >= 16 else r
            torch.testing.assert_close(out[r], naive_attention(q[r], k[key], v[key]), rtol=0, atol=1e-12)


def test_mid_ignores_the_other_frames_keys():
    q, k, v = rows(1, 5, 16)
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[[0, 1, 3, 4]] += 1
    changed_v[[0, 1, 3, 4]] -= 1
    st = SpatialTemporal("mid", min_channels=16)
    assert torch.equal(st(q, k, v, call(5)), st(q, changed_k, changed_v, call(5)))


def test_first_previous_attends_to_previous_then_first_frame():
    frames = 4
    q, k, v = rows(2, frames, 8)
    out = SpatialTemporal("first+previous")(q, k, v, call(frames))
    for b in range(2):
        for f in range(frames):
            r, first, previous = b * frames + f, b * frames, b * frames + max(f - 1, 0)
            keys, values = torch.cat([k[previous], k[first]], -2), torch.cat([v[previous], v[first]], -2)
            torch.testing.assert_close(out[r], naive_attention(q[r], keys, values), rtol=0, atol=1e-12)


def test_identical_frames_reduce_to_per_frame_attention():
    q, k, v = (x[:1].expand(4, -1, -1, -1) for x in rows(1, 1, 16))
    for mode in SpatialTemporal.MODES:
        out = SpatialTemporal(mode, min_channels=8)(q, k, v, call(4))
        torch.testing.assert_close(out, naive_attention(q, k, v), rtol=0, atol=1e-12)


def test_context_registry():
    st = context_processor("fatezero", mode="first+previous", min_channels=1280)
    assert isinstance(st, SpatialTemporal) and st.mode == "first+previous" and st.min_channels == 1280
    with pytest.raises(ValueError, match="mode"):
        context_processor("fatezero", mode="middle")
    with pytest.raises(ValueError, match="takes only"):
        context_processor("fatezero", num_bases=4)


# ---- the store ---------------------------------------------------------------------------------------------
def test_write_safetensors_is_read_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a/q": torch.randn(2, 3, 5, generator=g, dtype=torch.float64),
               "b.attn1/k": torch.randn(7, generator=g).half(), "c/mu": torch.randn(2, 2, generator=g).bfloat16()}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_store_spills_past_its_budget_and_cleans_up(tmp_path):
    x = torch.arange(12, dtype=torch.float64).view(3, 4)
    folder = tmp_path / "store"
    with AttentionStore(memory_budget=x.numel() * 8, folder=folder) as store:
        for t in (1, 21, 41):
            store.add(t, "layer", {"q": x + t})
            store.end_step(t)
        assert list(store.resident) == [1] and sorted(store.on_disk) == [21, 41]
        assert store.peak_resident_bytes == 96 and len(list(folder.iterdir())) == 2
        for t in (1, 21, 41):
            with store.read(t) as step:
                assert torch.equal(step.get("layer", "q"), x + t) and step.get("layer", "k") is None
    assert not folder.exists()


def test_kept_store_reopens(tmp_path):
    folder = tmp_path / "kept"
    with AttentionStore(memory_budget=10**9, folder=folder, keep=True) as store:
        store.add(5, "layer", {"q": torch.ones(2, dtype=torch.float64)})
        store.end_step(5)
    with AttentionStore.open(folder) as reopened:
        assert reopened.steps() == [5]
        with reopened.read(5) as step:
            assert torch.equal(step.get("layer", "q"), torch.ones(2, dtype=torch.float64))
    assert (folder / "store.json").is_file()  # closing a reopened store keeps it


def test_store_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        AttentionStore(folder=tmp_path / "busy")
    with pytest.raises(ValueError, match="memory_budget"):
        AttentionStore(memory_budget=-1)


def record(sd, inversion, **settings):
    """The store of an inversion for the given settings (recorded by replaying its UNet calls)."""
    plan = Plan.make(sd, FateZeroSettings(**{**TINY, **settings}), inversion.settings.steps, SOURCE, TARGET)
    store = AttentionStore(memory_budget=10**12)
    fatezero.replay_inversion(sd, inversion, plan, store)
    return plan, store


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_recording_inversion_is_the_plain_inversion(tiny_sd, inversions, context):
    inv = inversions[context]
    plan = Plan.make(tiny_sd, FateZeroSettings(**TINY), STEPS, SOURCE, TARGET)
    with AttentionStore() as store:
        recorded = fatezero.record_inversion(tiny_sd, video(), inv.settings, plan, store)
        _, replayed = record(tiny_sd, inv)
        # the replay of a saved inversion records exactly what recording during the inversion did
        assert store.steps() == replayed.steps()
        for t in store.steps():
            a, b = store.resident[t], replayed.resident[t]
            assert a.keys() == b.keys()
            assert all(torch.equal(a[n][key], b[n][key]) for n in a for key in a[n])
    assert torch.equal(recorded.latents, inv.latents)


def test_store_holds_only_what_the_windows_fuse(tiny_sd, inversions):
    plan, store = record(tiny_sd, inversions["fatezero"], self_window=(0.0, 0.34), cross_window=0.0,
                         word_windows={"dog": 1.0})
    timesteps = plan.timesteps
    assert store.steps() == sorted(timesteps)  # cross-attention of "dog" at every step
    self_layers = {n for n in store.resident[timesteps[0]] if n.endswith("attn1")}
    assert self_layers and all(n.endswith("attn2") for t in timesteps[1:] for n in store.resident[t])
    for t in timesteps:
        for name, tensors in store.resident[t].items():
            assert not name.startswith(("down_blocks.0.", "up_blocks.3."))  # 64 queries > max_tokens
            # the layer's input tokens of the conditional branch; for cross-attention the source prompt's keys
            assert tensors.keys() == ({"x", "k"} if name.endswith("attn2") else {"x"})
            assert tensors["x"].shape[0] == 3 and tensors["x"].shape[1] <= 16


@pytest.mark.parametrize("context", ["fatezero", "2-frame"])
def test_maps_recomputed_from_the_store_equal_maps_stored_directly(tiny_sd, inversions, context):
    """Float64, bit for bit: softmax(q kᵀ/√d) from the stored q and k is the map inversion computed."""
    inv = inversions[context]
    plan = Plan.make(tiny_sd, FateZeroSettings(**TINY, self_window=1.0, cross_window=1.0), STEPS, SOURCE, SOURCE)
    direct = {}

    def spy(q, k, v, call):
        frames = call.info.frames
        qc, kc = q[-frames:], k[-frames:]
        if call.is_cross:
            keys = kc
        elif context == "2-frame":
            keys = torch.stack([torch.cat([kc[0], kc[max(f - 1, 0)]], dim=-2) for f in range(frames)])
        else:
            wide = q.shape[1] * q.shape[-1] >= 64
            keys = torch.stack([kc[(frames - 1) // 2] if wide else kc[f] for f in range(frames)])
        scores = qc.contiguous() @ keys.contiguous().transpose(-1, -2)
        direct[(call.info.step, call.name)] = torch.softmax(scores * qc.shape[-1] ** -0.5, -1)
        return recorder(q, k, v, call)

    with AttentionStore() as store:
        recorder = fatezero.Recorder(plan, store, fatezero._layer_contexts(tiny_sd, inv.settings))
        eps_fn = fatezero._recording_eps(tiny_sd, inv.settings, 3, store)
        with tiny_sd.unet.attention(lambda name: spy):
            for j, t in enumerate(inv.timesteps):
                eps_fn(inv.latents[j], t, j)
        checked = 0
        fusion = fatezero.Fusion(tiny_sd, plan, {}, (2, 2))
        for (j, name), expected in direct.items():
            i = STEPS - 1 - j  # the edit step that reads this entry
            with store.read(plan.timesteps[i]) as step:
                if step.get(name, "x") is None:
                    assert expected.shape[-2] > 16  # only the top level is not stored
                    continue
                fusion.reader = (i, step)
                is_cross = name.endswith("attn2")
                q, k = fusion.source_qk(AttnCall(name, is_cross, RunInfo(frames=3, step=i)), expected)
                if is_cross:
                    got = fatezero_fusion.probabilities(q, k)
                else:
                    context_ = fatezero._layer_contexts(tiny_sd, inv.settings)[name]
                    table, index = visible_frames(context_, k[None], q.shape[1] * q.shape[-1])
                    got = fatezero_fusion.probabilities(q, gather_frames(table, index)[0])
            assert torch.equal(got, expected), name
            checked += 1
        assert checked == STEPS * 2 * 11  # 11 self and 11 cross layers below the top level (as SD1.5's), every step


def test_stem_bases_of_the_recorder_are_the_inversions(tiny_sd):
    """EMAttention.attend (what the recorder calls) is EMAttention's output and hands out the bases it used."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for scope in (None, 2):
        em = context_processor("stem", generator=torch.Generator().manual_seed(0), num_bases=3, scope=scope)
        twin = context_processor("stem", generator=torch.Generator().manual_seed(0), num_bases=3, scope=scope)
        out, bases = em.attend(q, k, v, call(3))
        mu = torch.stack([b[-1] for b in bases])  # the conditional branch's bases, one set per scope
        assert torch.equal(out, twin(q, k, v, call(3)))
        assert mu.shape == (1 if scope is None else 2, 2, 3, 4)
        # the stored maps: softmax(q μᵀ/√d) of the conditional branch, recomputed from (q, μ)
        q_video = q[3:5].transpose(0, 1).reshape(2, 10, 4)  # frames 0, 1 of the conditional branch, (h, 2·N, d)
        expected = torch.softmax((q_video @ mu[0].transpose(-1, -2)) * 4 ** -0.5, -1)
        assert torch.equal(fatezero_fusion.probabilities(fatezero_fusion._video(q[3:5]), mu[0]), expected)


def test_bases_from_source_responsibilities_against_naive():
    g = torch.Generator().manual_seed(4)
    k_src, k_edit, v_edit = (torch.randn(2, 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mu = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    tau = 0.5
    logits = k_src @ (mu / (mu.norm(dim=-1, keepdim=True) + EPS)).transpose(-1, -2)  # (h, T, K)
    z = torch.softmax((logits - logits.amax(-1, keepdim=True)) / tau, -1)
    z_bar = z / (z.sum(-2, keepdim=True) + EPS)
    for chunk in (None, 5):
        mu_e, nu_e = fatezero_fusion.bases_from_source(k_src, mu, k_edit, v_edit, tau, chunk)
        torch.testing.assert_close(mu_e, z_bar.transpose(-1, -2) @ k_edit, rtol=0, atol=1e-12)
        torch.testing.assert_close(nu_e, z_bar.transpose(-1, -2) @ v_edit, rtol=0, atol=1e-12)


def test_fusion_processor_against_naive(tiny_sd):
    """In a fused self layer, the conditional rows attend with the source maps; the unconditional rows do not."""
    g = torch.Generator().manual_seed(5)
    frames, name = 3, "mid_block.attentions.0.transformer_blocks.0.attn1"
    q, k, v = (torch.randn(2 * frames, 8, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    x_src = torch.randn(frames, 4, 64, generator=g, dtype=torch.float64)  # the source's input tokens (F, N, C)
    layer = tiny_sd.unet.attention_layers[name]
    q_src, k_src = ((x_src @ w.weight.T).view(frames, 4, 8, 8).transpose(1, 2) for w in (layer.to_q, layer.to_k))
    context = SpatialTemporal("mid", min_channels=64)
    plan = Plan.make(tiny_sd, FateZeroSettings(self_window=1.0), STEPS, SOURCE, TARGET)
    fusion = fatezero.Fusion(tiny_sd, plan, {name: context}, (2, 2))
    fusion.reader = (0, StepReader({name: {"x": x_src}}, None))
    out = fusion(q, k, v, AttnCall(name, False, RunInfo(frames=frames, step=0, hw=(2, 2))))
    c = frames + 1  # the conditional middle frame
    for f in range(frames):
        p_src = torch.softmax(q_src[f] @ k_src[1].transpose(-1, -2) / math.sqrt(8), -1)
        torch.testing.assert_close(out[frames + f], p_src @ v[c], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[f], naive_attention(q[f], k[1], v[1]), rtol=0, atol=1e-12)


# ---- the editor ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_empty_windows_with_the_source_prompt_reconstruct_exactly(tiny_sd, inversions, context):
    inv = inversions[context]
    out = edit(tiny_sd, inv, SOURCE, SOURCE, guidance=1.0, self_window=0.0, cross_window=0.0, **TINY)
    assert torch.equal(out, stemref.reconstruct(tiny_sd, inv))


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_full_windows_fuse_every_fused_layer_at_every_step(tiny_sd, inversions, context, monkeypatch):
    reads = {}
    original = StepReader.get

    def logged(self, name, key):
        reads.setdefault(name, set()).add(key)
        return original(self, name, key)

    monkeypatch.setattr(StepReader, "get", logged)
    edit(tiny_sd, inversions[context], SOURCE, TARGET, self_window=1.0, cross_window=1.0, guidance=2.0, **TINY)
    fused = {n for n in tiny_sd.unet.attention_layers if not n.startswith(("down_blocks.0.", "up_blocks.3."))}
    assert set(reads) == fused
    self_keys = {"x", "mu"} if context == "stem" else {"x"}
    assert all(reads[n] == (self_keys if n.endswith("attn1") else {"x", "k"}) for n in fused)


@pytest.mark.parametrize("context", ["fatezero", "2-frame"])
def test_save_then_swap_reproduces_the_recorded_pass(tiny_sd, context):
    """Record a sampling pass as if it were an inversion, then edit with full replacement and the same prompt:
    every fused map is the recorded one at the same timestep, so the edit retraces the pass (float64 rounding
    of explicit attention against SDPA aside)."""
    sd, x_T = tiny_sd, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    settings = stemref.inversion.InversionSettings(SOURCE, STEPS, context, options=CONTEXTS[context])
    contexts = fatezero._layer_contexts(sd, settings)
    cond = sd.encode_prompt(SOURCE)
    inputs, x = [], x_T
    with sd.unet.attention(contexts.get):
        for i, t in enumerate(sd.scheduler.timesteps(STEPS).tolist()):
            inputs.append(x)
            eps = fatezero.predict_noise(sd, x, t, cond, None, 1.0, RunInfo(frames=3, step=i))
            x = sd.scheduler.step(eps, t, x, STEPS)
    sampled = x
    # replay call j runs latents[j] at ascending timestep j: the sampling input at that timestep
    latents = torch.stack([*inputs[::-1], x_T])
    fake = stemref.Inversion(latents, sd.scheduler.timesteps(STEPS).flip(0).tolist(), settings)
    plan = Plan.make(sd, FateZeroSettings(self_window=1.0, cross_window=1.0, guidance=1.0, max_tokens=None),
                     STEPS, SOURCE, SOURCE)
    with AttentionStore() as store:
        fatezero.replay_inversion(sd, fake, plan, store)
        out = fatezero.denoise(sd, fake, plan, store)
        torch.testing.assert_close(out, sampled, rtol=0, atol=1e-12)
        # misaligned (the store read one step late) it is far off
        shifted = AttentionStore()
        for t_now, t_next in zip(plan.timesteps, plan.timesteps[1:] + plan.timesteps[-1:]):
            shifted.resident[t_now] = store.resident[t_next]
        assert (fatezero.denoise(sd, fake, plan, shifted) - sampled).abs().max() > 1e-6


def test_spilled_store_gives_identical_results_and_is_removed(tiny_sd, inversions, tmp_path):
    inv = inversions["stem"]
    settings = dict(self_window=0.7, cross_window=1.0, blend_words=(["cat"], ["dog"]), blend_self_attention=True,
                    blend_latents=True, blend_threshold=0.3, reweight={"dog": 2.0}, **TINY)
    in_memory = edit(tiny_sd, inv, SOURCE, TARGET, memory_budget=10**12, **settings)
    folder = tmp_path / "store"
    seen = []
    on_disk = edit(tiny_sd, inv, SOURCE, TARGET, memory_budget=0, store_dir=folder,
                   progress=lambda done, total: seen.append(len(list(folder.glob("step_*.safetensors")))), **settings)
    assert torch.equal(in_memory, on_disk)
    assert max(seen) == STEPS and not folder.exists()


def test_interrupted_edit_leaves_no_files(tiny_sd, inversions, tmp_path):
    folder = tmp_path / "store"

    def interrupt(done, total):
        if done == total - 1:
            assert list(folder.glob("step_*.safetensors"))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        edit(tiny_sd, inversions["fatezero"], SOURCE, TARGET, memory_budget=0, store_dir=folder, progress=interrupt,
             self_window=1.0, **TINY)
    assert not folder.exists()


def test_editing_frames_records_during_inversion(tiny_sd, inversions, tmp_path):
    """Frames in: one inversion pass records the store; the same edit as from the saved inversion."""
    settings = dict(self_window=0.7, cross_window=0.7, **TINY)
    from_frames = edit(tiny_sd, video(), SOURCE, TARGET, steps=STEPS, context="fatezero",
                       context_options=CONTEXTS["fatezero"], **settings)
    assert torch.equal(from_frames, edit(tiny_sd, inversions["fatezero"], SOURCE, TARGET, **settings))


def test_kept_store_stays(tiny_sd, inversions, tmp_path):
    folder = tmp_path / "kept"
    edit(tiny_sd, inversions["fatezero"], SOURCE, TARGET, store_dir=folder, keep_store=True, **TINY)
    with AttentionStore.open(folder) as store:
        assert store.steps() == sorted(Plan.make(tiny_sd, FateZeroSettings(**TINY), STEPS, SOURCE, TARGET).timesteps)


def test_bad_settings_are_refused(tiny_sd, inversions):
    inv = inversions["fatezero"]
    with pytest.raises(ValueError, match="unknown FateZero settings: cross_replace_steps"):
        edit(tiny_sd, inv, SOURCE, TARGET, cross_replace_steps=0.8)
    with pytest.raises(ValueError, match="not the source prompt"):
        edit(tiny_sd, inv, "a jeep", TARGET)
    with pytest.raises(ValueError, match="controller"):
        edit(tiny_sd, inv, SOURCE, TARGET, controller="swap")
    with pytest.raises(ValueError, match="blend_latents needs blend_words"):
        edit(tiny_sd, inv, SOURCE, TARGET, blend_latents=True)
    with pytest.raises(ValueError, match="window"):
        edit(tiny_sd, inv, SOURCE, TARGET, self_window=1.5)


@pytest.mark.parametrize("settings, words", [
    (dict(reweight={"tiger": 10.0}), "reweight word 'tiger'"),
    (dict(word_windows={"tiger": 0.5}), "word_windows word 'tiger'"),
    (dict(blend_words=(["tiger"], ["dog"]), blend_self_attention=True), "blend source word 'tiger'"),
    (dict(blend_words=(["cat"], ["dog", "tiger"]), blend_latents=True), "blend target word 'tiger'"),
    (dict(blend_words=(["dog"], ["dog"]), blend_self_attention=True), "blend source word 'dog'"),  # a target word
])
def test_words_not_in_the_prompt_are_refused_naming_word_and_prompt(tiny_sd, inversions, settings, words):
    with pytest.raises(ValueError, match=f"{words} is not a word of the prompt"):
        edit(tiny_sd, inversions["fatezero"], SOURCE, TARGET, **settings, **TINY)
    with pytest.raises(ValueError, match="punctuation attached there: turn strip_punctuation on"):
        Plan.make(tiny_sd, FateZeroSettings(reweight={"grass": 2.0}), STEPS, "a cat on the grass,", "a dog on the grass,")


def test_a_repeated_blend_word_counts_each_token_once(tiny_sd):
    """["silver", "jeep", "jeep"] as the official code weighs it: a 0/1 weight per token position, set once."""
    source, target = "a silver jeep driving down a curvy road", "a Porsche car driving down a curvy road"
    twice = Plan.make(tiny_sd, FateZeroSettings(blend_words=(["silver", "jeep", "jeep"], ["Porsche", "car", "car"]),
                                                blend_self_attention=True), STEPS, source, target)
    maps = [torch.rand(2, 2, 4, 77, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in (1, 2)]
    alpha = torch.zeros(77, dtype=torch.float64)  # the official alpha_layers: 1 at each word's tokens
    for word in ("silver", "jeep", "jeep"):
        alpha[p2p.word_positions(tiny_sd.tokenizer, source, word)] = 1
    official = torch.nn.functional.max_pool2d(
        (torch.cat(maps, dim=1) * alpha).sum(-1).mean(1).view(2, 1, 2, 2), 3, stride=1, padding=1)
    assert torch.allclose(p2p.blend_map(maps, twice.source_positions, (2, 2)), official, rtol=1e-12, atol=0)
    assert len(twice.target_positions) == len(set(twice.target_positions))


def test_the_official_reconstruction_config_means_no_blending(tiny_sd, inversions):
    """blend_words None with blend_self_attention True (the official reconstruction entries) runs, unmasked."""
    inv = inversions["fatezero"]
    official = edit_latents(tiny_sd, inv, SOURCE, TARGET, blend_words=None, blend_self_attention=True, **TINY)
    assert torch.equal(official, edit_latents(tiny_sd, inv, SOURCE, TARGET, **TINY))


def test_non_finite_inputs_and_results_are_refused(tiny_sd, inversions):
    import copy

    inv = inversions["fatezero"]
    with pytest.raises(ValueError, match=r"reweight\['dog'\] must be a finite number"):
        edit(tiny_sd, inv, SOURCE, TARGET, reweight={"dog": float("nan")}, **TINY)
    nan = stemref.Inversion(inv.latents.clone(), inv.timesteps, inv.settings)
    nan.latents[2, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="the inversion's latents contain 1 NaN"):
        edit(tiny_sd, nan, SOURCE, TARGET, **TINY)
    broken = copy.deepcopy(tiny_sd)
    broken.unet.conv_out.bias.data.fill_(float("inf"))
    with pytest.raises(ValueError, match="the edited latents contain"):
        edit_latents(broken, inv, SOURCE, TARGET, **TINY)


# ---- the command line --------------------------------------------------------------------------------------
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("fatezero-*.toml"))


def test_example_configs_are_complete_fatezero_settings(tmp_path):
    from stemref.cli import edit as edit_cli
    from stemref.cli import edit_methods

    assert [c.stem for c in CONFIGS] == ["fatezero-attribute-bear-tiger", "fatezero-bunny",
                                         "fatezero-local-jeep-porsche", "fatezero-style-jeep-watercolor"]
    clip = tmp_path / "clip.mkv"
    clip.write_bytes(b"")
    settings = {}
    for config in CONFIGS:
        s = edit_cli.resolve_settings(edit_cli.build_parser(), [str(clip), "--config", str(config)])
        assert s["method"] == "fatezero" and s["inversion"] == ("stem" if "bunny" in config.stem else "fatezero")
        settings[config.stem] = FateZeroSettings(**edit_methods.fatezero_settings(s))
        edit_methods.check_fatezero(s)  # every reweight and blend word is a word of its prompt
        assert settings[config.stem].max_tokens == 1024 and settings[config.stem].fix_shift is False  # official
    assert settings["fatezero-local-jeep-porsche"].blend_words == (["silver", "jeep"], ["Porsche", "car"])
    assert settings["fatezero-style-jeep-watercolor"].reweight == {"watercolor": 10.0}


def test_command_edits_with_fatezero(tiny_root, tmp_path):
    from stemref.cli import edit as edit_cli
    from stemref.video import write_video

    clip = write_video(tmp_path / "clip.mkv", video(3), fps=8)
    out = tmp_path / "out"
    code = edit_cli.main([str(clip), "--method", "fatezero", "--source", SOURCE, "--target", TARGET,
                          "--target", "watercolor painting of " + SOURCE, "--reweight", "watercolor=10",
                          "--inversion", "fatezero", "--min-channels", "64", "--blend-source", "cat",
                          "--blend-self-attention", "--store-memory", "0", "--weights", str(tiny_root),
                          "--steps", "2", "--size", "64", "--device", "cpu", "--no-reuse", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"edit-01-a-dog-on-the-grass.mp4", "side_by_side.mp4", "config.toml"}


@pytest.mark.parametrize("args, message", [
    (["--reweight", "watercolor"], "WORD=NUMBER"),
    (["--self-window", "1.5"], "fraction of the steps"),
    (["--word-window", "dog=2"], "error: --word-window dog=2: a word's window is a fraction of the steps, from 0 to 1"),
    (["--blend-latents"], "error: --blend-latents resets the latents outside the blend words' masks; give the "
                          "words with --blend-source"),
    (["--reweight", "tiger=10"], "'tiger' is not a word of the target prompt 'a dog on the grass'"),
    (["--blend-source", "tiger", "--blend-self-attention"], "error: --blend-source tiger: 'tiger' is not a word of "
                                                             "the source prompt 'a cat on the grass'"),
])
def test_command_refuses_bad_fatezero_settings(tiny_root, tmp_path, capsys, args, message):
    from stemref.cli import edit as edit_cli

    clip = tmp_path / "clip.mkv"
    clip.write_bytes(b"x")
    code = edit_cli.main([str(clip), "--method", "fatezero", "--source", SOURCE, "--target", TARGET, *args,
                          "--weights", str(tiny_root), "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_stem_fusion_processor_against_naive(tiny_sd):
    """STEM inside the self window: A_src = softmax(q_src μ_srcᵀ/√d) applied to the edit's value bases formed with
    the source tokens' responsibilities; the unconditional rows run STEM as usual."""
    g = torch.Generator().manual_seed(7)
    frames, name, K, tau = 3, "mid_block.attentions.0.transformer_blocks.0.attn1", 4, 0.5
    q, k, v = (torch.randn(2 * frames, 8, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    x_src = torch.randn(frames, 4, 64, generator=g, dtype=torch.float64)
    mu = torch.randn(1, 8, K, 8, generator=g, dtype=torch.float64)  # one EM scope: the whole video
    layer = tiny_sd.unet.attention_layers[name]
    q_src, k_src = ((x_src @ w.weight.T).view(frames, 4, 8, 8).transpose(1, 2) for w in (layer.to_q, layer.to_k))
    em = context_processor("stem", generator=torch.Generator().manual_seed(0), num_bases=K, tau=tau)
    twin = context_processor("stem", generator=torch.Generator().manual_seed(0), num_bases=K, tau=tau)
    plan = Plan.make(tiny_sd, FateZeroSettings(self_window=1.0), STEPS, SOURCE, TARGET)
    fusion = fatezero.Fusion(tiny_sd, plan, {name: em}, (2, 2))
    fusion.reader = (0, StepReader({name: {"x": x_src, "mu": mu}}, None))
    call_ = AttnCall(name, False, RunInfo(frames=frames, step=0, hw=(2, 2)))
    out = fusion(q, k, v, call_)
    video = lambda x: x.transpose(0, 1).reshape(8, frames * 4, 8)  # (F, h, N, d) -> (h, F·N, d)
    logits = video(k_src) @ (mu[0] / (mu[0].norm(dim=-1, keepdim=True) + EPS)).transpose(-1, -2)
    z = torch.softmax((logits - logits.amax(-1, keepdim=True)) / tau, -1)  # (h, F·N, K)
    z_bar = z / (z.sum(-2, keepdim=True) + EPS)
    nu_edit = z_bar.transpose(-1, -2) @ video(v[frames:])  # (h, K, d)
    a_src = torch.softmax(video(q_src) @ mu[0].transpose(-1, -2) / math.sqrt(8), -1)  # (h, F·N, K)
    expected = (a_src @ nu_edit).view(8, frames, 4, 8).transpose(0, 1)
    torch.testing.assert_close(out[frames:], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:frames], twin(q[:frames], k[:frames], v[:frames], call_), rtol=0, atol=0)


def test_latent_blending_window_and_reset(tiny_sd, monkeypatch):
    """Blending happens for int(0.2N) < i+1 < int(0.8N); with an empty mask (τ ≥ 1) it resets the latents to the
    inversion's at t_i (the official one-level offset), which is what the next UNet call sees."""
    assert fatezero.latent_blend_steps(50) == range(10, 39)
    assert list(fatezero.latent_blend_steps(10)) == [i for i in range(10) if int(0.2 * 10) < i + 1 < int(0.8 * 10)]
    steps = 10
    inv = stemref.invert(tiny_sd, video(), SOURCE, steps=steps, context="fatezero", **CONTEXTS["fatezero"])
    seen, real = [], fatezero.predict_noise
    monkeypatch.setattr(fatezero, "predict_noise", lambda sd, x, *args: seen.append(x) or real(sd, x, *args))
    edit(tiny_sd, inv, SOURCE, TARGET, blend_words=(["cat"], ["dog"]), blend_latents=True, blend_threshold=1.0, **TINY)
    seen = seen[-steps:]  # the edit's calls (the replay that records the store comes first)
    for i in range(steps - 1):
        blended = i in fatezero.latent_blend_steps(steps)
        assert torch.equal(seen[i + 1], inv.latents[steps - i]) == blended, i
