"""Case `streaming`: per-token `step` latency and state bytes after n tokens, n = 2^8 .. 2^15.

psmc layers (public API only: streaming is what the generated `step` does): transformer_psm
(C=8, D=64, H=4; a tree scan: the paper's binary counter) and gla (K=V=64, 4 heads; an exact
scan: O(1) state). Peers: one causal softmax-attention layer with a KV cache, of the same
width as each psmc layer (D=64 as transformer_psm, 4 x 64 as gla). Each state is first
brought to n tokens (psmc: the parallel pass with return_state=True; attention: a prefilled
cache), then a window of tokens is stepped and timed; latency = window time / window tokens.
transformer_psm's bytes are also taken after n - C tokens: n / C chunks is a power of two (one
counter root), n / C - 1 sets every bit (the most roots), which the bound must cover.
"""
from __future__ import annotations

import math

import torch

from . import peers
from .cases import Settings
from .report import CaseResult, Row, Verdict
from .timing import measure

BATCH = 1
CHUNK, WIDTH, HEADS = 8, 64, 4  # transformer_psm
GLA_HEADS, GLA_K, GLA_V = 4, 64, 64
WINDOW = 64  # tokens stepped per timing: 8 whole chunks of transformer_psm


class KVCacheAttention:
    """One causal softmax-attention layer, streaming with a preallocated KV cache."""

    def __init__(self, width: int, heads: int, capacity: int):
        self.width, self.heads, self.capacity = width, heads, capacity
        gen = torch.Generator().manual_seed(0)
        self.qkv = torch.randn(width, 3 * width, generator=gen) / math.sqrt(width)
        self.out = torch.randn(width, width, generator=gen) / math.sqrt(width)
        self.keys = torch.zeros(BATCH, heads, capacity, width // heads)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def prefill(self, n: int) -> None:
        """The cache of a stream that has seen n tokens (random keys and values)."""
        self.keys[:, :, :n].normal_()
        self.values[:, :, :n].normal_()
        self.length = n

    def step(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ self.qkv).view(BATCH, 3, self.heads, 1, -1).unbind(1)
        self.keys[:, :, self.length] = k[:, :, 0]
        self.values[:, :, self.length] = v[:, :, 0]
        self.length += 1
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), dim=-1)
        return (weights @ values).reshape(BATCH, self.width) @ self.out

    @property
    def nbytes(self) -> int:
        """Bytes a cache of the current length holds (keys and values)."""
        return 2 * self.keys[:, :, : self.length].numel() * self.keys.element_size()


def _attention_rows(settings, sizes, width, heads, label):
    rows = []
    layer = KVCacheAttention(width, heads, max(sizes) + WINDOW + 1)
    tokens = torch.randn(WINDOW, BATCH, width)
    for n in sizes:
        layer.prefill(n)

        def window():
            layer.length = n  # every timed window starts from the same n tokens
            for token in tokens:
                layer.step(token)

        timing = measure(window, settings.repeat, settings.warmup, settings.budget_s)
        layer.length = n
        rows.append(_row(n, f"softmax attention + KV cache ({label})", "hand-written reference layer", timing,
                         False, f"state {layer.nbytes} B"))
    return rows


def _row(n, impl, path, timing, is_psmc, detail) -> Row:
    per_token = None if timing is None else type(timing)(timing.median_ms / WINDOW, timing.min_ms / WINDOW, timing.runs)
    return Row("streaming", f"step ms/token at n=2^{int(math.log2(n))}", impl, path, per_token, is_psmc, detail)


def _count_agg_calls(layer) -> list[int] | None:
    """Wrap the layer's Agg so that calls are counted (None if the layer has no such hook)."""
    original = getattr(layer, "_combine_fn", None)
    if original is None:
        return None
    counter = [0]

    def counting(call):
        agg = original(call)

        def counted(left, right):
            counter[0] += 1
            return agg(left, right)

        return counted

    layer._combine_fn = counting
    return counter


def _psmc_rows(settings, sizes, name, layer, make_inputs, tree: bool):
    """Stream a psmc layer; returns (rows, verdict details)."""
    rows, facts = [], {}
    counter = _count_agg_calls(layer) if tree else None
    for n in sizes:
        with torch.no_grad():
            _, start = layer(**make_inputs(n), return_state=True)
            window_inputs = [make_inputs(1) for _ in range(WINDOW)]
            token_inputs = [{key: value[:, 0] for key, value in inputs.items()} for inputs in window_inputs]

            def window():
                state = start
                for token in token_inputs:
                    out, state = layer.step(state, **token)
                return state

            if counter is not None:
                counter[0] = 0
            timing = measure(window, settings.repeat, settings.warmup, settings.budget_s)
            windows = timing.runs + settings.warmup
            calls = None if counter is None else counter[0] / (windows * WINDOW / CHUNK)
            nbytes = start.nbytes
            if tree:  # n / C chunks is a power of two: one root; n - C chunks sets every bit
                _, fullest = layer(**make_inputs(n - CHUNK), return_state=True)
                nbytes = max(nbytes, fullest.nbytes)
        detail = f"state {start.nbytes} B" + (f", {nbytes} B at n - C" if tree else "")
        if calls is not None:
            detail += f"; Agg calls/chunk {calls:.2f}"
        facts[n] = (timing, nbytes, calls)
        rows.append(_row(n, f"psmc {name}", f"api: psmc.load('examples/{name}.psm').{name}.step", timing, True, detail))
    return rows, facts


def _transformer_inputs(n: int) -> dict:
    return {"x": torch.randn(BATCH, n, WIDTH)}


def _gla_inputs(n: int) -> dict:
    make = lambda width: torch.randn(BATCH, n, GLA_HEADS, width)  # noqa: E731
    return {"k": make(GLA_K), "v": make(GLA_V), "gk": torch.nn.functional.logsigmoid(make(GLA_K)), "q": make(GLA_K)}


def _tree_verdicts(facts) -> tuple[Verdict, ...]:
    sizes = sorted(facts)
    low, high = facts[sizes[0]][0], facts[sizes[-1]][0]
    growth = high.median_ms / low.median_ms
    element = CHUNK * WIDTH * 4
    worst = max(nbytes / ((math.ceil(math.log2(n / CHUNK + 1)) + 2) * element) for n, (_, nbytes, _) in facts.items())
    calls = [c for _, _, c in facts.values() if c is not None]
    out = [
        Verdict(f"transformer_psm latency at n=2^{int(math.log2(sizes[-1]))} <= 1.3x n=2^{int(math.log2(sizes[0]))}",
                growth <= 1.3, f"{growth:.2f}x"),
        Verdict("transformer_psm state bytes <= (ceil(log2(n/C + 1)) + 2) elements of C x D fp32",
                worst <= 1.0, f"worst n: {worst:.2f}x the bound"),
    ]
    if calls:
        out.append(Verdict("transformer_psm Agg calls per chunk <= 2 (amortized)", max(calls) <= 2.0,
                           f"max {max(calls):.2f}"))
    return tuple(out)


def run(settings: Settings) -> CaseResult:
    sizes = [2 ** p for p in ((8, 10, 12) if settings.quick else range(8, 16))]
    torch.manual_seed(0)
    rows, verdicts, notes = [], [], []
    transformer = peers.example_op("transformer_psm")
    if transformer.cls is not None:
        layer = transformer.cls(C=CHUNK, D=WIDTH, H=HEADS)
        found, facts = _psmc_rows(settings, sizes, "transformer_psm", layer, _transformer_inputs, tree=True)
        rows += found
        verdicts += _tree_verdicts(facts)
    else:
        notes.append(f"psmc transformer_psm skipped: {transformer.reason}")
    rows += _attention_rows(settings, sizes, WIDTH, HEADS, f"D={WIDTH}, {HEADS} heads")
    gla = peers.example_op("gla")
    if gla.cls is not None:
        found, facts = _psmc_rows(settings, sizes, "gla", gla.cls(K=GLA_K, V=GLA_V), _gla_inputs, tree=False)
        rows += found
        growth = facts[sizes[-1]][0].median_ms / facts[sizes[0]][0].median_ms
        verdicts.append(Verdict(f"gla latency at n=2^{int(math.log2(sizes[-1]))} <= 1.3x n=2^{int(math.log2(sizes[0]))}",
                                growth <= 1.3, f"{growth:.2f}x"))
    else:
        notes.append(f"psmc gla skipped: {gla.reason}")
    rows += _attention_rows(settings, sizes, GLA_HEADS * GLA_K, GLA_HEADS, f"D={GLA_HEADS * GLA_K}, {GLA_HEADS} heads")
    rows.sort(key=lambda r: (int(r.measure.rsplit("2^", 1)[1]), r.impl))
    notes.append(f"Latency is the median over repeats of {WINDOW} consecutive steps, divided by {WINDOW}; "
                 "'vs best peer' compares with the faster attention layer at the same n.")
    return CaseResult("streaming", "Streaming: per-token step latency and state bytes", tuple(rows), tuple(verdicts),
                      tuple(notes))
