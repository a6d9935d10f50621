"""Driving generated layers in the tests: build inputs, run the parallel pass, stream token by
token, continue from a state, compare outputs."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import psmc
from layer_cases import CASES, draw_values

# float64 everywhere: parallel and streaming passes bracket an associative op differently and
# batch matmuls differently, so they may differ by rounding; a wrong bracketing or a wrong
# carry is off by 1e-3 or more for these small inputs.
RTOL, ATOL = 1e-9, 1e-11

TORCH_DTYPE = {"f16": torch.float64, "bf16": torch.float64, "f32": torch.float64, "f64": torch.float64,
               "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}


def layer_class(name: str, path=None):
    """The generated class of op `name` (compiled and cached by psmc.load)."""
    module = psmc.load(path if path is not None else CASES[name].path)
    return module.__psmc_layers__[name]


def declared_shape(cls, slot, dims: dict) -> tuple:
    """The trailing shape a caller passes for `slot` (chunk ops: the chunk axis is time)."""
    shape = tuple(int(s) for s in slot.shape(dims))
    return shape[1:] if cls.spec.chunk is not None else shape


def make_inputs(cls, dims: dict, batch: int, time: int, lanes: tuple, broadcast: tuple, seed: int,
                kinds: dict | None = None) -> dict:
    """One tensor per input, `[batch, time, *lanes, *declared]`; `broadcast[i][j]` gives input i
    size 1 on lane axis j (NumPy broadcasting against the other inputs)."""
    kinds = kinds or {}
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for i, slot in enumerate(cls.spec.inputs):
        lane_shape = tuple(1 if broadcast[i][j] else size for j, size in enumerate(lanes))
        shape = (batch, time, *lane_shape, *declared_shape(cls, slot, dims))
        inputs[slot.name] = draw_values(kinds.get(slot.name, "signed"), shape, TORCH_DTYPE[slot.dtype], gen)
    return inputs


def as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def time_slice(inputs: dict, start: int, stop: int) -> dict:
    return {name: x[:, start:stop] for name, x in inputs.items()}


def stream(layer, inputs: dict, state, start: int, stop: int):
    """Step tokens start..stop-1 one at a time; outputs stacked on the time axis, and the state."""
    per_token = []
    for t in range(start, stop):
        out, state = layer.step(state, **{name: x[:, t] for name, x in inputs.items()})
        per_token.append(as_tuple(out))
    return tuple(torch.stack(parts, dim=1) for parts in zip(*per_token)), state


def assert_agree(got: tuple, want: tuple, what: str):
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, output {i}: {m}")
        else:
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), \
                f"{what}, output {i}: {g} != {w}"


def tree_roots(state) -> int:
    """Occupied roots of a tree-scan stream state (a chunk op's state wraps one)."""
    inner = getattr(state, "inner", state)
    return sum(root is not None for root in inner.roots)


class Casts(TorchDispatchMode):
    """Records the dtype of every copy (`aten._to_copy`) made from the storage of `watched`."""

    def __init__(self, watched: dict):
        super().__init__()
        self.ptrs = {x.untyped_storage().data_ptr(): n for n, x in watched.items()}
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):
            name = self.ptrs.get(args[0].untyped_storage().data_ptr())
            if name is not None:
                self.copies.append((name, kwargs.get("dtype", args[0].dtype)))
        return func(*args, **kwargs)


class Unread(torch.Tensor):
    """A count whose value must not be read on the host (on a GPU, a sync): tests that a path
    keeps the count on its device make the state's count one (`count.as_subclass(Unread)`)."""

    def __int__(self):
        raise AssertionError("the count was read on the host")

    item = __index__ = __int__
