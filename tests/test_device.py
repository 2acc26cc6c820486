"""Every method's whole path with its weights and inputs on a non-CPU device, on a CPU-only machine.

The device is the stand-in of tests/device_standin.py: tensors that report the `meta` device and compute on
real CPU data, under a dispatch mode that fails any op in which such a tensor meets a CPU tensor (as CUDA
does) and records every device -> host read. Each path must (1) run without a device mix, (2) give the same
numbers as the plain CPU run, to float64 rounding (the stand-in changes where tensors claim to live, not what
is computed; PyTorch picks some kernels by device type, e.g. SDPA's math backend for the stand-in), and
(3) read from the device only where the README's "Device → host reads" list says so: per step, counted between
two progress callbacks (the second step's reads, after any first-call setup), nothing in the denoising and
inversion loops and one loss per tuning step; once per call, only at the listed sites.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import stemref
from device_standin import DeviceMixError, DeviceStandIn, OnDevice, host
from stemref.edit import fatezero, tokenflow, tuned as tuned_edit, tuning

FRAMES = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STEPS = 2
# sites that read once per call (not per step): refusing non-finite results and inputs, the weights' identity
PER_CALL = {"stemref/frames.py", "edit/cache.py", "stemref/loading.py", "stemref/clip_metrics.py"}
STEM = dict(num_bases=4)


@pytest.fixture(scope="module")
def dev_sd(tiny_root):
    with DeviceStandIn() as dev:
        sd = stemref.load(tiny_root, dtype=torch.float64, device=dev.device)
    assert isinstance(sd.unet.conv_in.weight, OnDevice) and sd.device == dev.device
    return sd


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


class StepReads:
    """A progress callback that notes the device -> host reads so far at the end of each step."""

    def __init__(self, dev: DeviceStandIn):
        self.dev, self.marks = dev, []

    def __call__(self, done: int, total: int, *loss) -> None:
        self.marks.append(len(self.dev.syncs))

    def per_step(self) -> list[int]:
        """The reads of each step but the first (whose count includes one-time work)."""
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def sites(dev: DeviceStandIn) -> dict[str, int]:
    """Device -> host reads by file (the line is in the message when a test fails)."""
    counts: dict[str, int] = {}
    for s in dev.syncs:
        path = s.where.split(":")[0]
        counts[path] = counts.get(path, 0) + 1
    return counts


# ---- the stand-in itself ----------------------------------------------------------------------------------
def test_standin_fails_where_cuda_fails_and_passes_where_it_passes():
    with DeviceStandIn() as dev:
        x = torch.ones(3, 4, device=dev.device)
        assert isinstance(x, OnDevice) and x.device == dev.device
        with pytest.raises(DeviceMixError, match="cpu tensor"):
            x * torch.ones(4)  # a CPU tensor with a dimension
        y = x * torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar to CUDA
        y = y[torch.tensor([0, 2])]  # CPU indices into a device tensor
        z = torch.zeros(4, device=x.device) + torch.as_tensor([1.0, 2, 3, 4], device=x.device)
        w = torch.ones(4).to(x.device) + z  # moved explicitly
        assert dev.syncs == []
        assert w.sum().item() == 14 and y.cpu().tolist() == [[2.0] * 4] * 2 and bool(z.any())
        w.nonzero()
    assert [s.op for s in dev.syncs] == ["aten._local_scalar_dense.default", "aten._to_copy.default",
                                         "aten._local_scalar_dense.default", "aten.nonzero.default"]


def test_standin_in_half_mode_fails_a_float32_tensor_beside_fp16():
    with DeviceStandIn(half=True) as dev:
        a = torch.ones(4, dtype=torch.float16, device=dev.device)
        with pytest.raises(DeviceMixError, match="mixes"):
            a + torch.ones(4, device=dev.device)
        assert (a.float() + torch.ones(4, device=dev.device)).dtype == torch.float32  # an explicit cast is fine


# ---- inversion ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", ["1-frame", "2-frame", "all-frame", "fatezero", "stem"])
def test_every_inversion_context_and_reconstruct_on_device(dev_sd, tiny_loaded, context):
    options = STEM if context == "stem" else {}
    with DeviceStandIn() as dev:
        inverting, denoising = StepReads(dev), StepReads(dev)
        inv = stemref.invert(dev_sd, FRAMES, "a cat", steps=STEPS, context=context, progress=inverting, **options)
        frames = stemref.reconstruct(dev_sd, inv, progress=denoising)
    assert inverting.per_step() == denoising.per_step() == [0] and set(sites(dev)) <= PER_CALL
    expected = stemref.invert(tiny_loaded, FRAMES, "a cat", steps=STEPS, context=context, **options)
    assert_same(host(inv.latents), expected.latents)
    assert_same(host(frames), stemref.reconstruct(tiny_loaded, expected))


# ---- TokenFlow ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev_inversion(dev_sd):
    with DeviceStandIn():
        return stemref.invert(dev_sd, FRAMES, "a cat", steps=STEPS, context="stem", **STEM)


def test_tokenflow_with_freeu_on_device(dev_sd, tiny_loaded, dev_inversion):
    options = dict(batch=2, freeu=True)  # 2 batches of 3 frames: the second blends two keyframes
    with DeviceStandIn() as dev:
        steps = StepReads(dev)
        latents = tokenflow.edit_latents(dev_sd, dev_inversion, "a dog", progress=steps, **options)
    assert steps.per_step() == [0] and set(sites(dev)) <= PER_CALL
    cpu_inversion = stemref.Inversion(host(dev_inversion.latents), dev_inversion.timesteps, dev_inversion.settings)
    assert_same(host(latents), tokenflow.edit_latents(tiny_loaded, cpu_inversion, "a dog", **options))


def tokenflow_with_blend_weights(cast: str):
    """A copy of stemref.edit.tokenflow whose Propagation casts its blend weights with `cast` instead."""
    source = Path(tokenflow.__file__).read_text()
    fixed = "self.weights.to(out.device, out.dtype)"
    assert fixed in source, "tokenflow.Propagation changed: update the reintroduced bugs of the device tests"
    spec = importlib.util.spec_from_loader("stemref.edit.tokenflow_bug", loader=None)
    buggy = importlib.util.module_from_spec(spec)
    buggy.__package__ = "stemref.edit"
    exec(compile(source.replace(fixed, cast), "tokenflow_bug.py", "exec"), buggy.__dict__)
    return buggy


def test_the_tokenflow_blend_weight_bug_is_caught(dev_sd, dev_inversion):
    """Commit c560cf2's bug, reintroduced in a copy of the module: blend weights cast to the outputs' dtype but
    left on the CPU. The stand-in must fail it (CPU tests alone passed it)."""
    buggy = tokenflow_with_blend_weights("self.weights.to(out.dtype)")
    with DeviceStandIn(), pytest.raises(DeviceMixError, match=r"aten.mul.Tensor: a cpu tensor \(1, 1, 1, 1, 1\)"):
        buggy.edit_latents(dev_sd, dev_inversion, "a dog", batch=2)


# ---- FateZero -------------------------------------------------------------------------------------------------
def test_fatezero_with_blending_and_a_spilling_store_on_device(dev_sd, tiny_loaded, tmp_path):
    options = dict(steps=STEPS, context="stem", context_options=STEM, max_tokens=16, blend_words=(["cat"], ["dog"]),
                   blend_self_attention=True, blend_latents=True, memory_budget=0)
    with DeviceStandIn() as dev:
        steps = StepReads(dev)
        latents = fatezero.edit_latents(dev_sd, FRAMES, "a cat on the grass", "a dog on the grass",
                                        store_dir=tmp_path / "dev", progress=steps, **options)
    # progress counts inversion steps, then edit steps; a store over its budget writes each inversion step's maps
    # to disk (one read per stored tensor, by design); the edit steps read nothing
    spilled = sum(s.where.startswith("edit/attention_store.py") for s in dev.syncs)
    assert steps.per_step()[STEPS - 1:] == [0] * STEPS and 0 < spilled
    assert set(sites(dev)) <= PER_CALL | {"edit/attention_store.py"}
    expected = fatezero.edit_latents(tiny_loaded, FRAMES, "a cat on the grass", "a dog on the grass",
                                     store_dir=tmp_path / "cpu", **options)
    assert_same(host(latents), expected)


# ---- Tune-A-Video / EI² -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tune-a-video", "ei2"])
def test_tuning_steps_and_tuned_editing_on_device(dev_sd, tiny_loaded, method):
    options = dict(steps=STEPS, lr=1e-3, checkpointing=method == "ei2")
    with DeviceStandIn() as dev:
        steps = StepReads(dev)
        tuned = tuning.tune(dev_sd, FRAMES, "a cat", method, progress=steps, **options)
    # one read per step, the loss (Tuned.losses, progress); once per run, the base weights' fingerprint
    assert steps.per_step() == [1] and sites(dev).pop("edit/tuning.py") == STEPS
    assert set(sites(dev)) <= PER_CALL | {"edit/tuning.py"}
    expected = tuning.tune(tiny_loaded, FRAMES, "a cat", method, **options)
    assert_same(torch.tensor(tuned.losses), torch.tensor(expected.losses))
    for k, v in expected.tensors.items():
        assert_same(host(tuned.tensors[k]), v)
    with DeviceStandIn() as dev:
        steps = StepReads(dev)
        edited = tuned_edit.edit(tuned.model(dev_sd), FRAMES, "a dog", method, steps=STEPS, progress=steps)
    inverting, _, sampling = steps.per_step()  # the middle one spans the end of the inversion, the start of sampling
    assert inverting == sampling == 0 and set(sites(dev)) <= PER_CALL
    assert edited.device == dev.device and torch.isfinite(host(edited)).all()


# ---- CLIP metrics and the command ----------------------------------------------------------------------------------
def test_clip_metrics_on_device(tiny_clip_dir):
    from stemref.clip_metrics import clip_metrics
    from stemref.loading import load_clip

    with DeviceStandIn() as dev:
        clip = load_clip(tiny_clip_dir, dtype=torch.float64, device=dev.device)
        scores = clip_metrics(clip, FRAMES, "a dog", "a cat")
    assert set(sites(dev)) <= PER_CALL  # each score, its inputs' finiteness, the loaded weights' finiteness
    expected = clip_metrics(load_clip(tiny_clip_dir, dtype=torch.float64), FRAMES, "a dog", "a cat")
    assert scores.keys() == expected.keys()
    assert all(scores[k] == pytest.approx(v, rel=1e-12) for k, v in expected.items())


def test_edit_command_end_to_end_on_device(tiny_root, tiny_clip_dir, tmp_path, monkeypatch):
    """`python -m stemref.edit` in-process with --device meta (the stand-in): the command's own device check
    knows only cpu, cuda and mps, so it is let through here."""
    import stemref.cli.model
    from stemref.cli.edit import main

    monkeypatch.setattr(stemref.cli.model, "check_device", lambda args: None)
    video = Path(__file__).parent.parent / "examples" / "bunny.mp4"
    argv = [str(video), "--source", "a rabbit", "--target", "a bear", "--weights", str(tiny_root), "--out",
            str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--frames", "3", "--size", "64", "--steps", "2",
            "--batch", "2", "--num-bases", "4", "--clip", str(tiny_clip_dir), "--device", "meta", "--dtype", "fp32"]
    with DeviceStandIn():
        assert main(argv) == 0
    assert any((tmp_path / "out").rglob("*.mp4"))
