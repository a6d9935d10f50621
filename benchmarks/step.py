"""GLA decode step and torch.compile speed-ups (issue 13): `python -m benchmarks.step`.

Rows, all in one process on one machine, median of --repeat timed runs of --tokens tokens:
- psmc GLA `step` (B=1, H=4, K=V=64), eager, against the same update written by hand in eager
  torch (S = exp(gk) * S + k v^T, o = q S / sqrt(K)): target <= 1.5x;
- both under torch.compile (fullgraph, inductor): target psmc compiled <= 1.0x the eager hand step;
- the GLA parallel pass (B=1, T=1024) eager vs torch.compile'd, and the first-order recurrence.
The hand-written step keeps only S; psmc's GLA also carries the cumulative decay `a` (a field
the readout never reads) until dead-field elimination lands.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import psmc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
B, H, K, V = 1, 4, 64, 64


def hand_step(S, k, v, gk, q):
    S = torch.exp(gk).unsqueeze(-1) * S + k.unsqueeze(-1) * v.unsqueeze(-2)
    return (q.unsqueeze(-2) @ S).squeeze(-2) / K ** 0.5, S


def per_token_ms(fn, tokens: int, repeat: int) -> float:
    fn(3)  # warm up (and compile)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(tokens)
        times.append((time.perf_counter() - start) / tokens * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="eager rows only (compiling takes minutes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = psmc.load(EXAMPLES / "gla.psm").gla(K=K, V=V)
    n = args.tokens + 3
    ks, vs, qs = (torch.randn(n, B, H, K) for _ in range(3))
    gks = torch.nn.functional.logsigmoid(torch.randn(n, B, H, K))
    _, state0 = layer(k=ks[:1].transpose(0, 1), v=vs[:1].transpose(0, 1), gk=gks[:1].transpose(0, 1),
                      q=qs[:1].transpose(0, 1), return_state=True)

    def run_psmc(step):
        def go(count):
            state = state0
            with torch.no_grad():
                for t in range(count):
                    _, state = step(state, k=ks[t], v=vs[t], gk=gks[t], q=qs[t])
        return go

    def run_hand(step):
        def go(count):
            S = state0.prefix[1]
            with torch.no_grad():
                for t in range(count):
                    _, S = step(S, ks[t], vs[t], gks[t], qs[t])
        return go

    rows = []
    hand = per_token_ms(run_hand(hand_step), args.tokens, args.repeat)
    rows.append(("hand-written eager torch step", hand))
    rows.append(("psmc gla step, eager", per_token_ms(run_psmc(layer.step), args.tokens, args.repeat)))
    if not args.no_compile:
        rows.append(("hand-written step, torch.compile", per_token_ms(run_hand(torch.compile(hand_step, fullgraph=True)),
                                                                       args.tokens, args.repeat)))
        rows.append(("psmc gla step, torch.compile(fullgraph)",
                     per_token_ms(run_psmc(torch.compile(layer.step, fullgraph=True)), args.tokens, args.repeat)))
    print(f"GLA decode step, B={B}, H={H}, K=V={K}, {args.threads} thread(s), median of {args.repeat} x {args.tokens} tokens")
    print("| row | ms / token | vs hand-written eager |")
    print("|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.4f} | {ms / hand:.2f}x |")

    if not args.no_compile:
        T = 1024
        x = {n_: torch.randn(1, T, H, K) for n_ in ("k", "v", "q")}
        x["gk"] = torch.nn.functional.logsigmoid(torch.randn(1, T, H, K))
        lr = psmc.load(EXAMPLES / "linear_recurrence.psm").linear_recurrence()
        y = {"log_a": -torch.rand(4, T, 256), "x": torch.randn(4, T, 256)}
        print(f"\nParallel pass, eager vs torch.compile(fullgraph) (ms per call, median of {args.repeat})")
        print("| layer | eager | compiled | speed-up |")
        print("|---|---:|---:|---:|")
        for name, mod, inp in (("gla B=1 T=1024 H=4 K=V=64", layer, x), ("linear_recurrence B=4 T=1024 D=256", lr, y)):
            compiled = torch.compile(mod, fullgraph=True)
            with torch.no_grad():
                eager_ms = per_token_ms(lambda c: [mod(**inp) for _ in range(c)], 1, args.repeat)
                comp_ms = per_token_ms(lambda c: [compiled(**inp) for _ in range(c)], 1, args.repeat)
            print(f"| {name} | {eager_ms:.2f} | {comp_ms:.2f} | {eager_ms / comp_ms:.2f}x |")


if __name__ == "__main__":
    main()
