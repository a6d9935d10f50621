"""Host time of the Triton decode step, measured on a CPU: `python -m benchmarks.triton_step_host`.

At batch 1 a decode token's GPU work is a few microseconds, so what the host spends per token
decides the rate. This runs `layer.step` with backend='triton' on CPU tensors with every Triton
launch recorded instead of run (psmc.triton_aot.recording_launches: the launch call returns at
once), so the rows are the host's time per token without the kernel or Triton's own launcher:

- the launch call alone (`kernel[grid](**args, num_warps=...)` with the step's arguments): the
  floor any caller of the kernel pays here;
- psmc `step` on the decode lane (psmc.runtime.triton_lane.bind_step, the default);
- psmc `step` through the general per-token step (the lane switched off), as before the lane.

Rows are timed interleaved (--rounds rounds of --tokens tokens each) and the median is shown, so
a load change on a shared machine hits all rows alike. Ops: gla (B=1, H=16, K=V=128, fla's
decode shape) and the selective SSM (B=1, D=2048 channels, N=16).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import psmc
from psmc.runtime import dispatch
from psmc.triton_aot import recording_launches

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _case(name: str):
    cls = psmc.load(EXAMPLES / f"{name}.psm").__psmc_layers__[name]
    g = torch.Generator().manual_seed(0)
    if name == "gla":
        H, K, V = 16, 128, 128
        layer = cls(backend="triton", check_finite=False, K=K, V=V)
        x = {"k": torch.randn(1, 2, H, K, generator=g), "v": torch.randn(1, 2, H, V, generator=g),
             "gk": -torch.rand(1, 2, H, K, generator=g), "q": torch.randn(1, 2, H, K, generator=g)}
        return layer, x, "gla B=1 H=16 K=V=128"
    D, N = 2048, 16
    layer = cls(backend="triton", check_finite=False, N=N)
    x = {"u": torch.randn(1, 2, D, generator=g), "delta": torch.rand(1, 2, D, generator=g),
         "A": -torch.rand(1, 1, D, N, generator=g), "B": torch.randn(1, 2, 1, N, generator=g),
         "C": torch.randn(1, 2, 1, N, generator=g)}
    return layer, x, "selective_ssm B=1 D=2048 N=16"


def _stream(layer, x: dict, tokens: int):
    """A function that steps `tokens` tokens from the state of a 2-token pass (made once)."""
    token = {n: v[:, 0] for n, v in x.items()}
    _, start = layer(**x, return_state=True)

    def run():
        state = start
        for _ in range(tokens):
            _, state = layer.step(state, **token)
    return run


def _launch_only(layer, x: dict, tokens: int, log: list):
    """The step kernel's recorded launch, replayed with its own arguments `tokens` times."""
    token = {n: v[:, 0] for n, v in x.items()}
    _, state = layer(**x, return_state=True)
    start = len(log)
    layer.step(state, **token)
    kernel, grid, args, kwargs = log[start]

    def run():
        for _ in range(tokens):
            kernel[grid](*args, **kwargs)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, one thread; microseconds per token (median of {args.rounds} rounds of "
          f"{args.tokens} tokens); Triton launches recorded, not run\n")
    print("| op | launch call alone | psmc step, decode lane | psmc step, general | general / lane |")
    print("|---|---|---|---|---|")
    torch.set_num_threads(1)
    bind = dispatch._step_kernels.bind
    for name in ("gla", "selective_ssm"):
        with recording_launches() as log, torch.no_grad():
            layer, x, label = _case(name)
            rows = {"launch": _launch_only(layer, x, args.tokens, log), "lane": _stream(layer, x, args.tokens),
                    "general": _stream(layer, x, args.tokens)}
            times: dict = {k: [] for k in rows}
            for _ in range(args.rounds):
                for key, run in rows.items():
                    if key == "general":
                        dispatch._step_kernels.bind = None  # the lane off: every token the general step
                        layer._step_cache.clear()
                    try:
                        start = time.perf_counter()
                        run()
                        times[key].append((time.perf_counter() - start) / args.tokens * 1e6)
                    finally:
                        dispatch._step_kernels.bind = bind
                        layer._step_cache.clear()
                    log.clear()
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {label} | {med['launch']:.1f} | {med['lane']:.1f} | {med['general']:.1f} | "
              f"{med['general'] / med['lane']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
