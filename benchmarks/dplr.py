"""Cases `rwkv7` and `kda` at (B, T, H, K, V) = (2, 1024, 4, 64, 64), fp32: the
diagonal-plus-low-rank class (psmc.runtime.dplr, the chunked WY form).

rwkv7 (RWKV-7): examples/rwkv7.psm with RWKV-7's inputs: log decays w = -e^-0.5 sigmoid(normal),
a unit removal key kappa, a = -kappa, b = kappa * sigmoid(normal) (the in-context learning
rate). Peers: fla-core's naive `dplr_recurrence` (per token) and `dplr_chunkwise` (chunk 32,
its default), given [B, H, T, ...] inputs pre-transposed (the transposes are not timed); they
scale q by K^-1/2, which changes nothing in the timing.

kda (Kimi Delta Attention): examples/kda.psm, keys l2-normalised, beta = sigmoid(normal), per-key
log gates g = logsigmoid(normal). Peers: fla-core's `naive_recurrent_kda` and `naive_chunk_kda`
(chunk 64), which take [B, T, H, ...] as psmc does.

Before this class both ops ran on the generic matrix-affine scan, which forms a K x K
transition per token (B T H K^2 floats: 134 MB here, and log-depth copies of it); the delta
rule's case notes ~30 s for that scan at this shape, so it is not timed. The issue sets no
target for these cases; the 0.5x line of the delta rule is shown for comparison.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import peers
from .cases import Settings, forward_backward, timed_row, with_grad
from .delta import SHAPE, run_case
from .report import CaseResult

RWKV7_PEERS = [("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence"),
               ("fla.ops.generalized_delta_rule.dplr.naive", "dplr_chunkwise")]
KDA_PEERS = [("fla.ops.kda.naive", "naive_recurrent_kda"), ("fla.ops.kda.naive", "naive_chunk_kda")]


def _rwkv7_inputs():
    torch.manual_seed(0)
    batch, steps, heads, width_k, width_v = SHAPE
    r, k = torch.randn(batch, steps, heads, width_k), torch.randn(batch, steps, heads, width_k)
    v = torch.randn(batch, steps, heads, width_v)
    w = -math.exp(-0.5) * torch.sigmoid(torch.randn(batch, steps, heads, width_k))
    kappa = F.normalize(torch.randn(batch, steps, heads, width_k), dim=-1)
    return r, w, k, v, -kappa, kappa * torch.sigmoid(torch.randn(batch, steps, heads, width_k))


def _kda_inputs():
    torch.manual_seed(0)
    batch, steps, heads, width_k, width_v = SHAPE
    q = torch.randn(batch, steps, heads, width_k)
    k = F.normalize(torch.randn(batch, steps, heads, width_k), dim=-1)
    v = torch.randn(batch, steps, heads, width_v)
    g = F.logsigmoid(torch.randn(batch, steps, heads, width_k))
    return q, k, v, g, torch.sigmoid(torch.randn(batch, steps, heads))


def _api(cls, wrap, make):
    if cls.spec.fast != "dplr":
        raise RuntimeError(f"the layer's plan is {cls.spec.fast or 'the generic matrix-affine scan'}, "
                           "not the diagonal-plus-low-rank fast path")
    return wrap(make(cls(K=SHAPE[3], V=SHAPE[4])))


def _rwkv7_psmc(tensors, grad: bool):
    from psmc.runtime.dplr import chunk_dplr

    r, w, k, v, a, b = with_grad(*tensors) if grad else tensors

    def wrap(fn):
        return forward_backward(fn, [r, w, k, v, a, b]) if grad else fn

    def api(cls):
        return _api(cls, wrap, lambda layer: lambda: layer(w=w, k=k, v=v, a=a, b=b, r=r))

    runtime_call = wrap(lambda: chunk_dplr(r, k, v, a, b, w)[0])
    return peers.psmc_calls(api, "rwkv7", ("chunk_dplr", runtime_call))


def _rwkv7_peer(settings, measure_name, module, attribute, tensors, grad):
    fn, why = peers.optional(module, attribute)
    call = None
    if fn is not None:
        r, w, k, v, a, b = (t.transpose(1, 2).contiguous() for t in tensors)  # [B, H, T, ...]: fla's layout
        inputs = with_grad(r, k, v, a, b, w) if grad else [r, k, v, a, b, w]
        run = lambda: fn(*inputs)  # noqa: E731  (q, k, v, alpha, beta, gk)
        call = forward_backward(run, inputs) if grad else run
    return timed_row(settings, "rwkv7", measure_name, attribute, module, call, skip=why)


def _kda_psmc(tensors, grad: bool):
    from psmc.runtime.dplr import chunk_dplr

    q, k, v, g, beta = with_grad(*tensors) if grad else tensors
    scale = SHAPE[3] ** -0.5

    def wrap(fn):
        return forward_backward(fn, [q, k, v, g, beta]) if grad else fn

    def api(cls):
        return _api(cls, wrap, lambda layer: lambda: layer(k=k, v=v, beta=beta, g=g, q=q))

    def runtime():  # what examples/kda.psm's layer hands the runtime: E = (I - beta k k^T) diag(e^g)
        written = beta[..., None] * k
        return chunk_dplr(q, written, v, k * torch.exp(g), -written, g, scale=scale)[0]

    return peers.psmc_calls(api, "kda", ("chunk_dplr", wrap(runtime)))


def _kda_peer(settings, measure_name, module, attribute, tensors, grad):
    fn, why = peers.optional(module, attribute)
    call = None
    if fn is not None:
        inputs = with_grad(*tensors) if grad else list(tensors)
        run = lambda: fn(*inputs)  # noqa: E731  (q, k, v, g, beta)
        call = forward_backward(run, inputs) if grad else run
    return timed_row(settings, "kda", measure_name, attribute, module, call, skip=why)


def run_rwkv7(settings: Settings) -> CaseResult:
    return run_case(settings, "rwkv7", "RWKV-7 (diagonal plus rank one)", _rwkv7_inputs(), _rwkv7_psmc,
                    RWKV7_PEERS, _rwkv7_peer)


def run_kda(settings: Settings) -> CaseResult:
    return run_case(settings, "kda", "Kimi Delta Attention (diagonal plus rank one)", _kda_inputs(), _kda_psmc,
                    KDA_PEERS, _kda_peer)
