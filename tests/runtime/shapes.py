"""The shapes of every tensor a call produces, for tests that bound what a function forms
(e.g. a decode step in O(K V) never makes a K x K tensor)."""
from __future__ import annotations

import torch


def result_shapes(run) -> list[tuple]:
    """Run `run()` and return the shape of each tensor that a torch function returned inside it."""
    shapes = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    with Spy():
        run()
    return shapes
