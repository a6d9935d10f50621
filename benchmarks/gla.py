"""Cases `gla` and `simple_gla` at (B, T, H, K, V) = (2, 1024, 4, 64, 64), fp32.

Every implementation takes [B, T, H, ...] inputs; log gates are fla's test convention,
logsigmoid of normal logits; scale = K ** -0.5 everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import peers
from .cases import Settings, forward_backward, timed_row, with_grad
from .report import CaseResult, absolute_verdict, psmc_impls, ratio_verdict

SHAPE = (2, 1024, 4, 64, 64)  # (B, T, H, K, V)


def _inputs(per_key: bool):
    torch.manual_seed(0)
    batch, steps, heads, width_k, width_v = SHAPE
    q = torch.randn(batch, steps, heads, width_k)
    k = torch.randn(batch, steps, heads, width_k)
    v = torch.randn(batch, steps, heads, width_v)
    gate = F.logsigmoid(torch.randn(batch, steps, heads, *((width_k,) if per_key else ())))
    return q, k, v, gate


def _psmc(name: str, gate_name: str, decay: str, tensors, grad: bool):
    """The psmc row: the example layer through psmc.load, or the runtime function it calls."""
    from psmc.runtime.chunkwise import chunk_linear_attention

    q, k, v, gate = with_grad(*tensors) if grad else tensors
    width_k, width_v = q.shape[-1], v.shape[-1]

    def wrap(fn):
        return forward_backward(fn, [q, k, v, gate]) if grad else fn

    def api(cls):
        layer = cls(K=width_k, V=width_v)
        return wrap(lambda: layer(k=k, v=v, q=q, **{gate_name: gate}))

    runtime_call = wrap(lambda: chunk_linear_attention(q, k, v, gate, decay=decay, scale=width_k ** -0.5)[0])
    return peers.psmc_calls(api, name, (f"chunk_linear_attention(decay={decay!r})", runtime_call))


def _peer(settings, case, measure_name, module, attribute, tensors, grad):
    fn, why = peers.optional(module, attribute)
    call = None
    if fn is not None:
        inputs = with_grad(*tensors) if grad else list(tensors)
        call = forward_backward(lambda: fn(*inputs), inputs) if grad else (lambda: fn(*inputs))
    return timed_row(settings, case, measure_name, attribute, module, call, skip=why)


def _case(settings: Settings, case: str, decay: str, gate_name: str, peer_list):
    tensors = _inputs(per_key=(decay == "key"))
    rows = []
    for measure_name, grad in (("fwd", False), ("fwd+bwd", True)):
        found, why = _psmc(case, gate_name, decay, tensors, grad)
        for entry in found:
            rows.append(timed_row(settings, case, measure_name, entry.impl, entry.path, entry.call, is_psmc=True))
        if not found:
            rows.append(timed_row(settings, case, measure_name, "psmc", "api", None, is_psmc=True, skip=why))
        for module, attribute in peer_list:
            rows.append(_peer(settings, case, measure_name, module, attribute, tensors, grad))
    return tuple(rows)


def run_gla(settings: Settings) -> CaseResult:
    rows = _case(settings, "gla", "key", "gk", [("fla.ops.gla.naive", "naive_recurrent_gla")])
    verdicts = tuple(v for impl in psmc_impls(rows)
                     for v in (absolute_verdict(rows, "fwd", 8.0, impl), absolute_verdict(rows, "fwd+bwd", 50.0, impl)))
    return CaseResult("gla", f"GLA (per-key decay), (B, T, H, K, V) = {SHAPE}, fp32", rows, verdicts)


def run_simple_gla(settings: Settings) -> CaseResult:
    peer_list = [("fla.ops.simple_gla.naive", "naive_chunk_simple_gla"),
                 ("fla.ops.simple_gla.naive", "naive_recurrent_simple_gla")]
    rows = _case(settings, "simple_gla", "scalar", "g", peer_list)
    verdicts = tuple(ratio_verdict(rows, "fwd", 0.8, "naive_chunk_simple_gla", impl) for impl in psmc_impls(rows))
    return CaseResult("simple_gla", f"simple GLA (scalar decay per head), (B, T, H, K, V) = {SHAPE}, fp32",
                      rows, verdicts)
