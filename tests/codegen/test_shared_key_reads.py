"""Decayed linear attention over several states read by one query (psmc.analysis.classes.
_shared_key_reads; mLSTM's C and normaliser n): the reads in one chunkwise pass with the values
side by side, the readout on them. The layer equals its generic scan: forward, final state,
continued, packed sequences, gradients; the step is the generic one."""
from pathlib import Path

import pytest
import torch

import psmc
from psmc.analysis.classes import classify
from psmc.ir import ops_from_source
from psmc.ir.rewrite import canonicalize

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def mlstm():
    return psmc.load(EXAMPLES / "mlstm.psm").mlstm(K=8, V=4, backend="torch").double()


def inputs(seed=0, B=2, T=37, H=3):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)
    return {"k": 0.3 * rnd(B, T, H, 8), "v": rnd(B, T, H, 4), "f": torch.nn.functional.logsigmoid(rnd(B, T, H) + 2),
            "i": 0.5 * rnd(B, T, H), "q": rnd(B, T, H, 8)}


def generic(layer, fn):
    layer.use_fast_path = False
    try:
        return fn()
    finally:
        layer.use_fast_path = True


def test_mlstm_takes_the_chunkwise_form(mlstm):
    assert mlstm.spec.fast == "chunkwise:scalar"
    (op,) = ops_from_source((EXAMPLES / "mlstm.psm").read_text())
    found = classify(canonicalize(op), True)
    assert found.reason == ("states C, n decayed together with one key, readout a function of q @ C, q @ n: the "
                            "reads in one chunkwise pass, the readout on them")


def test_forward_state_continued_and_packed_equal_the_generic_scan(mlstm):
    x = inputs()
    got, state = mlstm(**x, return_state=True)
    want, want_state = generic(mlstm, lambda: mlstm(**x, return_state=True))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(state.prefix, want_state.prefix):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    first, mid = mlstm(**{n: t[:, :20] for n, t in x.items()}, return_state=True)
    rest = mlstm(**{n: t[:, 20:] for n, t in x.items()}, state=mid)
    torch.testing.assert_close(torch.cat([first, rest], 1), want, rtol=1e-10, atol=1e-12)
    step, s = [], mid
    for t in range(20, 37):
        o, s = mlstm.step(s, **{n: v[:, t] for n, v in x.items()})
        step.append(o)
    torch.testing.assert_close(torch.stack(step, 1), want[:, 20:], rtol=1e-10, atol=1e-12)
    one = {n: t[:1] for n, t in x.items()}
    cu = torch.tensor([0, 5, 20, 37])
    packed = mlstm(**one, cu_seqlens=cu)
    alone = torch.cat([mlstm(**{n: t[:, a:b] for n, t in one.items()}) for a, b in ((0, 5), (5, 20), (20, 37))], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-12)


def test_gradients_equal_the_generic_scan(mlstm):
    x = inputs(seed=1, T=19)

    def grads():
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        mlstm(**leaves).square().sum().backward()
        return [leaves[n].grad for n in x]
    for a, b in zip(grads(), generic(mlstm, grads)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


READS = """op reads[K, V] {{
  state (a: f32, S: f32[K, V], n: f32[K]);
  lift (k: f32[K], v: f32[V], g: f32, c: f32) {{ return (exp(g), c * outer(k, v), {}); }}
  combine (l, r) {{ return (l.a * r.a, r.a * l.S + r.S, r.a * l.n + r.n); }}
  identity = (ones, zeros, zeros);
  readout (s, q: f32[K], p: f32[K]) {{ return {}; }}
}}"""


@pytest.mark.parametrize("n_lift,readout,taken", [
    ("c * k", "(q @ s.S) / max(abs(q @ s.n), 1.0)", True),  # mLSTM
    ("k", "(q @ s.S) * tanh(sum(s.n * q))", True),  # the normaliser's value 1, the dot spelled out
    ("c * v[0:1] * k", "(q @ s.S) / (abs(q @ s.n) + 1.0)", False),  # n's key is not S's
    ("c * k", "(q @ s.S) / (abs(p @ s.n) + 1.0)", False),  # two queries
    ("c * k", "(q @ s.S) + s.n[0:1] * 0.0", False),  # n read other than through q
])
def test_what_the_class_takes(n_lift, readout, taken):
    (op,) = ops_from_source(READS.format(n_lift, readout))
    got = classify(canonicalize(op), True)
    assert (got.name == "decayed-linear-attention") == taken, got.reason
