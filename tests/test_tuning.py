"""One-shot tuning (stemref.edit.tuning) and editing with a tuned model (stemref.edit.tuned) on the tiny model."""
from __future__ import annotations

import copy
import re

import pytest
import torch

import stemref
from stemref.attention import RunInfo
from stemref.context import EMAttention, FineCoarse, SparseCausal
from stemref.edit import tuned as tuned_edit
from stemref.edit.cache import weights_fingerprint
from stemref.edit.tuning import METHODS, Trainer, Tuned, TuneSettings, diffusion_loss, inflate, tune

PROMPT = "a mallard swimming"
FRAMES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
# What the methods tune, spelled out independently of stemref.edit.tuning.TUNED (plus STAM's power-iteration
# vectors, buffers that follow the tuned weights).
EXPECTED = re.compile(r"\.(attn1\.to_q\.weight|attn2\.to_q\.weight|attn_temp\.(to_q|to_k|to_v)\.weight|"
                      r"attn_temp\.to_out\.0\.(weight|bias)|attn_temp\.(to_v|to_out\.0)\.weight_u)$")


@pytest.fixture(scope="module", params=["tune-a-video", "ei2"])
def tuned(request, tiny_sd):
    return tune(tiny_sd, FRAMES, PROMPT, request.param, steps=3, lr=1e-3)


def test_only_the_listed_tensors_change(tiny_sd, tuned):
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    start = inflate(tiny_sd.unet, tuned.method, tuned.options, tuned.settings.seed).state_dict()
    end = tuned.unet(tiny_sd).state_dict()
    changed = {k for k in end if not torch.equal(end[k], start[k])}
    assert changed == {k for k in end if EXPECTED.search(k)}
    assert set(tuned.tensors) == changed
    after = tiny_sd.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the base is untouched


def test_gradients_reach_only_the_tuned_tensors(tiny_sd):
    """A tuning step's backward (the function tune runs) with every parameter watching for a gradient."""
    unet = inflate(tiny_sd.unet, "ei2")
    for name, p in unet.named_parameters():
        p.requires_grad_(bool(EXPECTED.search(name)))
    x0, noise = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    context = tiny_sd.encode_prompt(PROMPT).expand(3, -1, -1)
    diffusion_loss(unet, x0, noise, torch.tensor([500]), context, tiny_sd.scheduler, RunInfo(frames=3)).backward()
    for name, p in unet.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == bool(EXPECTED.search(name)), name


@pytest.mark.parametrize("method", ["tune-a-video", "ei2"])
def test_training_loss_falls_on_the_tuned_clip(tiny_sd, method):
    """Thirty training steps on one batch (the clip's latents, fixed noise and timestep; lr raised for the tiny
    model): the loss on that batch, recomputed from the tuned tensors, ends well below where it started."""
    settings = TuneSettings(PROMPT, steps=30, lr=3e-3)
    trainer = Trainer(tiny_sd, method, METHODS[method], settings, frames=3)
    g = torch.Generator().manual_seed(5)
    x0 = tiny_sd.encode_frames(FRAMES)
    noise, t = torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.tensor([400])
    context = tiny_sd.encode_prompt(PROMPT).expand(3, -1, -1)

    def loss(unet):
        with torch.no_grad():
            return diffusion_loss(unet, x0, noise, t, context, tiny_sd.scheduler, RunInfo(frames=3)).item()

    start = loss(inflate(tiny_sd.unet, method, METHODS[method], settings.seed))
    losses = [trainer.step(x0, noise, t) for _ in range(settings.steps)]
    tuned = Tuned(method, METHODS[method], trainer.tensors(), weights_fingerprint(tiny_sd), settings, losses)
    end = loss(tuned.unet(tiny_sd))
    assert end < 0.7 * start, (start, end)


def test_file_round_trips_bit_for_bit(tiny_sd, tuned, tmp_path):
    path = tuned.save(tmp_path / "tuned.safetensors")
    back = Tuned.load(path)
    assert (back.method, back.options, back.base, back.settings, back.losses) == \
           (tuned.method, tuned.options, tuned.base, tuned.settings, tuned.losses)
    assert back.tensors.keys() == tuned.tensors.keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in tuned.tensors.items())
    a, b = tuned.unet(tiny_sd), back.unet(tiny_sd)
    b_state = b.state_dict()
    assert all(torch.equal(b_state[k], v) for k, v in a.state_dict().items())
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    context = tiny_sd.encode_prompt("x").expand(3, -1, -1)
    with torch.no_grad():
        assert torch.equal(a(x, 200, context, RunInfo(frames=3)), b(x, 200, context, RunInfo(frames=3)))
    assert not list(tmp_path.glob(".*.part"))


def test_file_holds_only_tuned_tensors_and_metadata(tuned, tmp_path):
    from safetensors import safe_open
    import json

    path = tuned.save(tmp_path / "tuned.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["stemref"])
    assert keys and all(EXPECTED.search(k) for k in keys)
    assert meta["method"] == tuned.method and meta["base"] == tuned.base
    assert meta["settings"]["lr"] == 1e-3 and meta["settings"]["steps"] == 3 and meta["options"] == tuned.options


def test_other_base_weights_are_refused(tiny_sd, tuned):
    other = copy.deepcopy(tiny_sd)
    with torch.no_grad():
        other.unet.conv_in.weight[0, 0, 0, 0] += 0.01
    with pytest.raises(ValueError, match="other base weights"):
        tuned.unet(other)


def test_identity_is_the_same_for_float32_and_float64(tiny_root, tiny_loaded):
    assert weights_fingerprint(stemref.load(tiny_root)) == weights_fingerprint(tiny_loaded)


@pytest.mark.parametrize("method", ["tune-a-video", "ei2"])
def test_checkpointing_changes_nothing(tiny_sd, method):
    a = tune(tiny_sd, FRAMES, PROMPT, method, steps=2, lr=1e-3)
    b = tune(tiny_sd, FRAMES, PROMPT, method, steps=2, lr=1e-3, checkpointing=True)
    assert a.losses == b.losses
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_progress_reports_the_loss(tiny_sd):
    seen = []
    result = tune(tiny_sd, FRAMES, PROMPT, "ei2", steps=2, progress=lambda *a: seen.append(a))
    assert seen == [(1, 2, result.losses[0]), (2, 2, result.losses[1])]


def test_exact_spectral_norm_tunes_and_reloads(tiny_sd, tmp_path):
    result = tune(tiny_sd, FRAMES, PROMPT, "ei2", steps=2, lr=1e-3, spectral_norm="exact")
    assert not any(k.endswith("weight_u") for k in result.tensors)
    back = Tuned.load(result.save(tmp_path / "t.safetensors"))
    b_state = back.unet(tiny_sd).state_dict()
    assert all(torch.equal(b_state[k], v) for k, v in result.unet(tiny_sd).state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="tav"), "unknown tuning method"),
    (dict(method="ei2", ffam_r=2, bogus=1), "takes the options"),
    (dict(steps=0), "steps must be"),
    (dict(lr=-1.0), "lr must be"),
    (dict(autocast="fp16"), "needs the model in float32 on a CUDA device"),
    (dict(method="ei2", stam_centring="space"), "centring must be"),
    (dict(seed=2**64), "seed must be a whole number"),
    (dict(seed=1.5), "seed must be a whole number"),
])
def test_bad_settings(tiny_sd, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tune(tiny_sd, FRAMES, PROMPT, **kwargs)


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tuned-weights file"):
        Tuned.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a stemref tuned-weights file"):
        Tuned.load(bad)


def test_load_refuses_damaged_metadata(tuned, tmp_path):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "damaged.safetensors"
    meta = {"format": "stemref.tuned/1", "method": tuned.method, "options": tuned.options, "base": tuned.base}
    save_file({k: v.contiguous() for k, v in tuned.tensors.items()}, path, metadata={"stemref": json.dumps(meta)})
    with pytest.raises(ValueError, match="damaged stemref tuned-weights file"):
        Tuned.load(path)


def _rewrite(path, tensors=None, **meta_changes):
    """The tuned-weights file at `path` rewritten with other tensors or metadata fields."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, old = json.loads(f.metadata()["stemref"]), {k: f.get_tensor(k) for k in f.keys()}
    for field, value in meta_changes.items():
        *parents, last = field.split(".")
        target = meta
        for name in parents:
            target = target[name]
        target[last] = value
    new = old if tensors is None else tensors(old)
    save_file({k: v.contiguous() for k, v in new.items()}, path, metadata={"stemref": json.dumps(meta)})
    return path


@pytest.mark.parametrize("damage, message, needs_model", [
    (dict(tensors=lambda t: {k: v for k, v in t.items() if "attn_temp" not in k or "to_q" not in k}),
     "tuned tensors are missing", True),
    (dict(tensors=lambda t: {k: (v[:, :-1] if k.endswith("attn1.to_q.weight") else v) for k, v in t.items()}),
     "the model needs", True),
    (dict(tensors=lambda t: {k: (v * float("nan") if "attn2" in k else v) for k, v in t.items()}), "NaN", False),
    ({"settings.steps": "3"}, "settings.steps of the wrong type", False),
    ({"settings.checkpointing": 1}, "settings.checkpointing of the wrong type", False),
    ({"base": 7}, "base of the wrong type", False),
])
def test_load_checks_everything_and_names_the_file(tiny_sd, tuned, tmp_path, damage, message, needs_model):
    """A missing tensor (which would silently run another model), a wrong shape, NaN values or a setting of
    the wrong type: ValueError naming the file, at load (with the model: at load, or at latest in .unet())."""
    path = _rewrite(tuned.save(tmp_path / "damaged.safetensors"), **damage)
    if needs_model:
        back = Tuned.load(path)  # without the model the set of tensors cannot be known ...
        with pytest.raises(ValueError, match=message) as unet_error:
            back.unet(tiny_sd)  # ... but it never builds a different model
        assert str(path) in str(unet_error.value)
    with pytest.raises(ValueError, match=message) as error:
        Tuned.load(path, tiny_sd)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- editing

def test_tuned_model_uses_the_methods_self_attention(tiny_sd, tuned):
    model = tuned.model(tiny_sd)
    expected = SparseCausal if tuned.method == "tune-a-video" else FineCoarse
    processors = {n: layer.processor for n, layer in model.unet.attention_layers.items()}
    assert all(isinstance(p, expected) for n, p in processors.items() if n.endswith("attn1"))
    assert model.text_encoder is tiny_sd.text_encoder and model.vae is tiny_sd.vae


def test_inversion_runs_the_tuned_model_with_the_empty_prompt(tiny_sd, tuned):
    """The inversion's first step, redone by hand: ε of the tuned UNet for "" at t = 1 on the clean latents."""
    model = tuned.model(tiny_sd)
    inv = tuned_edit.invert_tuned(model, FRAMES, steps=4)
    assert inv.settings.prompt == "" and inv.settings.guidance == 1.0 and inv.settings.context is None
    x0 = tiny_sd.encode_frames(FRAMES)
    with torch.no_grad():
        eps = model.unet(x0, 1, tiny_sd.encode_prompt("").expand(3, -1, -1), RunInfo(frames=3, step=0))
    torch.testing.assert_close(inv.latents[1], tiny_sd.scheduler.inverse_step(eps, 1, x0, 4), rtol=0, atol=1e-12)


def test_stem_inversion_composes_with_the_tuned_model(tiny_sd, tuned):
    """EM attention replaces the model's self-attention while inverting; the video modules stay in the model;
    the model's own processors are back afterwards."""
    model = tuned.model(tiny_sd)
    stem = tuned_edit.invert_tuned(model, FRAMES, steps=3, inversion="stem", num_bases=4)
    own = tuned_edit.invert_tuned(model, FRAMES, steps=3)
    plain = stemref.invert(tiny_sd, FRAMES, "", steps=3, context="stem", num_bases=4)
    assert (stem.x_T - own.x_T).abs().max() > 1e-6
    assert (stem.x_T - plain.x_T).abs().max() > 1e-6
    x0 = tiny_sd.encode_frames(FRAMES)
    context = tiny_sd.encode_prompt("").expand(3, -1, -1)
    em = EMAttention(4, generator=torch.Generator().manual_seed(0))  # one generator across layers, as invert does
    with torch.no_grad(), model.unet.attention(lambda n: em if n.endswith("attn1") else None):
        eps = model.unet(x0, 1, context, RunInfo(frames=3, step=0))
    torch.testing.assert_close(stem.latents[1], tiny_sd.scheduler.inverse_step(eps, 1, x0, 3), rtol=0, atol=1e-12)
    assert all(not isinstance(layer.processor, EMAttention) for layer in model.unet.attention_layers.values())


def test_edit_samples_with_guidance_against_the_empty_prompt(tiny_sd, tuned):
    """Two sampling steps redone by hand: CFG of the tuned UNet's conditional and unconditional ε."""
    model = tuned.model(tiny_sd)
    inv = tuned_edit.invert_tuned(model, FRAMES, steps=2)
    out = tuned_edit.edit_latents(model, inv, "a duck", guidance=5.0)
    cond, uncond = tiny_sd.encode_prompt("a duck"), tiny_sd.encode_prompt("")
    x = inv.x_T
    with torch.no_grad():
        for i, t in enumerate(tiny_sd.scheduler.timesteps(2).tolist()):
            e_c = model.unet(x, t, cond.expand(3, -1, -1), RunInfo(frames=3))
            e_u = model.unet(x, t, uncond.expand(3, -1, -1), RunInfo(frames=3))
            x = tiny_sd.scheduler.step(e_u + 5.0 * (e_c - e_u), t, x, 2)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)
    frames = tuned_edit.edit(model, FRAMES, "a duck", tuned.method, steps=2)
    assert frames.shape == FRAMES.shape and 0 <= frames.min() and frames.max() <= 1


def test_tuned_editing_refuses_non_finite_inversions_and_results(tiny_sd, tuned):
    import copy

    model = tuned.model(tiny_sd)
    inv = tuned_edit.invert_tuned(model, FRAMES, steps=2)
    nan = stemref.Inversion(inv.latents.clone(), inv.timesteps, inv.settings)
    nan.latents[-1] = float("nan")
    with pytest.raises(ValueError, match="the inversion's latents contain"):
        tuned_edit.edit_latents(model, nan, "a duck", guidance=5.0)
    broken = copy.copy(model)
    broken.unet = copy.deepcopy(model.unet)
    broken.unet.conv_out.bias.data.fill_(float("inf"))
    with pytest.raises(ValueError, match="the edited latents contain"):
        tuned_edit.edit_latents(broken, inv, "a duck", guidance=5.0)
