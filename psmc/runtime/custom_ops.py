"""Kernel launches that a torch.compile graph holds as opaque nodes.

The chunked kernels (psmc.runtime.triton_chunk, triton_delta, triton_dplr and the DPLR chain in
psmc.runtime.dplr), the decode-token kernels (triton_delta_step, triton_dplr_step), the
generated kernels of every other plan (triton_support: forward, backward and step), the
first-order scan (triton_scan) and the Triton tree kernels (tree_kernels) are each registered
as a torch custom op, so that Dynamo never traces a kernel launch, the warp autotuner or a
host-side table: a graph holds one node per launch group, and compiled training, prefill and
decode run the same kernels as eager code. Gradients stay in torch.autograd.Functions around
the ops (their forward calls the forward op, their backward the backward op), which cost less
per call than an op's registered autograd; eager code calls the launches directly, since a
custom op's dispatch costs tens of microseconds a call on a slow host (docs/triton.md, "The
kernels as torch ops").
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["traced"]


def traced(op, launch: Callable) -> Callable:
    """`launch` in eager code; inside a torch.compile graph `op`, the custom op that wraps it."""

    def run(*args):
        return op(*args) if torch.compiler.is_compiling() else launch(*args)
    run.__name__ = run.__qualname__ = getattr(launch, "__name__", "run")
    run.__doc__ = launch.__doc__
    return run
