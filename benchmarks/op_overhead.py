"""Host cost of a torch custom op per eager call: `python -m benchmarks.op_overhead`.

psmc's kernels are torch custom ops inside torch.compile graphs but are launched directly in
eager code, with gradients in autograd.Functions (psmc/runtime/custom_ops.py). This measures
why, on this machine: one call of the same trivial body (two elementwise ops on a 4-element
tensor, a stand-in for a launch group) as
- the bare function;
- an autograd.Function around it (psmc's eager path with gradients);
- a custom op with its gradient registered (`register_autograd`), called with gradients on;
- the same custom op called under no_grad (a compiled graph's node, run eagerly).
Rows are timed interleaved (--rounds rounds of --calls calls each) and the median microseconds
per call are printed, so a load change on a shared machine hits all rows alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor


def body(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return x * scale, x + scale


op = torch.library.custom_op("psmc_bench::body", body, mutates_args=())
op.register_fake(lambda x, scale: (torch.empty_like(x), torch.empty_like(x)))


def _setup(ctx, inputs, output):
    ctx.scale = inputs[1]


def _vjp(ctx, d_scaled, d_shifted):
    return d_scaled * ctx.scale + d_shifted, None


op.register_autograd(_vjp, setup_context=_setup)


class Body(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return body(x, scale)

    @staticmethod
    def backward(ctx, d_scaled, d_shifted):
        return d_scaled * ctx.scale + d_shifted, None


def _no_grad_op(x, scale):
    with torch.no_grad():
        return op(x, scale)


ROWS = {"bare function": body, "autograd.Function": Body.apply, "custom op, register_autograd": op,
        "custom op, no_grad": _no_grad_op}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(4, requires_grad=True)
    times = {name: [] for name in ROWS}
    for name, fn in ROWS.items():  # warm up
        for _ in range(200):
            fn(x, 0.5)
    for _ in range(args.rounds):
        for name, fn in ROWS.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                fn(x, 0.5)
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, one thread, median of {args.rounds} rounds of {args.calls} calls")
    for name, us in medians.items():
        print(f"  {name:32s} {us:7.1f} us/call")
    return medians


if __name__ == "__main__":
    main()
