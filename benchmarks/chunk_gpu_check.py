"""GPU check of the chunked Triton kernels (psmc.runtime.triton_chunk / triton_delta / triton_dplr).

    python benchmarks/chunk_gpu_check.py [--quick] [--skip-timing] [--no-fla]

1. accuracy on the GPU at a ragged benchmark-like shape: psmc's Triton kernels (fp32 and bf16)
   and, when importable, fla's chunk kernels (bf16), against psmc's torch chunkwise path (the
   torch WY form for the delta rules and the DPLR form, RWKV-7's inputs) in float64 on the
   same inputs: forward outputs, final states and every gradient (relative RMS);
2. timing at (B, T, H, K, V) = (8, 4096, 16, 128, 128), bf16: forward and forward+backward of
   psmc's Triton kernels, psmc's torch chunkwise path (cuBLAS) and fla's chunk kernels (CUDA
   events, median of repeats, in the same run); for the DPLR form, training with the chunks
   chained on psmc.runtime.triton_dplr's kernels against the torch loop over chunks.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from psmc.runtime import chunkwise
from psmc.runtime.triton_chunk import triton_chunk_linear_attention
from psmc.runtime.triton_delta import triton_chunk_delta_rule

try:
    from fla.ops.rwkv7 import chunk_rwkv7
except Exception:  # noqa: BLE001
    chunk_rwkv7 = None
try:
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla
    from fla.ops.delta_rule import chunk_delta_rule as fla_delta
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gated_delta
except Exception as e:  # noqa: BLE001
    print(f"fla not importable: {type(e).__name__}: {e}")
    chunk_gla = chunk_simple_gla = fla_delta = fla_gated_delta = None

DEV = "cuda"
SHAPE = None  # (B, T, H, K, V) override for a dry run


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def inputs(B, T, H, K, V, decay, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K) / math.sqrt(K), r(B, T, H, V)
    g = None
    if decay == "key":
        g = torch.nn.functional.logsigmoid(r(B, T, H, K)) / 16  # fla's GLA gate range
    elif decay == "scalar":
        g = torch.nn.functional.logsigmoid(r(B, T, H) + 3)
    h0 = r(B, H, K, V)
    return q, k, v, g, h0


def psmc_run(fn, xs, decay, exclusive, scale):
    q, k, v, g, h0 = xs
    return fn(q, k, v, g, decay=decay, scale=scale, initial_state=h0, exclusive=exclusive)


def grads(fn, xs, dtype, do, ds):
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]
    o, s = fn(leaves)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    return o, s, [None if x is None else x.grad for x in leaves]


def delta_inputs(B, T, H, K, V, gated, seed=0):
    """q, k (L2-normalised), v, beta in (0, 1), log gate (gated) and an initial state, fp32."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, device=DEV)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, device=DEV), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, device=DEV)
    beta = torch.rand(B, T, H, generator=gen, device=DEV)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen, device=DEV) + 3) if gated else None
    return q, k, v, beta, g, torch.randn(B, H, K, V, generator=gen, device=DEV)


def delta_grads(fn, xs, dtype, do, ds):
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]
    o, s = fn(leaves)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    return o, s, [None if x is None else x.grad for x in leaves]


def accuracy(quick: bool) -> bool:
    B, T, H, K, V = SHAPE or ((2, 1000, 4, 128, 128) if not quick else (1, 300, 2, 64, 64))
    ok = True
    print(f"\n## accuracy: B={B} T={T} H={H} K={K} V={V}; relative RMS error against the torch path in float64")
    print("| op | impl | o | final | dq | dk | dv | dlog_decay | dh0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, decay, exclusive in [("gla", "key", False), ("simple_gla", "scalar", False),
                                   ("linear_attention", "none", False), ("rwkv6-like", "key", True)]:
        xs = inputs(B, T, H, K, V, decay)
        scale = K ** -0.5
        ref_fn = lambda ls: chunkwise._chunk_linear_attention_torch(  # noqa: E731
            *ls[:4], decay=decay, scale=scale, initial_state=ls[4], exclusive=exclusive)
        gen = torch.Generator(device=DEV).manual_seed(1)
        do = torch.randn(B, T, H, V, generator=gen, device=DEV, dtype=torch.float64)
        ds = torch.randn(B, H, K, V, generator=gen, device=DEV, dtype=torch.float64)
        ro, rs, rg = grads(ref_fn, xs, torch.float64, do, ds)
        impls = [("psmc triton fp32", torch.float32, 3e-4), ("psmc triton bf16", torch.bfloat16, 5e-2)]
        for label, dtype, tol in impls:
            def fn(ls, dtype=dtype):
                q, k, v, g, h0 = ls
                return triton_chunk_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), g, decay=decay,
                                                     scale=scale, initial_state=h0, exclusive=exclusive)
            o, s, gs = grads(fn, xs, torch.float32, do, ds)
            errs = [rel(o, ro), rel(s, rs)] + [float("nan") if a is None else rel(a, b) for a, b in zip(gs, rg)]
            bad = not all(e <= tol for e in errs if e == e) or any(e != e for e, a in zip(errs[2:], gs) if a is not None)
            ok &= not bad
            print(f"| {name} | {label} | " + " | ".join("-" if e != e else f"{e:.1e}" for e in errs)
                  + (" | **FAIL**" if bad else " |"))
        if chunk_gla is not None and decay in ("key", "scalar") and not exclusive:
            def fla_fn(ls):
                q, k, v, g, h0 = ls
                f = chunk_gla if decay == "key" else chunk_simple_gla
                return f(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), g, scale=scale,
                         initial_state=h0, output_final_state=True)
            try:
                o, s, gs = grads(fla_fn, xs, torch.float32, do, ds)
                errs = [rel(o, ro), rel(s, rs)] + [float("nan") if a is None else rel(a, b) for a, b in zip(gs, rg)]
                print(f"| {name} | fla bf16 | " + " | ".join("-" if e != e else f"{e:.1e}" for e in errs) + " |")
            except Exception as e:  # noqa: BLE001
                print(f"| {name} | fla bf16 | error: {type(e).__name__}: {str(e)[:200]} |")
    # the delta rule, forward and every gradient, against the torch WY form in float64
    print("\n| op | impl | o | final | dq | dk | dv | dbeta | dlog_decay | dh0 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    from psmc.runtime.delta import _chunk_delta_rule_torch
    for gated in (False, True):
        xs = delta_inputs(B, T, H, K, V, gated, seed=2)
        gen = torch.Generator(device=DEV).manual_seed(1)
        do = torch.randn(B, T, H, V, generator=gen, device=DEV, dtype=torch.float64)
        ds = torch.randn(B, H, K, V, generator=gen, device=DEV, dtype=torch.float64)
        ro, rs, rg = delta_grads(lambda ls: _chunk_delta_rule_torch(*ls[:5], K ** -0.5, ls[5], 64), xs,
                                 torch.float64, do, ds)
        for label, dtype, tol in [("fp32", torch.float32, 3e-4), ("bf16", torch.bfloat16, 5e-2)]:
            def fn(ls, dtype=dtype):
                q, k, v, beta, g, h0 = ls
                return triton_chunk_delta_rule(q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), g,
                                               scale=K ** -0.5, initial_state=h0)
            o, s, gs = delta_grads(fn, xs, torch.float32, do, ds)
            errs = [rel(o, ro), rel(s, rs)] + [float("nan") if a is None else rel(a, b) for a, b in zip(gs, rg)]
            bad = (not all(e <= tol for e in errs if e == e)
                   or any(e != e for e, a in zip(errs[2:], gs) if a is not None))
            ok &= not bad
            print(f"| {'gated_' if gated else ''}delta_rule | psmc triton {label} | "
                  + " | ".join("-" if e != e else f"{e:.1e}" for e in errs) + (" | **FAIL**" if bad else " |"))
    return ok & dplr_accuracy(B, T, H, K, V)


def dplr_inputs(B, T, H, K, V, seed=4):
    """RWKV-7's inputs (as benchmarks/gpu.py draws them) and an initial state, fp32: r, k, v,
    a = -kappa, b = kappa * iclr, log decays -e^-0.5 sigmoid(.)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    kappa = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)
    iclr = torch.sigmoid(r(B, T, H, K))
    w = -math.exp(-0.5) * torch.sigmoid(r(B, T, H, K))
    return r(B, T, H, K) / math.sqrt(K), r(B, T, H, K) / math.sqrt(K), r(B, T, H, V), -kappa, kappa * iclr, w, \
        r(B, H, K, V)


def dplr_run(ls, dtype=None, backend="auto"):
    """chunk_dplr on the leaves (r, k, v, a, b, w, h0), the vectors cast to dtype, under
    chunkwise.BACKEND = backend ('auto': the chain kernels for CUDA tensors under autograd)."""
    from psmc.runtime.dplr import chunk_dplr
    r, k, v, a, b, w, h0 = ls
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    saved, chunkwise.BACKEND = chunkwise.BACKEND, backend
    try:
        return chunk_dplr(cast(r), cast(k), cast(v), cast(a), cast(b), w, initial_state=h0)
    finally:
        chunkwise.BACKEND = saved


def dplr_accuracy(B, T, H, K, V) -> bool:
    """RWKV-7's DPLR form trained with the chunks chained on the Triton kernels (fp32 inputs: tf32x3
    dots; bf16: bf16 operands) against the torch form in float64."""
    print("\n| op | impl | o | final | dr | dk | dv | da | db | dlog_decay | dh0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    xs = dplr_inputs(B, T, H, K, V)
    gen = torch.Generator(device=DEV).manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, device=DEV, dtype=torch.float64)
    ds = torch.randn(B, H, K, V, generator=gen, device=DEV, dtype=torch.float64)
    ro, rs, rg = grads(lambda ls: dplr_run(ls, backend="torch"), xs, torch.float64, do, ds)
    ok = True
    for label, dtype, tol in [("fp32", None, 3e-4), ("bf16", torch.bfloat16, 5e-2)]:
        o, s, gs = grads(lambda ls, dtype=dtype: dplr_run(ls, dtype), xs, torch.float32, do, ds)
        errs = [rel(o, ro), rel(s, rs)] + [rel(a, b) for a, b in zip(gs, rg)]
        bad = not all(e <= tol for e in errs)
        ok &= not bad
        print(f"| rwkv7 (dplr) | psmc triton chain {label} | " + " | ".join(f"{e:.1e}" for e in errs)
              + (" | **FAIL**" if bad else " |"))
    return ok


def bench(fn, reps=10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def timing(quick: bool) -> None:
    B, T, H, K, V = (8, 4096, 16, 128, 128) if not quick else (2, 1024, 4, 128, 128)
    dt = torch.bfloat16
    print(f"\n## timing: B={B} T={T} H={H} K={K} V={V} bf16, ms (median of 10, CUDA events)")
    print("| op | impl | forward | forward+backward |")
    print("|---|---|---|---|")
    for name, decay in [("gla", "key"), ("simple_gla", "scalar")]:
        q, k, v, g, h0 = inputs(B, T, H, K, V, decay)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        leaves = [x.detach().requires_grad_() for x in (q, k, v, g)]
        do = torch.randn(B, T, H, V, device=DEV, dtype=dt)
        impls = {
            "psmc triton": lambda q, k, v, g: triton_chunk_linear_attention(q, k, v, g, decay=decay, scale=K ** -0.5),
            "psmc torch path": lambda q, k, v, g: chunkwise._chunk_linear_attention_torch(
                q, k, v, g, decay=decay, scale=K ** -0.5),
        }
        if chunk_gla is not None:
            f = chunk_gla if decay == "key" else chunk_simple_gla
            impls["fla chunk"] = lambda q, k, v, g, f=f: f(q, k, v, g, scale=K ** -0.5, output_final_state=True)
        _time_rows(name, impls, bench, (q, k, v, g), leaves, do)
    from psmc.runtime.delta import _chunk_delta_rule_torch
    for gated in (False, True):
        q, k, v, beta, g, _ = delta_inputs(B, T, H, K, V, gated, seed=3)
        q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
        leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, beta, g)]
        do = torch.randn(B, T, H, V, device=DEV, dtype=dt)
        impls = {
            "psmc triton": lambda q, k, v, beta, g: triton_chunk_delta_rule(q, k, v, beta, g, scale=K ** -0.5),
            "psmc torch path": lambda q, k, v, beta, g: _chunk_delta_rule_torch(q, k, v, beta, g, K ** -0.5, None, 64),
        }
        f = fla_gated_delta if gated else fla_delta
        if f is not None:
            if gated:
                impls["fla chunk"] = lambda q, k, v, beta, g: f(q, k, v, g, beta, scale=K ** -0.5,
                                                               output_final_state=True)
            else:
                impls["fla chunk"] = lambda q, k, v, beta, g: f(q, k, v, beta, scale=K ** -0.5,
                                                               output_final_state=True)
        name = "gated_delta_rule" if gated else "delta_rule"
        _time_rows(name, impls, bench, (q, k, v, beta, g), leaves, do)
    # the DPLR form (RWKV-7's inputs): training chains the chunks on two kernels or loops in torch
    xs = [x.to(dt) for x in dplr_inputs(B, T, H, K, V)[:6]]
    leaves = [x.detach().requires_grad_() for x in xs]
    do = torch.randn(B, T, H, V, device=DEV, dtype=dt)
    impls = {"psmc triton": lambda *x: dplr_run([*x, None]),  # (forward: the inference kernels)
             "psmc torch loop": lambda *x: dplr_run([*x, None], backend="torch")}
    if chunk_rwkv7 is not None:
        impls["fla chunk"] = lambda r, k, v, a, b, w: chunk_rwkv7(r, w, k, v, a, b, scale=1.0, output_final_state=True)
    _time_rows("rwkv7 (dplr)", impls, bench, tuple(xs), leaves, do)


def _time_rows(name: str, impls: dict, bench, inputs: tuple, leaves: list, do) -> None:
    """One table row per implementation: forward (no grad) and forward+backward ms, or the error."""
    for label, f in impls.items():
        try:
            with torch.no_grad():
                fwd = bench(lambda: f(*inputs))

            def fb():
                o, _ = f(*leaves)
                o.backward(do)
            both = bench(fb)
            print(f"| {name} | {label} | {fwd:.3f} | {both:.3f} |", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"| {name} | {label} | error: {type(e).__name__}: {str(e)[:300]} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--no-fla", action="store_true",
                        help="leave fla out (its autotuning took minutes on the H200 at these shapes)")
    args = parser.parse_args()
    if args.no_fla:
        global chunk_gla, chunk_simple_gla, fla_delta, fla_gated_delta, chunk_rwkv7
        chunk_gla = chunk_simple_gla = fla_delta = fla_gated_delta = chunk_rwkv7 = None
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    import triton
    print("triton", triton.__version__)
    start = time.time()
    ok = accuracy(args.quick)
    print(f"(accuracy: {time.time() - start:.0f} s)", flush=True)
    if not args.skip_timing:
        timing(args.quick)
    print(f"(total: {time.time() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
