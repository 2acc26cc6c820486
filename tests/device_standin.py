"""A stand-in accelerator for a CPU-only PyTorch: "device" tensors that compute on real CPU data, and a
dispatch mode that fails any op in which a device tensor meets a CPU tensor, as CUDA does.

    with DeviceStandIn() as dev:
        sd = stemref.load(root, dtype=torch.float64, device=dev.device)   # weights on the stand-in
        stemref.invert(sd, frames, "a cat")                               # a stray CPU tensor raises DeviceMixError
    dev.syncs                                                             # device -> host transfers, with where

Why not the alternatives (torch 2.13, CPU-only build):
- `FakeTensorMode` can make fake `cuda` tensors, but they hold no data, so `argmax` indices, `.item()` and
  every data-dependent branch stop the run; and autograd on a fake `cuda` tensor aborts the process (a CPU-only
  build has no CUDA device guard), so no tuning step could run.
- The plain meta device holds no data either, and a module built on meta must be real to compute.
So the stand-in reports the *meta* device (it has a device guard and autograd on every build) for tensors of
a wrapper subclass, `OnDevice`, that carry their real CPU data. Code that asks a tensor for its device gets
`meta` and, passing it on (`torch.zeros(n, device=x.device)`, `.to(sd.device)`), makes more device tensors;
code that forgets the device makes a plain CPU tensor, and the first op that mixes the two fails.

CUDA's rules, kept: a 0-dim CPU tensor may meet device tensors (CUDA takes it as a scalar), and CPU index
tensors may index a device tensor (CUDA copies them over). Every op that hands a device tensor's data to the
host (`.item()`, `bool()`, `.tolist()`, `.cpu()`, `nonzero`, ...) is recorded in `syncs` with the line of
stemref that asked for it: on a GPU each one waits for every queued kernel.

With `half=True`, an op that gets device tensors of two floating dtypes (each with at least one dimension) fails
too, unless it is a cast: code that computes in float32 beside fp16/bf16 activations must say so with an
explicit `.to()`/`.float()`, where it is a documented fp32 island.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten
# ops whose result a CPU host must wait for when their input lives on an accelerator
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
              aten.is_nonzero.default, aten.unique_dim.default, aten._unique2.default, aten.unique_consecutive.default}
CASTS = {aten._to_copy.default, aten.copy_.default, aten.clone.default, aten.detach.default, aten.alias.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMixError(RuntimeError):
    """A device tensor met a CPU tensor (or, with half=True, a tensor of another floating dtype)."""


class OnDevice(torch.Tensor):
    """A tensor on the stand-in device: reports `meta`, holds real CPU data in `.cpu_data`."""

    cpu_data: torch.Tensor

    @staticmethod
    def __new__(cls, real: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, real.shape, strides=real.stride(), dtype=real.dtype,
                                                device=DEVICE, storage_offset=real.storage_offset(),
                                                requires_grad=real.requires_grad)
        t.cpu_data = real
        return t

    def __repr__(self) -> str:
        return f"OnDevice({self.cpu_data!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DeviceMixError(f"{func} met a stand-in device tensor outside DeviceStandIn")


@dataclass
class Sync:
    op: str
    where: str  # the innermost stemref line that asked for it


class DeviceStandIn(TorchDispatchMode):
    device = DEVICE

    def __init__(self, half: bool = False):
        super().__init__()
        self.half = half
        self.syncs: list[Sync] = []

    def __enter__(self):
        # Module.to() would otherwise pour an OnDevice into a plain Parameter (`param.data = ...`)
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        self._constructors = _Constructors().__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        result = super().__exit__(*exc)
        self._constructors.__exit__(*exc)
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        on_device = [t for t in flat if isinstance(t, OnDevice)]
        requested = kwargs.get("device")
        to_device = requested is not None and torch.device(requested) == DEVICE
        if on_device:
            self._check(func, args, flat)
        if on_device and func is aten.copy_.default and not isinstance(args[0], OnDevice):
            self._sync(func)  # device -> host copy
        a, k = tree_map(_unwrap, (args, kwargs))
        out = func(*a, **k)
        if not on_device and not to_device:
            return out
        if func in HOST_READS and on_device:
            self._sync(func)
        if func is aten._to_copy.default and requested is not None and not to_device:
            self._sync(func)  # .cpu(), .to("cpu")
            return out
        if torch.Tag.inplace_view in func.tags and isinstance(args[0], OnDevice):
            with no_dispatch():  # squeeze_ and kin: the wrapper's own sizes follow (the meta kernel sets them)
                func(args[0], *args[1:], **kwargs)
        if isinstance(args[0] if args else None, torch.Tensor) and func._schema.is_mutable and \
                func._schema.arguments[0].is_write:
            return args[0] if isinstance(args[0], OnDevice) else out
        wrap = lambda x: OnDevice(x) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x
        return tree_map(wrap, out)

    def _check(self, func, args, flat) -> None:
        if any(isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.is_meta for t in flat):
            raise DeviceMixError(f"{func}: a data-less meta tensor reached the stand-in, made where no dispatch mode "
                                 f"sees it (at {_caller()}); teach _Constructors to build it")
        hosted = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.dim() > 0]
        if func in INDEX_OPS:  # CPU indices into a device tensor are allowed (CUDA copies them)
            indices = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)}
            hosted = [t for t in hosted if id(t) not in indices]
        if func is aten.copy_.default:  # copies between devices are what copy_ is for
            hosted = []
        if hosted:
            t = hosted[0]
            raise DeviceMixError(f"{func}: a {t.device} tensor {tuple(t.shape)} {t.dtype} met device tensors "
                                 f"(at {_caller()})")
        if self.half and func not in CASTS:
            floats = {t.dtype for t in flat if isinstance(t, OnDevice) and t.dim() > 0 and t.is_floating_point()}
            if len(floats) > 1:
                raise DeviceMixError(f"{func} mixes {sorted(map(str, floats))} device tensors (at {_caller()})")

    def _sync(self, func) -> None:
        self.syncs.append(Sync(str(func), _caller()))


class _Constructors(TorchFunctionMode):
    """torch.tensor(data, device=...) and its kin fill a tensor outside the dispatcher, where no dispatch mode
    sees them: they build it on the CPU here, and move it to the stand-in through the dispatcher."""

    FUNCS = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
    INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INDEXING and isinstance(args[0], OnDevice):
            # x[[0, 2]] builds its index tensor on x's device outside the dispatcher: build it on the CPU instead
            index = tuple(map(_list_index, args[1])) if isinstance(args[1], tuple) else _list_index(args[1])
            return func(args[0], index, *args[2:], **kwargs)
        if func in self.FUNCS and kwargs.get("device") is not None and torch.device(kwargs["device"]) == DEVICE:
            if isinstance(args[0], torch.Tensor):  # as_tensor(tensor, device=...) is tensor.to(device)
                return args[0].to(device=DEVICE, dtype=kwargs.get("dtype"))
            return func(*args, **dict(kwargs, device="cpu")).to(DEVICE)
        return func(*args, **kwargs)


def _list_index(i):
    return torch.tensor(i) if isinstance(i, list) else i


def _unwrap(x):
    if isinstance(x, OnDevice):
        return x.cpu_data
    if isinstance(x, torch.device) and x == DEVICE:
        return torch.device("cpu")
    if isinstance(x, str) and x == "meta":
        return "cpu"
    return x


def _caller() -> str:
    """file:line of the innermost frame in stemref (else in the tests) that led here."""
    frames = traceback.extract_stack()
    for marker in ("/stemref/", "/tests/"):
        for f in reversed(frames):
            if marker in f.filename and not f.filename.endswith("device_standin.py"):
                return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.line}"
    return "?"


def host(x):
    """A result handed back from the stand-in device as plain CPU tensors (outside the mode: .cpu_data)."""
    return tree_map(lambda t: t.cpu_data if isinstance(t, OnDevice) else t, x)
