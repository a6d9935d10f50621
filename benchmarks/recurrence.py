"""Case `recurrence`: h_t = a_t * h_{t-1} + x_t at (B, D, T) = (4, 256, 4096), fp32.

Each implementation gets its inputs in its own layout, made outside the timed call: the peers
take [B, D, T] (time last; mambapy [B, T, D, 1]), psmc takes [B, T, D] (time-major, lanes
after time, as every psmc layer). psmc's example op lifts exp(log_a), so its timed call
includes that exp; the peers receive a itself.
"""
from __future__ import annotations

import torch

from . import peers
from .cases import Settings, forward_backward, timed_row, with_grad
from .report import CaseResult, psmc_impls, ratio_verdict

SHAPE = (4, 256, 4096)  # (B, D, T)


def _python_loop(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # unbind, not a[..., t]: the backward of T selects would write T full-size zero tensors
    h = torch.zeros_like(x[..., 0])
    states = []
    for a_t, x_t in zip(a.unbind(-1), x.unbind(-1)):
        h = a_t * h + x_t
        states.append(h)
    return torch.stack(states, dim=-1)


def _combine(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def _peer_functions(settings: Settings, grad: bool):
    """(name, path, fn(a, x) or None, skip reason, time-major?) for every peer."""
    found = [("python loop", "for t in range(T)", _python_loop, "", False)]
    scan, why = peers.optional("accelerated_scan.ref", "scan")
    found.append(("accelerated_scan.ref.scan", "pure torch tree scan", scan, why, False))
    pscan, why = peers.optional("mambapy.pscan", "pscan")
    mamba = None if pscan is None else (lambda a, x: pscan(a[..., None], x[..., None]))
    found.append(("mambapy.pscan.pscan", "Blelloch on [B, T, D, 1]", mamba, why, True))
    assoc, why = peers.optional("torch._higher_order_ops.associative_scan", "associative_scan")
    generic = None if assoc is None else (lambda a, x: assoc(_combine, (a, x), dim=2, combine_mode="generic")[1])
    found.append(("torch associative_scan", "combine_mode='generic', eager", generic, why, False))
    if settings.compile_peers and generic is not None and not grad:
        compiled = torch.compile(generic)
        found.append(("torch associative_scan", "generic, torch.compile'd (compile not timed)", compiled, "", False))
    return found


def _peer_calls(settings: Settings, a: torch.Tensor, x: torch.Tensor, grad: bool):
    """(name, path, timed callable or None, skip reason) for every peer."""
    calls = []
    for name, path, fn, why, time_major in _peer_functions(settings, grad):
        if fn is None:
            calls.append((name, path, None, why))
            continue
        inputs = [t.transpose(1, 2).contiguous() for t in (a, x)] if time_major else [a, x]
        if grad:
            inputs = with_grad(*inputs)
            calls.append((name, path, forward_backward(lambda f=fn, i=inputs: f(*i), inputs), ""))
        else:
            calls.append((name, path, (lambda f=fn, i=inputs: f(*i)), ""))
    return calls


def _psmc_call(log_a_t: torch.Tensor, x_t: torch.Tensor, grad: bool):
    from psmc.runtime.fastpaths import linear_recurrence

    leaves = with_grad(log_a_t, x_t) if grad else [log_a_t, x_t]

    def wrap(fn):
        return forward_backward(fn, leaves) if grad else fn

    def api(cls):
        layer = cls()
        return wrap(lambda: layer(x=leaves[1], log_a=leaves[0]))

    runtime = ("linear_recurrence(log_a, x, log=True)", wrap(lambda: linear_recurrence(leaves[0], leaves[1], log=True)[0]))
    return peers.psmc_calls(api, "linear_recurrence", runtime)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The case's inputs (seed 0): a, x [B, D, T] as the peers take them, and log(a), x as
    [B, T, D] contiguous tensors for psmc."""
    torch.manual_seed(0)
    batch, width, steps = SHAPE
    a = torch.rand(batch, width, steps) * 0.5 + 0.5
    x = torch.randn(batch, width, steps)
    return a, x, a.log().transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous()


def run(settings: Settings) -> CaseResult:
    a, x, log_a_t, x_t = inputs()
    rows = []
    for measure_name, grad in (("fwd", False), ("fwd+bwd", True)):
        found, why = _psmc_call(log_a_t, x_t, grad)
        for entry in found:
            rows.append(timed_row(settings, "recurrence", measure_name, entry.impl, entry.path, entry.call,
                                  is_psmc=True))
        if not found:
            rows.append(timed_row(settings, "recurrence", measure_name, "psmc", "api", None, is_psmc=True, skip=why))
        for name, peer_path, peer_call, why in _peer_calls(settings, a, x, grad):
            rows.append(timed_row(settings, "recurrence", measure_name, name, peer_path, peer_call, skip=why))
    rows = tuple(rows)
    verdicts = tuple(ratio_verdict(rows, "fwd", 0.5, impl=impl) for impl in psmc_impls(rows))
    notes = ("psmc gets [B, T, D] (its layout) and computes exp(log_a) inside the timed call; "
             "peers get a and x as [B, D, T].",)
    return CaseResult("recurrence", f"First-order recurrence h = a*h + x, (B, D, T) = {SHAPE}, fp32",
                      rows, verdicts, notes)
