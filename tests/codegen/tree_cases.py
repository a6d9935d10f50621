"""The programs and helpers of the tree-kernel tests (test_triton_tree.py: the Triton kernels,
test_cpu_tree.py: the C++ ones): the ema example, hand-written tree ops (two fields with a
param, vector fields, an exclusive readout) and programs of the fuzz generator whose plan gets
the kernels (mix: a scalar field beside a vector one, a vector param), each run as three chained calls so the kernels start from counters of 11 and 12
leaves and gradients flow back through the states."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import psmc
from psmc.runtime import tree_kernels
from triton_helpers import layer_class

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from generator import generate  # noqa: E402

HAND_WRITTEN = {
    "blend": """op blend {
  param w: f32;
  state (a: f32, c: f32);
  lift (x: f32, z: f32) { return (x, z); }
  combine (l, r) { return (w * l.a + (1.0 - w) * tanh(r.a) * l.c, l.c * sigmoid(r.c) + r.a * w); }
  readout (s) { return s.a * s.c; }
}""",
    "vec": """op vec[D] {
  param g: f32 = ones;
  state (h: f32[D]);
  lift (x: f32[D]) { return x; }
  combine (l, r) { return tanh(g * l.h + r.h * D / 4.0); }
  readout (s, y: f32[D]) { return s.h * y; }
}""",
    "shifted": """op shifted {
  state (y: f32);
  lift (x: f32) { return x; }
  combine (l, r) { return 0.7 * l.y + 0.3 * r.y * r.y; }
  identity = 0.0;
  assume empty_prefix;
  readout exclusive (p, x: f32) { return p.y + x; }
}""",
    "indexed": """op indexed {
  state (y: f32);
  lift (x: f32) { return x + 0.01 * index; }
  combine (l, r) { return 0.6 * l.y + 0.4 * tanh(r.y); }
  readout (s) { return s.y - 0.001 * index; }
}""",
    "mix": """op mix[D] {
  param w: f32[D] = ones;
  param s: f32 = ones;
  state (g: f32, h: f32[D]);
  lift (x: f32[D], z: f32) { return (z, x); }
  combine (l, r) { return (0.5 * l.g + tanh(r.g) * s, w * l.h * sigmoid(l.g) + (1.0 - w) * r.h + 0.1 * r.g); }
  readout (st) { return st.h * st.g; }
}""",
}
DIMS = {"vec": {"D": 3}, "mix": {"D": 3}}
# fuzz seeds whose plans get the tree kernels (the tests assert it): Triton's hold f32 fields,
# the C++ ones also f64 fields (8, 141)
TRITON_SEEDS = (15, 23, 37, 44, 226)
CPU_SEEDS = (4, 8, 15, 37, 141, 226)
SPLITS = ((0, 11), (11, 12), (12, 37))


def tree_class(name: str, tmp_path: Path):
    """The layer class of a case: an example, a HAND_WRITTEN op or a fuzz seed's program."""
    if name == "ema":
        return layer_class("ema")
    if name in HAND_WRITTEN:
        path = tmp_path / f"{name}.psm"
        path.write_text(HAND_WRITTEN[name])
        return psmc.load(path).__psmc_layers__[name]
    program = generate(int(name))
    path = tmp_path / f"g{name}.psm"
    path.write_text(program.text)
    DIMS[name] = dict(program.dims)
    return psmc.load(path).__psmc_layers__[program.name]


def pair(cls, name: str, backend: str, **options):
    """(the torch backend's layer, the `backend` one), with the same perturbed params."""
    torch.manual_seed(0)
    ref = cls(backend="torch", **DIMS.get(name, {}), **options)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    other = cls(backend=backend, **DIMS.get(name, {}), **options)
    other.load_state_dict(ref.state_dict())
    return ref, other


def inputs_of(layer, lanes: tuple, seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for slot in layer.spec.inputs:
        shape = (2, SPLITS[-1][1]) + lanes + tuple(int(s) for s in slot.shape(dict(layer.dims)))
        if slot.dtype in ("i32", "i64"):
            out[slot.name] = torch.randint(0, 3, shape, generator=g)
        elif slot.dtype == "bool":
            out[slot.name] = torch.rand(shape, generator=g) > 0.5
        else:
            out[slot.name] = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    return out


def chained(layer, inputs: dict) -> tuple:
    """The outputs of three calls, each continuing the state of the one before, joined."""
    state, parts = None, []
    for lo, hi in SPLITS:
        out, state = layer(**{n: x[:, lo:hi] for n, x in inputs.items()}, state=state, return_state=True)
        parts.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(p, dim=1) for p in zip(*parts))


def launches(monkeypatch) -> list:
    """The kinds of the tree kernel calls made from now on ('forward', 'backward'), in order."""
    seen = []
    real = tree_kernels._launch

    def spy(kernel, kind, *args):
        seen.append(kind)
        return real(kernel, kind, *args)

    monkeypatch.setattr(tree_kernels, "_launch", spy)
    return seen


def float_grads(outputs: tuple, wrt: list) -> list:
    """d (a time-weighted sum of the float outputs) / d `wrt` (None where unused)."""
    loss = sum((o * torch.linspace(-1, 1, o.shape[1], dtype=o.dtype).reshape(1, -1, *[1] * (o.dim() - 2))).sum()
               for o in outputs if o.is_floating_point())
    return list(torch.autograd.grad(loss, wrt, allow_unused=True))




def leaves_need_grads(cls) -> bool:
    """Whether the backward kernel runs: the lift reads a float input or the combine a param (a
    lift of constants, with the gradient reaching readout inputs only, runs no backward)."""
    k = getattr(cls, "_tree_kernels", None) or cls._cpu_tree_kernels
    return bool(k.params) or any(s.dtype in ("f32", "f64", "f16", "bf16") for s in cls.spec.lift_inputs)


def compare_chained(ref, other, inputs: dict, close, what: str) -> None:
    """Outputs and every gradient (inputs, params) of `other` against `ref` over the chained calls."""
    got, want = chained(other, inputs), chained(ref, inputs)
    for i, (g, w) in enumerate(zip(got, want)):
        close(w, g, f"{what} output {i}")
    live = [x for x in inputs.values() if x.requires_grad]
    want_grads = float_grads(want, live + list(ref.parameters()))
    got_grads = float_grads(got, live + list(other.parameters()))
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        if w is None:
            assert g is None or not g.any(), f"{what}: gradient {i} where torch has none"
            continue
        close(w, g, f"{what} gradient {i}")


PACKED = (0, 3, 4, 9, 17)  # four sequences of different lengths (one of a single token) in one row


def compare_packed(ref, other, seen: list, close, what: str) -> None:
    """Packed sequences through `other` in one kernel call forward and one backward, fresh and
    continuing a state whose rows have seen 5 leaves: outputs and gradients against `ref` (the
    torch tree, one tree per sequence), and the returned ragged state continued by a step."""
    cu = torch.tensor(PACKED)
    B = len(PACKED) - 1
    dims = dict(ref.dims)
    shape = lambda lead, slot: lead + (2,) + tuple(int(x) for x in slot.shape(dims))  # noqa: E731
    g = torch.Generator().manual_seed(7)
    first = {s.name: torch.randn(shape((B, 5), s), generator=g) for s in ref.spec.inputs}
    packed = {s.name: torch.randn(shape((1, PACKED[-1]), s), generator=g).requires_grad_() for s in ref.spec.inputs}
    token = {s.name: torch.randn(shape((B,), s), generator=g) for s in ref.spec.inputs}
    for fresh in (True, False):
        kwargs = {} if fresh else {"state": other(**first, return_state=True)[1]}
        ref_kwargs = {} if fresh else {"state": ref(**first, return_state=True)[1]}
        before = len(seen)
        got, got_state = other(**packed, cu_seqlens=cu, return_state=True, **kwargs)
        assert seen[before:] == ["forward"], f"{what}: {seen[before:]}"  # every sequence in one call
        want, want_state = ref(**packed, cu_seqlens=cu, return_state=True, **ref_kwargs)
        close(want, got, f"{what} packed output (fresh={fresh})")
        wrt = list(packed.values())
        before = len(seen)
        for w, gg in zip(float_grads((want,), wrt + list(ref.parameters())),
                         float_grads((got,), wrt + list(other.parameters()))):
            if w is not None:
                close(w, gg, f"{what} packed gradient (fresh={fresh})")
        # one backward call for the packed call, and one more for the call that made the state
        # when params reached it (the gradient flows on through the state into that call)
        params = any(p.requires_grad for p in other.parameters())
        assert seen[before:].count("backward") == (1 if fresh or not params else 2), f"{what}: {seen[before:]}"
        close(ref.step(want_state, **token)[0], other.step(got_state, **token)[0], f"{what} step after packed")


def compare_cache_steps(ref, other, seen: list, close, what: str, dtype=torch.float32) -> None:
    """A TreeCache token is one call of `other`'s step kernel for every row, each row at its
    own count (a packed prefill of four lengths, then 20 tokens: every row crosses several
    levels), equal to the torch push of the same cache (`ref`); the cache handed in is left as
    it was. Under no_grad, as serving runs (a token autograd records runs the torch push)."""
    from psmc.runtime.state import TreeCache
    dims = dict(ref.dims)
    g = torch.Generator().manual_seed(11)
    shape = lambda lead, slot: lead + (2,) + tuple(int(x) for x in slot.shape(dims))  # noqa: E731
    draw = lambda lead, slot: torch.randn(shape(lead, slot), generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    with torch.no_grad():
        _, state = ref(**{s.name: draw((1, 17), s) for s in ref.spec.inputs}, cu_seqlens=torch.tensor(PACKED),
                       return_state=True)
        want = got = TreeCache.of(state, 60)
        before = len(seen)
        for _ in range(20):
            token = {s.name: draw((4,), s) for s in ref.spec.inputs}
            held = [r.clone() for r in got.roots]
            w, want = ref.step(want, **token)
            o, got_next = other.step(got, **token)
            assert all(torch.equal(a, b) for a, b in zip(held, got.roots)), f"{what}: the step wrote the cache it was given"
            got = got_next
            for a, b in zip(w if isinstance(w, tuple) else (w,), o if isinstance(o, tuple) else (o,)):
                close(a, b, f"{what} cache step")
    assert seen[before:] == ["step"] * 20 and got.sizes == want.sizes == [23, 21, 25, 28]
    for table in ("roots", "folds"):  # the occupied slots (the others hold stale values)
        for b, n in enumerate(got.sizes):
            for level in range(n.bit_length()):
                if (n >> level) & 1:
                    for x, y in zip(getattr(want, table), getattr(got, table)):
                        close(x[b, level], y[b, level], f"{what} {table}[{b}, {level}]")
