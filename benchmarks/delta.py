"""Cases `delta_rule` and `gated_delta_rule` at (B, T, H, K, V) = (2, 1024, 4, 64, 64), fp32.

delta_rule (DeltaNet): psmc takes [B, T, H, ...] inputs; fla's naive delta-rule references
take [B, H, T, ...] and are given them pre-transposed (the transposes are not timed). Keys are
l2-normalised and beta = sigmoid(normal), as DeltaNet layers produce them; every
implementation computes fla's o = (q K^-1/2) S_t. The target (issue 10): psmc forward <= 0.5x
the faster fla reference.

gated_delta_rule (Gated DeltaNet): the same inputs plus log gates g = logsigmoid(normal);
fla's gated references take [B, T, H, ...] as psmc does. Measured beside the delta rule (the
two share psmc.runtime.delta); the issue sets no target of its own for it, the 0.5x line is
shown for comparison.

gated_delta_product (Gated DeltaProduct, two delta steps per token): fla's naive reference
takes the steps' k, v, beta interleaved [B, 2 T, H, ...]; psmc's example takes them as k1, k2,
... (strided views of the same tensors, sliced inside the timed call). Its chunk form is
fla's Triton kernels only (no CPU reference): the 0.5x line is against the naive loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import peers
from .cases import Settings, forward_backward, timed_row, with_grad
from .report import CaseResult, psmc_impls, ratio_verdict

SHAPE = (2, 1024, 4, 64, 64)  # (B, T, H, K, V)
PEERS = [("fla.ops.delta_rule.naive", "delta_rule_recurrence"),
         ("fla.ops.delta_rule.naive", "delta_rule_chunkwise")]
PRODUCT_PEERS = [("fla.ops.gated_delta_product.naive", "naive_recurrent_gated_delta_product")]
GATED_PEERS = [("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule"),
               ("fla.ops.gated_delta_rule.naive", "naive_chunk_gated_delta_rule")]


def _inputs():
    torch.manual_seed(0)
    batch, steps, heads, width_k, width_v = SHAPE
    q = torch.randn(batch, steps, heads, width_k)
    k = F.normalize(torch.randn(batch, steps, heads, width_k), dim=-1)
    v = torch.randn(batch, steps, heads, width_v)
    beta = torch.sigmoid(torch.randn(batch, steps, heads))
    return q, k, v, beta


def _gated_inputs():
    q, k, v, beta = _inputs()
    return q, k, v, beta, F.logsigmoid(torch.randn(*beta.shape))


def _psmc(tensors, grad: bool):
    """The psmc rows: the example layer through psmc.load when its plan is the delta rule's
    (the generic matrix-affine scan forms K x K per token: ~30 s and > 1.5 GB here, so it is
    not timed), and the runtime function it calls."""
    from psmc.runtime.delta import chunk_delta_rule

    q, k, v, beta = with_grad(*tensors) if grad else tensors
    width_k, width_v = q.shape[-1], v.shape[-1]
    scale = width_k ** -0.5

    def wrap(fn):
        return forward_backward(fn, [q, k, v, beta]) if grad else fn

    def api(cls):
        if cls.spec.fast is None:
            raise RuntimeError("the layer's plan is the generic matrix-affine scan (no delta-rule fast path in "
                               "this build)")
        layer = cls(K=width_k, V=width_v)
        return wrap(lambda: layer(k=k, v=v, beta=beta, q=q * scale))

    runtime_call = wrap(lambda: chunk_delta_rule(q, k, v, beta, scale=scale)[0])
    return peers.psmc_calls(api, "delta_rule", ("chunk_delta_rule", runtime_call))


def _peer(settings, measure_name, module, attribute, tensors, grad):
    fn, why = peers.optional(module, attribute)
    call = None
    if fn is not None:
        heads_first = [t.transpose(1, 2).contiguous() for t in tensors]  # [B, H, T, ...]: fla's layout
        inputs = with_grad(*heads_first) if grad else heads_first
        call = forward_backward(lambda: fn(*inputs), inputs) if grad else (lambda: fn(*inputs))
    return timed_row(settings, "delta_rule", measure_name, attribute, module, call, skip=why)


def _gated_rows(tensors, grad: bool, name: str, layer_call, runtime_call):
    """The psmc rows of a gated case: examples/<name>.psm through psmc.load, called as
    `layer_call(layer, q, k, v, beta, g)`, and the runtime call it makes, `runtime_call(q, k, v,
    beta, g)` (both scale by K ** -0.5 themselves)."""
    q, k, v, beta, g = with_grad(*tensors) if grad else tensors
    width_k, width_v = q.shape[-1], v.shape[-1]

    def wrap(fn):
        return forward_backward(fn, [q, k, v, beta, g]) if grad else fn

    def api(cls):
        if cls.spec.fast is None:
            raise RuntimeError("the layer's plan is the generic matrix-affine scan (no delta-rule fast path in "
                               "this build)")
        layer = cls(K=width_k, V=width_v)
        return wrap(lambda: layer_call(layer, q, k, v, beta, g))

    return peers.psmc_calls(api, name, ("chunk_delta_rule", wrap(lambda: runtime_call(q, k, v, beta, g))))


def _gated_psmc(tensors, grad: bool):
    """The gated rows: examples/gated_delta_rule.psm (its readout scales by K ** -0.5 itself)
    through psmc.load, and the runtime function it calls."""
    from psmc.runtime.delta import chunk_delta_rule

    return _gated_rows(tensors, grad, "gated_delta_rule", lambda layer, q, k, v, beta, g: layer(k=k, v=v, beta=beta,
                                                                                              g=g, q=q),
                       lambda q, k, v, beta, g: chunk_delta_rule(q, k, v, beta, g, scale=q.shape[-1] ** -0.5)[0])


def _gated_peer(settings, measure_name, module, attribute, tensors, grad):
    fn, why = peers.optional(module, attribute)
    call = None
    if fn is not None:
        q, k, v, beta, g = with_grad(*tensors) if grad else tensors
        if attribute.startswith("naive_chunk"):
            run = lambda: fn(q, k, v, g, beta)  # noqa: E731  (its argument order: g before beta)
        else:
            run = lambda: fn(q, k, v, beta, g)  # noqa: E731
        call = forward_backward(run, [q, k, v, beta, g]) if grad else run
    return timed_row(settings, "gated_delta_rule", measure_name, attribute, module, call, skip=why)


def _product_inputs():
    """q, g [B, T, H, ...] and the two steps' k, v, beta interleaved [B, 2 T, H, ...] (fla's layout)."""
    torch.manual_seed(0)
    batch, steps, heads, width_k, width_v = SHAPE
    q = torch.randn(batch, steps, heads, width_k)
    k = F.normalize(torch.randn(batch, 2 * steps, heads, width_k), dim=-1)
    v = torch.randn(batch, 2 * steps, heads, width_v)
    beta = torch.sigmoid(torch.randn(batch, 2 * steps, heads))
    return q, k, v, beta, F.logsigmoid(torch.randn(batch, steps, heads))


def _product_psmc(tensors, grad: bool):
    """examples/gated_delta_product.psm through psmc.load, and the runtime call it makes (one
    delta-rule sequence twice as long, the gate on each token's first step)."""
    from psmc.runtime.delta import chunk_delta_rule

    def layer_call(layer, q, k, v, beta, g):
        return layer(k1=k[:, 0::2], v1=v[:, 0::2], b1=beta[:, 0::2], k2=k[:, 1::2], v2=v[:, 1::2], b2=beta[:, 1::2],
                     g=g, q=q)

    def runtime_call(q, k, v, beta, g):
        gates = torch.stack([g, torch.zeros_like(g)], dim=2).flatten(1, 2)
        queries = torch.stack([torch.zeros_like(q), q], dim=2).flatten(1, 2)
        return chunk_delta_rule(queries, k, v, beta, gates, scale=q.shape[-1] ** -0.5)[0][:, 1::2]

    return _gated_rows(tensors, grad, "gated_delta_product", layer_call, runtime_call)


def _product_peer(settings, measure_name, module, attribute, tensors, grad):
    fn, why = peers.optional(module, attribute)
    call = None
    if fn is not None:
        q, k, v, beta, g = with_grad(*tensors) if grad else tensors
        run = lambda: fn(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, num_householder=2)[0]  # noqa: E731
        call = forward_backward(run, [q, k, v, beta, g]) if grad else run
    return timed_row(settings, "gated_delta_product", measure_name, attribute, module, call, skip=why)


def run_case(settings: Settings, case: str, title: str, tensors, psmc_rows, peers, peer_row) -> CaseResult:
    """fwd and fwd+bwd rows of psmc (every path `psmc_rows` finds) and of each peer, and the
    forward target (<= 0.5x the faster peer) per psmc row."""
    rows = []
    for measure_name, grad in (("fwd", False), ("fwd+bwd", True)):
        found, why = psmc_rows(tensors, grad)
        for entry in found:
            rows.append(timed_row(settings, case, measure_name, entry.impl, entry.path, entry.call, is_psmc=True))
        if not found:
            rows.append(timed_row(settings, case, measure_name, "psmc", "api", None, is_psmc=True, skip=why))
        for module, attribute in peers:
            rows.append(peer_row(settings, measure_name, module, attribute, tensors, grad))
    verdicts = tuple(ratio_verdict(rows, "fwd", 0.5, None, impl) for impl in psmc_impls(rows))
    return CaseResult(case, f"{title}, (B, T, H, K, V) = {SHAPE}, fp32", tuple(rows), verdicts)


def run_gated(settings: Settings) -> CaseResult:
    return run_case(settings, "gated_delta_rule", "gated delta rule (Gated DeltaNet)", _gated_inputs(), _gated_psmc,
                 GATED_PEERS, _gated_peer)


def run_product(settings: Settings) -> CaseResult:
    return run_case(settings, "gated_delta_product", "gated delta product (two delta steps per token)",
                    _product_inputs(), _product_psmc, PRODUCT_PEERS, _product_peer)


def run(settings: Settings) -> CaseResult:
    return run_case(settings, "delta_rule", "delta rule (DeltaNet)", _inputs(), _psmc, PEERS, _peer)
