"""The kernel families psmc.runtime.autotune tunes, under TRITON_INTERPRET=1, with a clock under
which the last candidate always wins (the launches the static choice never makes): outputs,
final states and input gradients against backend='torch'. The timing launches run each kernel
several times into the same buffers, so a kernel that read what an earlier launch wrote would
show here too."""
from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import autotune, triton_scan  # noqa: E402
from triton_helpers import close, layer_class  # noqa: E402

pytestmark = pytest.mark.triton


def _last_wins():
    """A clock under which every launch takes less time than the ones before it: the last
    candidate of every key is kept."""
    ticks = itertools.count()

    def clock(fn, device):
        fn()
        return -float(next(ticks))
    return clock


def _tuned_launches(monkeypatch) -> list:
    """(key, candidates) of every launch that had more than one candidate."""
    seen = []
    real = autotune.launch

    def spy(key, candidates, run, device):
        if len(candidates) > 1:
            seen.append((key, tuple(candidates)))
        return real(key, candidates, run, device)
    monkeypatch.setattr(autotune, "launch", spy)
    return seen


def _torch_and_tuned(cls, inputs: dict, monkeypatch, **dims):
    """Outputs, final states and input gradients of backend='torch' and of backend='triton'
    with every tuned launch at its last candidate; and the tuned launches."""
    monkeypatch.setenv(autotune.ENV, "1")  # (benchmarks/gpu_check.sh runs the tests with it off)
    ref = cls(backend="torch", **dims)
    tri = cls(backend="triton", **dims)
    tri.load_state_dict(ref.state_dict())
    launches = _tuned_launches(monkeypatch)
    results = []
    with autotune.timed_by(_last_wins()):
        for layer in (ref, tri):
            leaves = {n: v.clone().requires_grad_() for n, v in inputs.items()}
            out, state = layer(**leaves, return_state=True)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape)).sum() for o in outs
                       if o.is_floating_point())
            results.append((outs, state, torch.autograd.grad(loss, list(leaves.values()))))
        kept = autotune.kept()
    for key, candidates in launches:
        assert kept[key] == candidates[-1], (key, kept.get(key), candidates)
    return results, launches


def _same(results):
    (outs_r, state_r, grads_r), (outs_t, state_t, grads_t) = results
    for a, b in zip(outs_r, outs_t):
        close(a, b, "output")
    for a, b in zip(state_r.prefix, state_t.prefix):
        if a is not None and b is not None:
            close(a, b, "final state")
    for a, b in zip(grads_r, grads_t):
        close(a, b, "gradient")


@pytest.mark.heavy
def test_the_first_order_scan_tuned_to_the_in_thread_layout_equals_torch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = {"x": torch.randn(2, 37, 130, generator=g), "log_a": -torch.rand(2, 37, 130, generator=g) * 0.5}
    cls = layer_class("linear_recurrence")
    results, launches = _torch_and_tuned(cls, x, monkeypatch)
    _same(results)
    kinds = {(key[0], key[1], candidates) for key, candidates in launches}
    assert kinds == {("first-order", False, triton_scan.LAYOUTS), ("first-order", True, triton_scan.LAYOUTS)}
    assert triton_scan.LAYOUTS == ("split", "in-thread", "narrow")


@pytest.mark.heavy
def test_the_state_tile_tuned_to_more_lanes_and_warps_equals_torch(monkeypatch):
    """64 channels and N = 16: 16 lanes per program ([16, 16] tiles) at 4 warps or 8, or 8 or
    32 lanes per program at 4 warps; the backward keeps its 16 lanes (4 or 8 warps)."""
    g = torch.Generator().manual_seed(1)
    D, N, B, T = 64, 16, 1, 6
    x = {"u": torch.randn(B, T, D, generator=g), "delta": torch.rand(B, T, D, generator=g) * 0.5,
         "A": -torch.rand(1, 1, D, N, generator=g) * 0.5, "B": torch.randn(B, T, 1, N, generator=g),
         "C": torch.randn(B, T, 1, N, generator=g)}
    results, launches = _torch_and_tuned(layer_class("selective_ssm"), x, monkeypatch, N=N)
    _same(results)
    tuned = {(key[1], key[2], candidates) for key, candidates in launches}
    assert ("forward", "state", ((16, 4), (16, 8), (8, 4), (32, 4))) in tuned, tuned
    assert ("backward", "state", ((16, 4), (16, 8))) in tuned, tuned


def test_the_block_scan_tuned_to_more_warps_equals_torch(monkeypatch):
    """welford's block scan over [8, 64] tiles: 4 warps or 8."""
    g = torch.Generator().manual_seed(2)
    x = {"x": torch.randn(2, 8, 64, generator=g)}
    results, launches = _torch_and_tuned(layer_class("welford"), x, monkeypatch)
    _same(results)
    tuned = {(key[1], key[2], candidates) for key, candidates in launches}
    assert ("forward", "lanes", ((1, 4), (1, 8))) in tuned and ("backward", "lanes", ((1, 4), (1, 8))) in tuned, tuned


def test_a_second_call_of_the_same_shape_times_nothing(monkeypatch):
    monkeypatch.setenv(autotune.ENV, "1")
    calls = []

    def clock(fn, device):
        calls.append(1)
        fn()
        return 1.0
    layer = layer_class("welford")(backend="triton")
    x = torch.randn(2, 8, 64)
    with autotune.timed_by(clock), torch.no_grad():
        first = layer(x)
        timed = len(calls)
        second = layer(x)
        assert timed > 0 and len(calls) == timed
    torch.testing.assert_close(first, second, rtol=0, atol=0)
