"""Compile the chunked kernels of triton_chunk (and triton_delta) ahead of time for a GPU
target on a machine without one, at the launch configurations the runtime really uses.

The launchers are run on CPU tensors while every `kernel[grid](...)` is captured instead of
launched (so block sizes, num_warps and constexprs are exactly the runtime's), then each
captured launch is compiled with `triton.compile(ASTSource(...), GPUTarget("cuda", arch, 32))`
and `ptxas -v` reports registers and spills. Must run without TRITON_INTERPRET (the test runs
it in a subprocess): `python -m psmc.runtime.triton_chunk_aot` prints one JSON line per kernel,
in the recording's order. The compiles run in PSMC_AOT_JOBS forked processes (default: one per
core), each launch compiled once.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys

import torch

from psmc.runtime import autotune

# (name, dtype, K = V, decay, exclusive, with backward, in the test): the benchmark's shapes first
CONFIGS = [
    ("gla", torch.bfloat16, 128, "key", False, True, True),
    ("gla", torch.float32, 128, "key", False, True, False),
    ("simple_gla", torch.bfloat16, 128, "scalar", False, True, True),
    ("linear_attention", torch.bfloat16, 128, "none", False, False, False),
    ("rwkv6", torch.bfloat16, 64, "key", True, True, True),
    ("gla", torch.float32, 64, "key", False, False, True),
]
# the same with packed sequences (cu_seqlens: three sequences of the T tokens)
VARLEN_CONFIGS = [
    ("gla", torch.bfloat16, 128, "key", False, True, True),
    ("rwkv6", torch.float32, 64, "key", True, True, False),
]
# (name, dtype, K = V, gated, in the test, beta's dtype: None for q's)
DELTA_CONFIGS = [
    ("delta_rule", torch.bfloat16, 128, False, False, None),
    ("gated_delta_rule", torch.bfloat16, 128, True, True, None),
    ("gated_delta_rule", torch.float32, 64, True, True, None),
    ("gated_delta_rule", torch.float32, 128, True, True, None),
    # what a generated layer passes for bf16 inputs: q, k, v as given, beta computed in fp32
    ("gated_delta_rule", torch.bfloat16, 128, True, True, torch.float32),
]
# packed sequences (cu_seqlens, VARLEN=1 kernels), training: (name, dtype, K = V, gated, lengths, in the test)
DELTA_VARLEN_CONFIGS = [
    ("gated_delta_rule", torch.bfloat16, 128, True, (50, 13, 65), True),
]


# the diagonal-plus-low-rank parallel pass (psmc.runtime.triton_dplr, inference): (dtype, K = V, decay)
DPLR_CONFIGS = [(torch.bfloat16, 128, "key"), (torch.float32, 128, "key"), (torch.float32, 64, None)]


# its training chain (psmc.runtime.triton_dplr.chain, under autograd): (dtype, K = V, decay, in the test)
DPLR_TRAIN_CONFIGS = [(torch.bfloat16, 128, "key", True), (torch.float32, 128, "key", True),
                      (torch.float32, 64, None, True)]


# the decode tokens' kernels (psmc.runtime.triton_delta_step, triton_dplr_step): (dtype, K = V)
DELTA_STEP_CONFIGS = [(torch.bfloat16, 128), (torch.float32, 128), (torch.float32, 256)]


class _Recorder:
    def __init__(self, kernel, log, tag):
        self.kernel, self.log, self.tag = kernel, log, tag

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.tag, self.kernel, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def recording(module, names, log):
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], log, n))
        yield
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def record(test_only: bool = False) -> list:
    """Every launch of the configurations, each configuration the autotuner may pick a row of
    its own (psmc.runtime.autotune)."""
    with autotune.every_candidate():
        return _record(test_only)


def _record(test_only: bool) -> list:
    from psmc.runtime import triton_chunk as tc

    log: list = []
    B, T, H = 1, 128, 2
    with recording(tc, ["_state_kernel", "_out_kernel", "_readout_kernel"], log):
        packed = torch.tensor([0, 40, 41, T], dtype=torch.int32)
        runs = [(c, None) for c in CONFIGS] + [(c, packed) for c in VARLEN_CONFIGS]
        for (name, dtype, width, decay, exclusive, backward, in_test), cu in runs:
            if test_only and not in_test:
                continue
            start = len(log)
            q = torch.zeros(B, T, H, width, dtype=dtype, requires_grad=backward)
            k, v = torch.zeros_like(q, requires_grad=backward), torch.zeros_like(q, requires_grad=backward)
            g = None if decay == "none" else torch.zeros(B, T, H, *((width,) if decay == "key" else ()))
            s0 = torch.zeros(B if cu is None else len(cu) - 1, H, width, width)
            o, s = tc.triton_chunk_linear_attention(q, k, v, g, decay=decay, initial_state=s0, exclusive=exclusive,
                                                    cu_seqlens=cu)
            middle = len(log)
            if backward:
                (o.float().sum() + s.sum()).backward()
            label = f"{name} {str(dtype)[6:]} K=V={width}{'' if cu is None else ' packed'}"
            for i in range(start, len(log)):
                log[i] = (label, "forward" if i < middle else "backward") + log[i]
    try:
        from psmc.runtime import triton_delta as td
    except ImportError:
        return log
    with recording(td, td.KERNELS, log), recording(tc, ["_out_kernel"], log):
        for name, dtype, width, gated, in_test, beta_dtype in DELTA_CONFIGS:
            if test_only and not in_test:
                continue
            # inference (no gradients), then training (the forward also keeps (I + A)^-1)
            for grad in (False, True) if td.HAS_BACKWARD else (False,):
                start = len(log)
                q = torch.zeros(B, T, H, width, dtype=dtype, requires_grad=grad)
                k, v = torch.zeros_like(q, requires_grad=grad), torch.zeros_like(q, requires_grad=grad)
                beta = torch.zeros(B, T, H, dtype=beta_dtype or dtype, requires_grad=grad)
                g = torch.zeros(B, T, H, requires_grad=grad) if gated else None
                s0 = torch.zeros(B, H, width, width, requires_grad=grad)
                o, s = td.triton_chunk_delta_rule(q, k, v, beta, g, initial_state=s0)
                middle = len(log)
                if grad:  # contiguous output gradients, as a loss usually gives
                    torch.autograd.backward([o, s], [torch.ones_like(o), torch.ones_like(s)])
                for i in range(start, len(log)):
                    phase = "backward" if i >= middle else ("training forward" if grad else "forward")
                    beta_note = "" if beta_dtype is None else f" beta {str(beta_dtype)[6:]}"
                    log[i] = (f"{name} {str(dtype)[6:]} K=V={width}{beta_note}", phase) + log[i]
    with recording(td, td.KERNELS, log), recording(tc, ["_out_kernel"], log):
        for name, dtype, width, gated, lengths, in_test in DELTA_VARLEN_CONFIGS:
            if (test_only and not in_test) or not td.HAS_BACKWARD:
                continue
            start, total = len(log), sum(lengths)
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            q = torch.zeros(1, total, H, width, dtype=dtype, requires_grad=True)
            k, v = torch.zeros_like(q, requires_grad=True), torch.zeros_like(q, requires_grad=True)
            beta = torch.zeros(1, total, H, dtype=dtype, requires_grad=True)
            g = torch.zeros(1, total, H, requires_grad=True) if gated else None
            s0 = torch.zeros(len(lengths), H, width, width, requires_grad=True)
            o, s = td.triton_chunk_delta_rule(q, k, v, beta, g, initial_state=s0, cu_seqlens=cu)
            middle = len(log)
            torch.autograd.backward([o, s], [torch.ones_like(o), torch.ones_like(s)])
            for i in range(start, len(log)):
                phase = "backward" if i >= middle else "training forward"
                log[i] = (f"{name} {str(dtype)[6:]} K=V={width} varlen {len(lengths)} seqs", phase) + log[i]
    from psmc.runtime import triton_dplr as tdp
    with recording(tdp, tdp.KERNELS, log):
        for dtype, width, decay in DPLR_CONFIGS:  # RWKV-7 / KDA prefill: no gradients
            start = len(log)
            q = torch.zeros(B, T, H, width, dtype=dtype)
            g = None if decay is None else q
            tdp.triton_chunk_dplr(q, q, q, q, q, g, scale=1.0, initial_state=torch.zeros(B, H, width, width),
                                  batch=B, steps=T, lanes=(H,))
            for i in range(start, len(log)):
                log[i] = (f"dplr {str(dtype)[6:]} K=V={width}{'' if decay else ' no decay'}", "forward") + log[i]
    from psmc.runtime import chunkwise, dplr
    with recording(tdp, tdp.KERNELS, log):
        backend, chunkwise.BACKEND = chunkwise.BACKEND, "triton"  # CPU tensors: the kernels' route
        try:
            for dtype, width, decay, in_test in DPLR_TRAIN_CONFIGS:
                if test_only and not in_test:
                    continue
                start = len(log)
                q = torch.zeros(B, T, H, width, dtype=dtype, requires_grad=True)
                g = None if decay is None else torch.zeros(B, T, H, width, requires_grad=True)
                o, s = dplr.chunk_dplr(q, q, q, q, q, g, initial_state=torch.zeros(B, H, width, width))
                middle = len(log)
                torch.autograd.backward([o, s], [torch.ones_like(o), torch.ones_like(s)])
                for i in range(start, len(log)):
                    label = f"dplr {str(dtype)[6:]} K=V={width}{'' if decay else ' no decay'} training"
                    log[i] = (label, "training forward" if i < middle else "backward") + log[i]
            # packed sequences in one call (VARLEN=1): inference, then training
            packed = torch.tensor([0, 40, 41, T], dtype=torch.int32)
            for grad in (False, True):
                start = len(log)
                q = torch.zeros(1, T, H, 128, dtype=torch.bfloat16, requires_grad=grad)
                g = torch.zeros(1, T, H, 128, requires_grad=grad)
                o, s = dplr.chunk_dplr(q, q, q, q, q, g, initial_state=torch.zeros(3, H, 128, 128), cu_seqlens=packed)
                middle = len(log)
                if grad:
                    torch.autograd.backward([o, s], [torch.ones_like(o), torch.ones_like(s)])
                for i in range(start, len(log)):
                    phase = ("training forward" if grad else "forward") if i < middle else "backward"
                    log[i] = ("dplr bfloat16 K=V=128 packed" + (" training" if grad else ""), phase) + log[i]
        finally:
            chunkwise.BACKEND = backend
    from psmc.runtime import triton_delta_step as ts
    with recording(ts, ["_delta_step_kernel"], log):
        for dtype, width in DELTA_STEP_CONFIGS:  # a decode token: B = 1, H heads, state given
            start = len(log)
            q = torch.zeros(1, H, width, dtype=dtype)
            state = torch.zeros(1, H, width, width)
            ts.triton_delta_step(state, q, q, q, torch.zeros(1, H, dtype=dtype), torch.zeros(1, H), scale=1.0)
            for i in range(start, len(log)):
                log[i] = (f"gated_delta_rule step {str(dtype)[6:]} K=V={width}", "step") + log[i]
            # a product of two delta steps per token (gated_delta_product): STEPS = 2
            start = len(log)
            two = torch.zeros(1, H, 2, width, dtype=dtype)
            ts.triton_delta_step(state, q, two, two, torch.zeros(1, H, 2, dtype=dtype), torch.zeros(1, H), scale=1.0,
                                 steps=2)
            for i in range(start, len(log)):
                log[i] = (f"gated_delta_product step {str(dtype)[6:]} K=V={width}", "step") + log[i]
    from psmc.runtime import triton_dplr_step as tp
    with recording(tp, ["_dplr_step_kernel"], log):
        for dtype, width in DELTA_STEP_CONFIGS:  # RWKV-7's decode token: per-key decay, state given
            start = len(log)
            q = torch.zeros(1, H, width, dtype=dtype)
            state = torch.zeros(1, H, width, width)
            tp.triton_dplr_step(state, q, q, q, q, q, q, scale=1.0)
            for i in range(start, len(log)):
                log[i] = (f"rwkv7 step {str(dtype)[6:]} K=V={width}", "step") + log[i]
    return log


def compile_one(kernel, args, kwargs, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, specialization, options)
    out = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - a compile error is a result
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000]}
    text = out.getvalue()

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else -1

    return {"ok": True, "registers": grab(r"Used (\d+) registers"), "spills": grab(r"(\d+) bytes spill stores"),
            "shared": int(compiled.metadata.shared), "num_warps": int(compiled.metadata.num_warps)}


# the launches a forked compile process reads by index (set before the pool forks)
_LAUNCHES: list = []


def _compile_launch(index: int) -> dict:
    kernel, args, kwargs, arch = _LAUNCHES[index]
    return compile_one(kernel, args, kwargs, arch)


def main(arch: int = 90, test_only: bool = False) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    seen, rows = set(), []
    only = os.environ.get("PSMC_AOT_ONLY", "")
    for config, phase, tag, kernel, grid, args, kwargs in record(test_only):
        if only not in config:
            continue
        key = (tag, tuple(sorted((k, v) for k, v in kwargs.items())),
               tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
        if key in seen:
            continue
        seen.add(key)
        rows.append((config, phase, tag, grid, kwargs))
        _LAUNCHES.append((kernel, args, kwargs, arch))
    jobs = min(int(os.environ.get("PSMC_AOT_JOBS", os.cpu_count() or 1)), len(rows))
    if jobs > 1:  # fork: the children inherit the recorded launches (kernels, CPU tensors)
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_launch, range(len(rows))))
    else:
        results = [_compile_launch(i) for i in range(len(rows))]
    for (config, phase, tag, grid, kwargs), result in zip(rows, results):
        consts = {k: v for k, v in kwargs.items() if k != "num_warps"}
        print(json.dumps({"config": config, "pass": phase, "kernel": tag, "arch": arch, "constexprs": consts,
                          "num_warps": kwargs.get("num_warps"), "grid": list(grid), **result}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--test"]
    sys.exit(main(int(args[0]) if args else 90, "--test" in sys.argv))
