"""The fast forms added on 2026-12-04, against what ran before them, on this machine.

    python -m benchmarks.fast_forms [--threads 2]

1. rwkv6 (exclusive readout) and mlstm (C and its normaliser n read by one query) at
   (B, T, H, K, V) = (2, 1024, 4, 64, 64), forward without gradients, backend='torch': the
   chunkwise fast path against the generic scan (`layer.use_fast_path = False`), which holds a
   [K, V] state per token.
2. A DeltaProduct decode token (two delta steps) at B=1, H=4, K=V=64: one fused C++ call
   (`delta_product_step(..., native=True)`) against two one-step C++ calls.
Medians of wall-clock timings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import load  # noqa: E402
from benchmarks.packed import median_ms  # noqa: E402  (medians of wall-clock runs, without autograd)
from psmc.runtime.delta import delta_product_step, delta_rule_step  # noqa: E402


def layer_inputs(name: str, B=2, T=1024, H=4, K=64) -> dict:
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)
    if name == "rwkv6":
        return {"k": 0.1 * rnd(B, T, H, K), "v": rnd(B, T, H, K), "w": 0.5 * rnd(B, T, H, K) - 1,
                "r": 0.1 * rnd(B, T, H, K), "u": 0.1 * rnd(1, 1, H, K)}
    return {"k": 0.1 * rnd(B, T, H, K), "v": rnd(B, T, H, K), "f": torch.nn.functional.logsigmoid(rnd(B, T, H) + 3),
            "i": 0.5 * rnd(B, T, H), "q": rnd(B, T, H, K)}


def layers_table() -> None:
    print("| op | shape | chunkwise ms | generic scan ms | ratio |")
    print("|---|---|---:|---:|---:|")
    for name in ("rwkv6", "mlstm"):
        layer = load(name)(K=64, V=64, backend="torch", check_finite=False)
        x = layer_inputs(name)
        with torch.no_grad():
            fast = median_ms(lambda: layer(**x), 5)
            layer.use_fast_path = False
            slow = median_ms(lambda: layer(**x), 3)
            layer.use_fast_path = True
        print(f"| {name} | B=2 T=1024 H=4 K=V=64 | {fast:.1f} | {slow:.1f} | {fast / slow:.2f}x |")
    print()


def token_table(steps: int = 2, tokens: int = 100) -> None:
    g = torch.Generator().manual_seed(0)
    B, H, K, V = 1, 4, 64, 64
    S, q = torch.randn(B, H, K, V, generator=g), torch.randn(B, H, K, generator=g)
    keys = [torch.nn.functional.normalize(torch.randn(B, H, K, generator=g), dim=-1) for _ in range(steps)]
    values = [torch.randn(B, H, V, generator=g) for _ in range(steps)]
    betas = [torch.rand(B, H, generator=g) for _ in range(steps)]
    gate = -torch.rand(B, H, generator=g)

    def fused():
        for _ in range(tokens):
            delta_product_step(S, q, keys, values, betas, gate, native=True)

    def one_step_calls():
        for _ in range(tokens):
            s = S
            for j in range(steps):
                _, s = delta_rule_step(s, q, keys[j], values[j], betas[j], gate if j == 0 else None, native=True)
    with torch.no_grad():
        one, each = median_ms(fused, 7) * 1e3 / tokens, median_ms(one_step_calls, 7) * 1e3 / tokens
    print("| token | shape | one C++ call us | r one-step calls us | ratio |")
    print("|---|---|---:|---:|---:|")
    print(f"| DeltaProduct, r={steps} | B=1 H=4 K=V=64 | {one:.1f} | {each:.1f} | {one / each:.2f}x |")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers_table()
    token_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
