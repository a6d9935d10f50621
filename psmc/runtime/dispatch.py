"""Which implementation serves a call: `backend="auto"` chooses by cost.

Every way to run a pass of a token-level op is a `Path` in `PATHS`: its name, the passes it
serves ('forward': the parallel pass, 'step': one decode token), whether it needs Triton, why it
cannot serve a given call (None when it can) and its cost tier. `choose` keeps the paths the
backend allows that can serve the call and returns the cheapest:

- backend='torch': the torch paths only;
- backend='triton': the Triton paths only (CPU tensors only under TRITON_INTERPRET=1); none
  left is a RuntimeError that names the reasons;
- backend='auto': Triton paths for CUDA tensors, torch paths everywhere; the cheapest wins.

Cost tiers (lower is faster), from measurements on an H200 (docs/triton.md, "Choosing a path"):

  10  triton first-order scan      time inside each thread, channels across threads (1 HBM pass);
                                   30 for a state with an axis per lane (the selective SSM's h[N]):
                                   the torch lift writes [B, T, L, S] decays and inputs, the scan
                                   [B, T, L, S] states, the readout reads them, where the state
                                   loop reads only the inputs
  10  chunked tensor-core kernels  (the chunk kernel family registers here when present)
  20  triton block scan            the generated kernels of scalar-state ops; decode steps
  20  triton state loop            the generated kernels of vector-state ops: [lanes, S] tiles,
                                   lift, recurrence and readout fused, time walked in each thread
  20  triton tree                  the fixed tree of a non-associative elementwise op in one launch
                                   (the torch tree takes ~2 log2(T) Agg rounds of gathers)
  20  cpu tree                     the same walk in C++ for CPU tensors (backend 'auto' or 'cpu')
  30  chunkwise                    cuBLAS matmuls per chunk (decayed linear attention); 10 on
                                   CUDA where chunk_linear_attention has Triton chunk kernels
  40  torch fast path              any other fast path of the op (e.g. a chunked delta rule)
  40  triton token loop            matrix states, one token at a time in registers, no tensor
                                   cores: slower than cuBLAS chunkwise over a long sequence,
                                   cheaper for a few tokens (its cost grows with T)
  50  torch first-order            the blocked sequential loop: one launch per step on a GPU
  90  torch generic scan           log-depth scan of the generated bodies

A new kernel family adds itself with `register(Path(...))` (e.g. from its runtime module on
import); the layer code needs no change. Paths with `run=None` are the layer's own torch code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Path:
    name: str
    passes: tuple  # of 'forward', 'step'
    triton: bool
    cost: Callable  # (layer, call) -> float; lower runs faster
    reason: Callable  # (layer, call) -> str | None: why this path cannot serve the call
    run: Callable | None = None  # (layer, call, state) -> (outputs, new state); None: the layer's torch code
    applies: Callable = lambda layer: True  # (layer or layer class) -> whether the op has this path at all


PATHS: list = []


def register(path: Path):
    """Add (or replace, by name) a path."""
    PATHS[:] = [p for p in PATHS if p.name != path.name] + [path]


def candidates(layer, call, kind: str) -> list:
    """(path, reason or None) for every path of this pass that the layer's backend allows."""
    out = []
    for path in PATHS:
        if kind not in path.passes or not path.applies(layer):
            continue
        # backend="cpu" falls back to the torch paths when its C++ kernels cannot serve a call
        if layer.backend in ("torch", "cpu") and path.triton or layer.backend == "triton" and not path.triton:
            continue
        reason = path.reason(layer, call)
        if reason is None and layer.backend == "auto" and path.triton and call.ctx.dev.type != "cuda":
            from . import triton_support
            if not triton_support.RECORDING:
                reason = "backend='auto' runs Triton kernels on CUDA tensors only"
        out.append((path, reason))
    return out


def choose(layer, call, kind: str) -> Path:
    """The cheapest path that can serve this call under the layer's backend."""
    found = candidates(layer, call, kind)
    usable = [p for p, reason in found if reason is None]
    if not usable:
        if layer.backend == "triton":
            reasons = "; ".join(f"{p.name}: {r}" for p, r in found) or "its plan has no Triton kernels (see `psmc check`)"
            raise RuntimeError(f"{layer.spec.name}: backend='triton' cannot run this call: {reasons}; "
                               "use backend='auto' or 'torch'")
        return TORCH_SCAN  # always serves
    # a plain loop rather than min(key=...): torch.compile traces it without a graph break
    best, best_key = None, None
    for path in usable:
        key = (path.cost(layer, call), path.name)
        if best is None or key < best_key:
            best, best_key = path, key
    return best


def has_triton_path(cls) -> bool:
    """Whether some Triton path could serve this layer class (for the AOT compile test)."""
    return any(p.triton and p.applies(cls) for p in PATHS)


# ---------------------------------------------------------------------- the built-in paths
def _fast(cls, prefix: str) -> bool:
    fast = getattr(cls.spec, "fast", None) or ""
    return fast.startswith(prefix)


def _first_order(cls) -> bool:
    return _fast(cls, "first_order")


def _kernel_reason(layer, call):
    from . import triton_support
    return triton_support.unusable_reason(layer, call)


def _triton_reason(layer, call):
    import torch

    from . import triton_scan
    if call.ctx.dt["f32"] == torch.float64:
        return "float64 inputs or params: the kernels accumulate in fp32"
    return triton_scan.unusable_reason(call.ctx.dev)


def _tokens(call) -> int:
    return int(call.lead[1]) if len(call.lead) > 1 else 1


def _token_loop_cost(layer, call) -> float:
    # a few tokens (decode-like chunks) run in registers at once; a long sequence is one
    # token at a time without tensor cores (slower than the chunkwise cuBLAS form)
    return 25.0 if _tokens(call) <= 64 else 40.0


def _has_kernels(layer) -> bool:
    return getattr(layer, "_triton_kernels", None) is not None


def _tile(layer) -> str | None:
    """The tile model of the op's generated kernels (psmc.runtime.triton_abi.TILES), or None."""
    k = getattr(layer, "_triton_kernels", None)
    return None if k is None else k.mode


def _first_order_cost(layer, call) -> float:
    # a state with an axis per lane (h[N] per channel): the torch lift and readout around the
    # scan move [B, T, L, S] tensors several times; the state loop fuses them (its cost: 20)
    return 30.0 if any(f.rank for f in layer.spec.fields) else 10.0


def _run_kernels(layer, call, state):
    from . import triton_support
    return triton_support.forward(layer, call, state)


_run_kernels.packs = True  # the generated kernels take call.cu_seqlens: one program per sequence
_run_kernels.most_sequences = 65_535  # sequences sit on a grid axis that holds 65,535 (triton_support)


def _step_kernels(layer, call, state):
    from . import triton_support
    return triton_support.step(layer, call, state)


def _bind_step_kernels(layer, call, general):
    from . import triton_lane
    return triton_lane.bind_step(layer, call, general)


_step_kernels.bind = _bind_step_kernels  # the decode lane: the step kernel bound to one input signature
_step_kernels.binds_half = True  # it reads bf16/fp16 inputs as given and writes the outputs in their dtype


def _run_first_order(layer, call, state):
    call.ctx.scan_kernel = "triton"
    index = layer._token_positions(call, state) if layer.spec.lift_index or layer.spec.readout_index else None
    return layer._fast_forward(call, index, state)


_run_first_order.packs = True  # the generated first-order fast path takes call.cu_seqlens


def _tree_reason(layer, call):
    from . import tree_kernels
    return tree_kernels.unusable_reason(layer, call)


def _cpu_tree_reason(layer, call):
    from . import tree_kernels
    return tree_kernels.cpu_unusable_reason(layer, call)


def _tree_runner(kernel: str):
    def run(layer, call, state):
        call.ctx.scan_kernel = kernel  # the tree scan inside the torch lift and readout runs the kernels
        return layer._forward_generic(call, state)
    run.packs = True  # one tree per packed sequence, all in one kernel call (a list of counters back)
    if kernel == "triton":
        run.most_sequences = 65_535  # sequences sit on grid axis 1
    return run


TORCH_SCAN = Path("torch-scan", ("forward", "step"), False, lambda layer, call: 90.0, lambda layer, call: None)


def _chunkwise_cost(layer, call) -> float:
    """chunk_linear_attention runs chunked tensor-core Triton kernels for CUDA tensors where the
    runtime has them (psmc.runtime.triton_chunk, `chunkwise.BACKEND`), cuBLAS matmuls otherwise."""
    from . import chunkwise
    if call.ctx.dev.type == "cuda" and hasattr(chunkwise, "BACKEND") and chunkwise.BACKEND != "torch":
        return 10.0
    return 30.0


def _torch_fast(layer, call):
    return None if layer.use_fast_path else "the fast path is off (use_fast_path=False)"


register(TORCH_SCAN)
register(Path("torch-first-order", ("forward",), False, lambda layer, call: 50.0, _torch_fast,
              applies=_first_order))
register(Path("chunkwise", ("forward",), False, _chunkwise_cost, _torch_fast,
              applies=lambda layer: _fast(layer, "chunkwise")))
register(Path("torch-fast", ("forward",), False, lambda layer, call: 40.0, _torch_fast,
              applies=lambda layer: bool(getattr(layer.spec, "fast", None)) and not _fast(layer, "chunkwise")
              and not _first_order(layer)))
register(Path("triton-first-order", ("forward",), True, _first_order_cost,
              lambda layer, call: ("the first-order fast path is off (use_fast_path=False)" if not layer.use_fast_path
                                   else _triton_reason(layer, call)), _run_first_order, applies=_first_order))
register(Path("triton-block-scan", ("forward",), True, lambda layer, call: 20.0, _kernel_reason, _run_kernels,
              applies=lambda layer: _tile(layer) == "lanes"))
register(Path("triton-state-loop", ("forward",), True, lambda layer, call: 20.0, _kernel_reason, _run_kernels,
              applies=lambda layer: _tile(layer) == "state"))
register(Path("triton-token-loop", ("forward",), True, _token_loop_cost, _kernel_reason, _run_kernels,
              applies=lambda layer: _tile(layer) == "matrix"))
register(Path("triton-tree", ("forward",), True, lambda layer, call: 20.0, _tree_reason, _tree_runner("triton"),
              applies=lambda layer: getattr(layer, "_tree_kernels", None) is not None))
register(Path("cpu-tree", ("forward",), False, lambda layer, call: 20.0, _cpu_tree_reason, _tree_runner("cpu"),
              applies=lambda layer: getattr(layer, "_cpu_tree_kernels", None) is not None))
register(Path("triton-step", ("step",), True, lambda layer, call: 20.0, _kernel_reason, _step_kernels,
              applies=lambda layer: _has_kernels(layer)))
