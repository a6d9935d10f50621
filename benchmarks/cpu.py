"""Case `cpu` (issue 15): the fused C++ CPU backend against the one-pass bandwidth limit, the
torch backend and the peers, all measured in one run.

* first-order recurrence h = a*h + x at (B, D, T) = (4, 256, 4096), fwd and fwd+bwd: psmc
  backend='cpu' and backend='torch', the peers of the `recurrence` case, and the bandwidth
  limit: one fused pass over the same data, `torch.addcmul(x, a, x, out=h)` (reads two
  [B, T, D] tensors, writes one, like the scan's forward);
* GLA step at B=1, H=4, K=V=64 (one token): psmc backend='cpu' and 'torch' against a
  hand-written eager torch step (in-place state update, one batched matvec);
* selective SSM step at B=1, D=256, N=16: the same three;
* GLA forward at (B, T, H, K, V) = (2, 1024, 4, 64, 64): backend='auto' (which keeps the
  chunkwise matmul form for long sequences), 'cpu' (the C++ token loop) and 'torch';
* the paper's fixed tree of a non-associative op (examples/ema.psm) at the recurrence's shape,
  fwd and fwd+bwd: backend='cpu' (the C++ tree kernels) against 'torch' (the level-batched
  torch tree); no peer computes this tree.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from . import peers, recurrence
from .cases import Settings, forward_backward, timed_row, with_grad
from .report import CaseResult, Verdict

LIMIT = "bandwidth limit"
GLA_STEP = (1, 4, 64, 64)  # (B, H, K, V)
SSM_STEP = (1, 256, 16)  # (B, D, N)
GLA_FWD = (2, 1024, 4, 64, 64)  # (B, T, H, K, V)
STEPS = 64  # tokens per timed step window


def _median(rows, measure, impl):
    row = next((r for r in rows if r.measure == measure and r.impl == impl and r.timing is not None), None)
    return None if row is None else row.timing.median_ms


def _best_peer(rows, measure):
    found = [r for r in rows if r.measure == measure and not r.is_psmc and r.impl != LIMIT and r.timing is not None]
    return min(found, key=lambda r: r.timing.median_ms) if found else None


def _ratio(rows, measure, impl, limit, reference=None) -> Verdict:
    ours = _median(rows, measure, impl)
    if reference is None:
        best = _best_peer(rows, measure)
        theirs, name = (None, "best peer") if best is None else (best.timing.median_ms, best.impl)
    else:
        theirs, name = _median(rows, measure, reference), reference
    target = f"{measure}: {impl} <= {limit}x {reference or 'best peer'}"
    if ours is None or theirs is None:
        return Verdict(target, None, "not measured")
    return Verdict(target, ours / theirs <= limit, f"{ours / theirs:.2f}x {name}")


def _recurrence_rows(settings: Settings, cls):
    a, x, log_a_t, x_t = recurrence.inputs()  # the `recurrence` case's inputs and shape
    rows = []
    out = torch.empty_like(x_t)
    rows.append(timed_row(settings, "cpu", "recurrence fwd", LIMIT, "torch.addcmul(x, a, x, out=h), [B, T, D]",
                          lambda: torch.addcmul(x_t, log_a_t, x_t, out=out)))
    for measure, grad in (("recurrence fwd", False), ("recurrence fwd+bwd", True)):
        for backend in ("cpu", "torch"):
            if cls is None:
                continue
            layer = cls(backend=backend)
            leaves = with_grad(log_a_t, x_t) if grad else [log_a_t, x_t]
            call = (lambda layer=layer, leaves=leaves: layer(x=leaves[1], log_a=leaves[0]))
            if grad:
                call = forward_backward(call, leaves)
            rows.append(timed_row(settings, "cpu", measure, f"psmc {backend}",
                                  f"api: linear_recurrence(backend={backend!r})", call, is_psmc=True))
        for name, path, peer_call, why in recurrence._peer_calls(settings, a, x, grad):
            rows.append(timed_row(settings, "cpu", measure, name, path, peer_call, skip=why))
    return rows


def _window(step, state, tokens):
    def run():
        s = state
        for token in tokens:
            _, s = step(s, token)
        return s
    return run


def _gla_step_rows(settings: Settings, cls):
    B, H, K, V = GLA_STEP
    scale = K ** -0.5
    gen = torch.Generator().manual_seed(0)
    tokens = [dict(k=torch.randn(B, H, K, generator=gen), v=torch.randn(B, H, V, generator=gen),
                   gk=F.logsigmoid(torch.randn(B, H, K, generator=gen)), q=torch.randn(B, H, K, generator=gen))
              for _ in range(STEPS)]

    def eager(S, t):  # hand-written: S = diag(exp(gk)) S + k v^T; o = q S / sqrt(K)
        S.mul_(t["gk"].exp().unsqueeze(-1)).add_(t["k"].unsqueeze(-1) * t["v"].unsqueeze(-2))
        return (t["q"].unsqueeze(-2) @ S).squeeze(-2) * scale, S

    return _step_rows(settings, "gla step (ms/token)", (eager, torch.zeros(B, H, K, V), "in-place S"), tokens,
                      cls, "gla", {"K": K, "V": V}, ("cpu", "torch"))


def _ssm_step_rows(settings: Settings, cls):
    B, D, N = SSM_STEP
    gen = torch.Generator().manual_seed(0)
    A = -torch.rand(D, N, generator=gen) - 0.05
    tokens = [dict(u=torch.randn(B, D, generator=gen), delta=F.softplus(torch.randn(B, D, generator=gen)),
                   A=A.expand(B, D, N), B=torch.randn(B, 1, N, generator=gen), C=torch.randn(B, 1, N, generator=gen))
              for _ in range(STEPS)]

    def eager(h, t):  # hand-written: h = exp(delta A) h + delta B u; y = sum_n h C
        h.mul_(torch.exp(t["delta"].unsqueeze(-1) * t["A"])).add_((t["delta"] * t["u"]).unsqueeze(-1) * t["B"])
        return (h * t["C"]).sum(-1), h

    return _step_rows(settings, "selective_ssm step (ms/token)", (eager, torch.zeros(B, D, N), "in-place h"), tokens,
                      cls, "selective_ssm", {"N": N}, ("cpu", "torch"))


def _delta_step_rows(settings: Settings, cls):
    B, H, K, V = GLA_STEP
    scale = K ** -0.5
    gen = torch.Generator().manual_seed(0)
    tokens = [dict(q=torch.randn(B, H, K, generator=gen), k=F.normalize(torch.randn(B, H, K, generator=gen), dim=-1),
                   v=torch.randn(B, H, V, generator=gen), beta=torch.rand(B, H, generator=gen),
                   g=F.logsigmoid(torch.randn(B, H, generator=gen))) for _ in range(STEPS)]

    def eager(S, t):  # hand-written: S = exp(g) (S - beta k k^T S) + beta k v^T; o = q S / sqrt(K)
        gate = t["g"].exp()[..., None]
        read = (t["k"].unsqueeze(-2) @ S).squeeze(-2)
        update = (t["beta"][..., None] * (t["v"] - gate * read)).unsqueeze(-2)
        S.mul_(gate.unsqueeze(-1)).addcmul_(t["k"].unsqueeze(-1), update)
        return (t["q"].unsqueeze(-2) @ S).squeeze(-2) * scale, S

    paths = {"auto": ": the fused C++ token", "torch": ": delta_rule_step's torch ops"}
    return _step_rows(settings, "gated delta step (ms/token)", (eager, torch.zeros(B, H, K, V), "in-place S"), tokens,
                      cls, "gated_delta_rule", {"K": K, "V": V}, ("auto", "torch"), paths)


def _step_rows(settings: Settings, measure: str, hand, tokens, cls, name: str, dims: dict, backends, paths=None):
    """Per-token rows of one step: `hand` = (the hand-written eager step, its initial state, what
    it updates), then psmc's `step` on each backend after a one-token prefill."""
    eager, start, updates = hand
    with torch.no_grad():
        rows = [_per_token(timed_row(settings, "cpu", measure, "eager torch step", f"hand-written, {updates}",
                                     _window(eager, start, tokens)))]
        for backend in backends:
            if cls is None:
                continue
            layer = cls(backend=backend, **dims)
            _, state = layer(**{n: x.unsqueeze(1) for n, x in tokens[0].items()}, return_state=True)
            call = _window(lambda s, t, layer=layer: layer.step(s, **t), state, tokens)
            path = f"api: {name}(backend={backend!r}).step{(paths or {}).get(backend, '')}"
            rows.append(_per_token(timed_row(settings, "cpu", measure, f"psmc {backend}", path, call, is_psmc=True)))
    return rows


def _per_token(row):
    if row.timing is None:
        return row
    t = row.timing
    return type(row)(row.case, row.measure, row.impl, row.path, type(t)(t.median_ms / STEPS, t.min_ms / STEPS, t.runs),
                     row.is_psmc, row.detail)


def _gla_forward_rows(settings: Settings, cls):
    B, T, H, K, V = GLA_FWD
    torch.manual_seed(0)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    gk = F.logsigmoid(torch.randn(B, T, H, K))
    rows = []
    with torch.no_grad():
        for backend in ("auto", "cpu", "torch"):
            if cls is None:
                continue
            layer = cls(backend=backend, K=K, V=V)
            rows.append(timed_row(settings, "cpu", "gla fwd", f"psmc {backend}", f"api: gla(backend={backend!r})",
                                  lambda layer=layer: layer(k=k, v=v, gk=gk, q=q), is_psmc=True))
        fn, why = peers.optional("fla.ops.gla.naive", "naive_recurrent_gla")
        call = None
        if fn is not None:
            call = lambda: fn(q, k, v, gk)  # noqa: E731
        rows.append(timed_row(settings, "cpu", "gla fwd", "naive_recurrent_gla", "fla.ops.gla.naive", call, skip=why))
    return rows


def _tree_rows(settings: Settings, cls):
    a, x, log_a_t, x_t = recurrence.inputs()  # [B, T, D] at the recurrence case's shape
    rows = []
    for measure, grad in (("tree fwd", False), ("tree fwd+bwd", True)):
        for backend in ("cpu", "torch"):
            if cls is None:
                continue
            layer = cls(backend=backend)
            leaves = with_grad(x_t) if grad else [x_t]
            call = (lambda layer=layer, leaves=leaves: layer(y=leaves[0]))
            if grad:
                call = forward_backward(call, leaves)
            rows.append(timed_row(settings, "cpu", measure, f"psmc {backend}", f"api: ema(backend={backend!r})", call,
                                  is_psmc=True))
    return rows


def run(settings: Settings) -> CaseResult:
    rec = peers.example_op("linear_recurrence")
    gla = peers.example_op("gla")
    ssm = peers.example_op("selective_ssm")
    gdr = peers.example_op("gated_delta_rule")
    ema = peers.example_op("ema")
    rows = _recurrence_rows(settings, rec.cls) + _gla_step_rows(settings, gla.cls) + \
        _ssm_step_rows(settings, ssm.cls) + _delta_step_rows(settings, gdr.cls) + _gla_forward_rows(settings, gla.cls)
    rows += _tree_rows(settings, ema.cls)
    rows = tuple(rows)
    limit = _median(rows, "recurrence fwd", LIMIT)
    ours = _median(rows, "recurrence fwd", "psmc cpu")
    verdicts = [
        Verdict("recurrence fwd: psmc cpu <= 3x the bandwidth limit", None if None in (limit, ours) else ours <= 3 * limit,
                "not measured" if None in (limit, ours) else f"{ours / limit:.2f}x {LIMIT}"),
        _ratio(rows, "recurrence fwd", "psmc cpu", 0.5),
        _ratio(rows, "recurrence fwd+bwd", "psmc cpu", 0.5),
        _ratio(rows, "gla step (ms/token)", "psmc cpu", 0.5, "eager torch step"),
        _ratio(rows, "selective_ssm step (ms/token)", "psmc cpu", 0.5, "eager torch step"),
    ]
    verdicts += [_ratio(rows, "tree fwd", "psmc cpu", 0.5, "psmc torch"),
                 _ratio(rows, "tree fwd+bwd", "psmc cpu", 0.5, "psmc torch")]
    best = min((r.timing.median_ms for r in rows if r.measure == "gla fwd" and r.is_psmc and r.timing), default=None)
    verdicts.append(Verdict("gla fwd (2, 1024, 4, 64, 64) <= 8 ms by the fastest psmc path",
                            None if best is None else best <= 8.0, "not measured" if best is None else f"{best:.2f} ms"))
    notes = ("The bandwidth limit is one fused pass over the scan's data (read a and x, write h) with out=, "
             "so it allocates nothing; the psmc rows return a new tensor.",
             f"Step rows time {STEPS} consecutive steps and divide by {STEPS}.",
             "Peers get [B, D, T] inputs (their layout), psmc [B, T, D]; psmc computes exp(log_a) inside the call.")
    for op in (rec, gla, ssm, gdr, ema):
        if op.cls is None:
            notes += (f"psmc op skipped: {op.reason}",)
    return CaseResult("cpu", "Fused C++ CPU backend (issue 15)", rows, tuple(verdicts), notes)


