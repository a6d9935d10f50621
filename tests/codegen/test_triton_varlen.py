"""Packed sequences (`cu_seqlens`) through the generated Triton kernels under TRITON_INTERPRET=1:
one forward launch and one backward launch for every sequence (one program per sequence and
lane tile), each sequence's outputs, final state and gradients equal to running it alone.

The lengths (3, 1, 5, 2) are all different, so the per-length grouping the layer falls back to
would need four launches; block sizes below the longest length exercise the carry between
blocks inside a sequence, and a sequence of one token shorter than a block."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import triton_support  # noqa: E402
from triton_helpers import close as _close, layer_class  # noqa: E402

pytestmark = pytest.mark.triton

LENGTHS = (3, 1, 5, 2)
DIMS = {"selective_ssm": {"N": 4}, "softmax_pool": {"V": 5}, "gla": {"K": 3, "V": 5}, "rwkv6": {"K": 3, "V": 5},
        "welford": {}}
# one-axis kernels (lanes and state tiles), matrix token loops, an exclusive readout (rwkv6)
NAMES = ["linear_recurrence", "selective_ssm", "softmax_pool", "welford", "gla", "rwkv6"]


def _layer(name: str):
    layer = layer_class(name)(backend="triton", **DIMS.get(name, {}))
    layer.use_fast_path = False  # the generated kernels (not a fast path's own kernel)
    layer.triton_block_t = 2  # below the longest sequence: the carry between blocks
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _inputs(layer, B: int, T: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for slot in layer.spec.inputs:
        shape = (B, T, 2) + tuple(int(s) for s in slot.shape(dict(layer.dims)))
        if slot.name in ("log_a", "A", "gk", "w"):
            x = -torch.rand(shape, generator=g) * 0.5
        elif slot.name == "delta":
            x = torch.rand(shape, generator=g) * 0.5
        else:
            x = torch.randn(shape, generator=g)
        out[slot.name] = x.requires_grad_()
    return out


def _launches(monkeypatch) -> list:
    """The kinds of the generated kernels launched ('forward', 'backward', 'step'), in order."""
    seen = []
    real = triton_support._run

    def spy(kernel, kind, *args, **kwargs):
        seen.append(kind)
        return real(kernel, kind, *args, **kwargs)
    monkeypatch.setattr(triton_support, "_run", spy)
    return seen


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _weights(o: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape) + shift


def _state_loss(row, i: int) -> torch.Tensor:
    """A weighted sum of sequence i's final state (weights differ by sequence and field)."""
    total = 0.0
    for j, f in enumerate(row.prefix):
        if f is not None and f.is_floating_point():
            total = total + (f * _weights(f, 2.0 * i + j)).sum()
    return total


def _grads(loss, leaves) -> list:
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))


@pytest.mark.parametrize("continued", [False, True], ids=["fresh", "continued"])
@pytest.mark.parametrize("name", NAMES)
def test_packed_sequences_in_one_launch_equal_each_sequence_alone(name, continued, monkeypatch):
    layer = _layer(name)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    bounds = cu.tolist()
    x = _inputs(layer, 1, bounds[-1], seed=7)
    start = None
    if continued:  # four rows that have each seen three tokens (the initial state's gradient too)
        warm = _inputs(layer, len(LENGTHS), 3, seed=8)
        _, start = layer(**warm, return_state=True)
    launches = _launches(monkeypatch)
    out, state = layer(**x, cu_seqlens=cu, state=start, return_state=True)
    leaves = list(x.values()) + list(layer.parameters())
    if continued:
        leaves += list(warm.values())
    loss = sum((o * _weights(o)).sum() for o in _tuple(out) if o.is_floating_point())
    loss = loss + sum(_state_loss(state[i], i) for i in range(len(LENGTHS)))
    got = _grads(loss, leaves)
    # every sequence in one launch each way (continuing: the warm-up call's backward too)
    assert launches == ["forward", "backward"] + ["backward"] * continued, launches

    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        piece = {n: v[:, lo:hi] for n, v in x.items()}
        row = None if start is None else start[i]
        alone, alone_state = layer(**piece, state=row, return_state=True)
        for o, a in zip(_tuple(out), _tuple(alone)):
            _close(a, o[:, lo:hi], f"{name} sequence {i} output")
        for f, a in zip(state[i].prefix, alone_state.prefix):
            assert (f is None) == (a is None)
            if f is not None:
                _close(a, f, f"{name} sequence {i} final state")
        assert int(state[i].size) == (0 if row is None else 3) + hi - lo

    want = [torch.zeros_like(t) if t is not None else None for t in leaves]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        piece = {n: v[:, lo:hi] for n, v in x.items()}
        if continued:
            _, row = layer(**{n: v[i:i + 1] for n, v in warm.items()}, return_state=True)
        else:
            row = None
        alone, alone_state = layer(**piece, state=row, return_state=True)
        # this sequence's share of the packed loss: its outputs' weights are those of its tokens
        loss = _state_loss(alone_state, i)
        for o, packed in zip(_tuple(alone), _tuple(out)):
            if o.is_floating_point():
                loss = loss + (o * _weights(packed)[:, lo:hi]).sum()
        for k, g in enumerate(_grads(loss, leaves)):
            if g is not None:
                want[k] = want[k] + g
    for k, (w, g) in enumerate(zip(want, got)):
        if g is not None:
            _close(w, g, f"{name} gradient {k}")


POSITIONS = """
op positional[K] {
  state (a: f32[K], h: f32[K]);
  lift (x: f32[K]) { return (0.5 * ones(K), x * (index + 1)); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (ones, zeros);
  readout (s, y: f32[K]) { return s.h * y + index; }
}
"""


def test_positions_restart_per_sequence(tmp_path, monkeypatch):
    """`index` in the lift and the readout counts from each sequence's first token (plus the
    row's count when continuing), as when it runs alone."""
    import psmc
    path = tmp_path / "positional.psm"
    path.write_text(POSITIONS)
    layer = psmc.load(path).__psmc_layers__["positional"](backend="triton", K=3)
    layer.use_fast_path = False  # the generated kernels, not the first-order scan kernel
    layer.triton_block_t = 2
    assert type(layer)._triton_kernels is not None
    cu = torch.tensor([0, 3, 4, 9])
    g = torch.Generator().manual_seed(3)
    x = {"x": torch.randn(1, 9, 3, generator=g), "y": torch.randn(1, 9, 3, generator=g)}
    _, start = layer(**{n: torch.randn(3, 2, 3, generator=g) for n in x}, return_state=True)
    launches = _launches(monkeypatch)
    out, state = layer(**x, cu_seqlens=cu, state=start, return_state=True)
    assert launches == ["forward"]
    for i, (lo, hi) in enumerate(zip([0, 3, 4], [3, 4, 9])):
        alone, row = layer(**{n: v[:, lo:hi] for n, v in x.items()}, state=start[i], return_state=True)
        _close(alone, out[:, lo:hi], f"sequence {i}")
        _close(row.prefix[1], state[i].prefix[1], f"sequence {i} state")


def test_more_sequences_than_the_grid_holds_run_by_length(monkeypatch):
    """Sequences sit on a grid axis (65,535 at most): past it the layer runs them by length."""
    from psmc.runtime import dispatch
    monkeypatch.setattr(dispatch._run_kernels, "most_sequences", 3)
    layer = _layer("linear_recurrence")
    x = _inputs(layer, 1, 11, seed=2)
    cu = torch.tensor([0, 3, 4, 9, 11])
    launches = _launches(monkeypatch)
    with torch.no_grad():
        out = layer(**x, cu_seqlens=cu)
    assert launches == ["forward"] * 4
    for lo, hi in ((0, 3), (3, 4), (4, 9), (9, 11)):
        with torch.no_grad():
            _close(layer(**{n: v[:, lo:hi] for n, v in x.items()}), out[:, lo:hi], f"tokens {lo}..{hi}")
