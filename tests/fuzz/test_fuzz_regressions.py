"""One regression test per failure class the random-program fuzzer found (issue 11).

Each program is the smallest instance of its class; each test fails on the commit before its
fix. The layer tests run the whole differential runner (psmc check, parallel vs streaming vs
continued vs decode vs the IR reference, fast path vs generic, gradients, float32, Triton
where planned) on a config that reproduced the failure.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

import runner  # first: puts tests/codegen on sys.path
from generator import Program
from runner import Config, run_program

import conditioning  # noqa: E402
import layer_reference  # noqa: E402  (tests/codegen)
import ties  # noqa: E402

import psmc
from psmc.errors import PsmcError
from psmc.ir import ops_from_file, ops_from_source

SMALL = Config(batch=2, time=9, lanes=(2,), broadcast=((False,), (True,), (False,), (True,)), block=4, split=0.4,
               grads=True, f32=True, triton=False, seed=3)
LONG = Config(batch=2, time=150, lanes=(), broadcast=(), block=64, split=0.3, grads=False, f32=True, seed=4)


def run(text: str, name: str, dims: dict, tmp_path, config: Config = SMALL, kinds: dict | None = None):
    run_program(Program(0, name, text, dims, kinds or {}), config, tmp_path)


# ----------------------------------------------------------------------------- layers
SCALAR_DECAY = """
op scalar_decay[K, D] {
  state (a: f64, h: f64[K, D]);
  lift (x: f64, u: f64[K, D]) { return (exp(x), u); }
  combine (l, r) { return (l.a * r.a, r.h + l.h * r.a); }
  identity = (ones, zeros);
  readout (s, y: f64[K, D]) { return tanh(s.h) - y; }
}
"""


@pytest.mark.parametrize("config", [SMALL, LONG], ids=["short", "chunked"])
def test_scalar_decay_beside_a_matrix_state_in_the_first_order_fast_path(tmp_path, config):
    # the decay [B, T] was broadcast right-aligned against [B, T, K, D]: a crash for long
    # sequences, silently wrong values for short ones whenever B matched D
    run(SCALAR_DECAY, "scalar_decay", {"K": 3, "D": 2}, tmp_path, config, {"x": "log_gate"})


MIXED_MATMUL = """
op mixed_matmul[D] {
  param W: f64[D, D] = normal(0.3);
  state (h: f32[D]);
  lift (x: f32[D]) { return x; }
  combine (l, r) { return tanh(l.h @ W + r.h); }
}
"""


def test_matmul_between_f32_and_f64_operands(tmp_path):
    run(MIXED_MATMUL, "mixed_matmul", {"D": 3}, tmp_path)


MIXED_ATTENTION = """
op mixed_attention[C, D] {
  chunk C;
  state (X: f32[C, D]);
  lift (x: f64[C, D]) { return x; }
  combine (l, r) { return r.X; }
  identity = zeros;
  assume empty_prefix;
  readout exclusive (p, y: f64[C, D]) { return attention(y, p.X, p.X) + attention(p.X, y, y, causal=true); }
}
"""


def test_attention_between_f32_and_f64_operands(tmp_path):
    run(MIXED_ATTENTION, "mixed_attention", {"C": 2, "D": 2}, tmp_path)


STATIC_CONDITION = """
op static_condition[K] {
  state (x: f32[K]);
  lift (u: f32[K]) { return u; }
  combine (l, r) { return tanh(exp(where(K > 1, 0.5, l.x)) * r.x + (if 1 < 2 then 0.25 else l.x)); }
}
"""


def test_where_and_if_with_a_compile_time_condition_give_tensors(tmp_path):
    run(STATIC_CONDITION, "static_condition", {"K": 2}, tmp_path)


CONSTANT_DECAY = """
op constant_decay[K, V] {
  state (a: f32[K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V]) { return (0.9, outer(k, v)); }
  combine (l, r) { return (l.a * r.a, r.a[:, None] * l.S + r.S); }
  identity = (ones, zeros);
  readout (s, q: f32[K]) { return q @ s.S; }
}
"""


def test_constant_decay_on_the_chunkwise_path(tmp_path):
    run(CONSTANT_DECAY, "constant_decay", {"K": 2, "V": 3}, tmp_path)


INDEX_AND_LITERALS_F64 = """
op index_f64[K] {
  state (E: f64[K, K], h: f64[K], n: f64);
  lift (k: f64[K]) { return (0.9 * eye(K) + 0.05 * outer(k, k), 0.01 * index * k, 1 / 3); }
  combine (l, r) { return (r.E @ l.E, r.E @ l.h + r.h, l.n + r.n); }
  identity = (eye(K), zeros, 0);
  readout (s, y: f64) { return sum(s.h) * y + s.n * 0.1; }
}
"""


def test_index_and_literals_are_computed_in_float64_inside_an_f64_op(tmp_path):
    # `0.9 * eye(K)`, `0.01 * index` and `1 / 3` were materialised in float32 and rounded:
    # parallel, stream and reference then differ at 1e-9 .. 1e-7 relative
    run(INDEX_AND_LITERALS_F64, "index_f64", {"K": 2}, tmp_path)


INT_LITERALS = """
op int_literals {
  state (n: i32, s: f64, c: f32);
  lift (x: f64) { return (1, x, 2); }
  combine (l, r) { return (l.n + r.n, l.s + r.s, l.c + r.c); }
  identity = (0, 0, 0.0);
  readout (st) { return (st.n, st.s, st.c); }
}
"""


def test_int_literal_into_a_float_field_and_float_identity_literals(tmp_path):
    # `_ops.cast(1, cx.dt['i32'])` indexed a torch.dtype as if it were a string
    run(INT_LITERALS, "int_literals", {}, tmp_path)


def test_one_scalar_field_with_an_exclusive_readout(tmp_path):
    text = """
op exclusive_scalar {
  state (s: f64);
  lift (x: f64) { return tanh(x); }
  combine (l, r) { return r.s + l.s; }
  identity = 0;
  readout exclusive (p) { return p.s; }
}
"""
    run(text, "exclusive_scalar", {}, tmp_path)



BOOL_LITERAL_LIFT = """
op bool_literal[D] {
  state (f: bool, g: f32[D]);
  lift () { return (false, 0.25 * ones(D)); }
  combine (l, r) { return (l.f or r.f, where(r.f, r.g, l.g + r.g)); }
  readout (s, y: f32[D]) { return sum(s.g * y); }
}
"""


def test_a_bool_literal_lifted_into_a_bool_field_in_a_triton_kernel(tmp_path):
    # the kernel tiled it as tl.broadcast_to((False) != 0, ...): a Python bool, no tensor
    # (AttributeError: 'bool' object has no attribute 'type' under the Triton interpreter)
    config = Config(batch=2, time=2, lanes=(3,), broadcast=((False,),), block=4, split=0.35, grads=False,
                    f32=True, triton=True, seed=1)
    run(BOOL_LITERAL_LIFT, "bool_literal", {"D": 2}, tmp_path, config)



# `1 * ones(D)` folds to a float fill of 1; inside sigmoid the kernel wrote tl.sigmoid(1), an
# int tile (campaign seed 601760: "numpy data itemsize (64 bits) exceeds ... int32")
FOLDED_ONES = """
op folded_ones[D] {
  state (p1: f32[D], t3: f32[D]);
  lift (x2: f32[D]) { return (exp(0.2 * x2), x2); }
  combine (l, r) { let e4 = abs((r.t3 - r.t3)); return (r.p1 * l.p1, tanh(e4 * sigmoid(1 * ones(D)))); }
  readout (s, x2: f32[D]) { return (s.p1, s.t3 + x2); }
}
"""


def test_a_folded_float_constant_is_a_float_in_a_triton_kernel(tmp_path):
    config = Config(batch=2, time=3, lanes=(), broadcast=(), block=64, split=0.71, grads=True, f32=True,
                    triton=True, seed=3240)
    run(FOLDED_ONES, "folded_ones", {"D": 3}, tmp_path, config)


# an int literal straight into a float builtin (`fh5(1, 2)` inlined: 1 * sigmoid(2)): the kernel
# wrote tl.sigmoid(2) on an int (campaign seed 2900739, in the tree kernel's Agg: "numpy data
# itemsize (64 bits) exceeds dtype primitive_bitwidth (32 bits) for triton type int32")
INT_INTO_MATH = """
fn fh5(a, b) { return a * sigmoid(b); }
op int_into_math {
  state (t1: f32, t2: f32);
  lift (x6: f32) { return (x6, x6); }
  combine (l, r) { return (tanh(r.t1 - 2 * abs(l.t2)), tanh(if 2 < l.t1 then l.t2 else fh5(1, 2))); }
}
"""


def test_an_int_literal_into_a_float_builtin_in_a_triton_kernel(tmp_path):
    config = Config(batch=1, time=4, lanes=(1,), broadcast=((False,),), block=4, split=0.76, grads=True, f32=True,
                    triton=True, seed=42584)
    run(INT_INTO_MATH, "int_into_math", {}, tmp_path, config)


# tanh in Triton was 2 sigmoid(2x) - 1, which keeps no relative precision for small x: the
# comparison tanh(e6) <= e6 flipped where e6 was tiny (campaign seed 3100059, a tree kernel;
# "triton vs torch, output 2: off by 4.54e+03x the tolerance")
SMALL_TANH = """
fn fh7(a, b) { return if true then a else b; }
op small_tanh[D] {
  state (m1: f32, z2: f32, t5: f32);
  lift (x3: f32, x8: f32) { return (x3, 1.0, x8); }
  combine (l, r) { let mx4 = max(l.m1, r.m1); let e6 = silu((r.t5 * l.t5)); return (mx4, l.z2 * exp(l.m1 - mx4) + r.z2 * exp(r.m1 - mx4), tanh(fh7((if tanh(e6) <= e6 then l.t5 else (if D > 1 then r.t5 else l.t5)), l.t5))); }
  identity = (-inf, 0.0, 0.0);
  assume empty_prefix;
}
"""


def test_triton_tanh_keeps_the_relative_precision_of_small_arguments(tmp_path):
    config = Config(batch=1, time=17, lanes=(3,), broadcast=((True,), (False,), (False,), (True,), (False,),
                    (False,), (False,), (False,)), block=4, split=0.412, grads=True, f32=True, triton=False,
                    seed=64004)
    run(SMALL_TANH, "small_tanh", {"D": 2}, tmp_path, config)


F64_CPP = """
op f64_cpp {
  state (m: f64, z: f64, acc: f64);
  lift (x: f64) { return (x, 1.0, x); }
  combine (l, r) {
    let mx = max(l.m, r.m);
    return (mx, l.z * exp(l.m - mx) + r.z * exp(r.m - mx), l.acc * exp(l.m - mx) + r.acc * exp(r.m - mx));
  }
  readout (s) { return s.acc / s.z; }
}
"""


def test_the_cpp_kernels_compute_an_f64_op_in_double(tmp_path):
    # backend='cpu' chose its float/double template from the dtype f32 computes in: an op with
    # no f32 input or param (all f64 here) ran the float template, its f64 inputs rounded to
    # float32 (2e-8 off torch, 1e-9 relative allowed); backend='auto' picks these kernels on CPU
    run(F64_CPP, "f64_cpp", {}, tmp_path, dataclasses.replace(SMALL, cpp=True))


HALF_F64_OUTPUT = """
op half_f64_output[K] {
  state (s: f32[K], t: f64);
  lift (x: f32[K], y: f64) { return (x, y); }
  combine (l, r) { return (l.s + r.s, l.t + r.t); }
  identity = (zeros, 0.0);
  readout (p) { return (p.s, p.t); }
}
"""


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_half_inputs_keep_f64_outputs_in_float64(tmp_path, half):
    # bf16/f16 inputs cast every float output to the half dtype, f64-declared ones too
    # (values declared f64 are float64 in every call): now only the f32-declared outputs follow
    # the inputs' dtype
    run(HALF_F64_OUTPUT, "half_f64_output", {"K": 3}, tmp_path, dataclasses.replace(SMALL, half=half))


# ----------------------------------------------------------------------------- comparisons at a tie
# (l - r) + abs(r) equals l for r >= 0 (exactly, in IEEE too: l - r is exact there); the
# canonical IR computes (abs(r) + l) + (-1 * r), one rounding away, and the branch flips
REASSOCIATED_TIE = """
op reassoc {
  state (t: f64);
  lift (u: f64) { return u; }
  combine (l, r) { return sigmoid(if (l.t - r.t) + abs(r.t) > l.t then -0.3 else abs(l.t) - silu(r.t)); }
}
"""
# 0.01 * index - 0.2 is 0 at index 20 in float64, not in float32: the branch differs there
FLOAT32_TIE = """
op tie32 {
  state (t: f32);
  lift () { return 0.01 * index - 0.2; }
  combine (l, r) { return tanh(where(0.0 <= r.t, softplus(r.t), r.t + l.t)); }
  readout (s, y: f32) { return s.t + y; }
}
"""


def test_a_comparison_at_a_tie_flipped_by_reassociation_is_not_a_mismatch(tmp_path):
    # the reference check failed (0.142 off): the layer computes the canonical IR, whose
    # reassociated sum rounds the tie the other way; now forgiven, and only because the layer
    # equals the canonical IR's reference there
    config = Config(batch=2, time=3, lanes=(), broadcast=(), block=64, split=0.5, grads=False, f32=False, seed=3)
    run(REASSOCIATED_TIE, "reassoc", {}, tmp_path, config)


def test_a_comparison_at_a_tie_flipped_by_float32_is_not_an_f32_mismatch(tmp_path):
    # the float32 check failed (relative RMS 0.289): a discontinuity at an exact tie, not a
    # value computed in lower precision than declared
    config = Config(batch=1, time=24, lanes=(), broadcast=(), block=4, split=0.4, grads=False, f32=True, seed=1)
    run(FLOAT32_TIE, "tie32", {}, tmp_path, config)


def test_ties_measures_how_close_a_comparison_came():
    t = torch.tensor([0.45063695585370630, 0.48160295861398017, 0.1], dtype=torch.float64)
    op = ops_from_source(REASSOCIATED_TIE, "reassoc.psm")[0]
    assert ties.float_comparisons(op)
    assert ties.nearest_tie(op, {}, {}, {"u": t[:2]}, True) == 0.0  # (l - r) + |r| == l exactly
    far = ties.nearest_tie(op, {}, {}, {"u": torch.tensor([0.5, -0.25], dtype=torch.float64)}, True)
    assert far == pytest.approx(0.5)  # (0.5 + 0.25) + 0.25 against 0.5: gap 0.5 / 1
    sums = ops_from_source("op s { state (t: f64); combine (l, r) { return l.t + r.t; } }", "s.psm")[0]
    assert not ties.float_comparisons(sums)


def test_ties_forgive_nothing_away_from_a_tie_or_where_the_layer_is_wrong():
    op = ops_from_source(FLOAT32_TIE, "tie32.psm")[0]
    lead = (1, 24)
    y = torch.linspace(-0.5, 0.5, 24, dtype=torch.float64)[None]
    want = layer_reference.reference_outputs(op, {}, {}, {"y": y[0]}, True)[0][None]
    # the lane meets the tie at index 20: an output off there is forgiven ...
    assert ties.float32_at_ties(op, {}, {}, {"y": y}, (want.float() + 0.1,), (want,), lead, True, 1e-4)
    # ... but not when the sequence stops before index 20 (no tie on the lane)
    short = want[:, :12]
    assert not ties.float32_at_ties(op, {}, {}, {"y": y[:, :12]}, (short.float() + 0.1,), (short,), (1, 12), True,
                                    1e-4)
    # a layer at a tie that does not even equal the canonical IR's reference is still a failure
    reassoc = ops_from_source(REASSOCIATED_TIE, "reassoc.psm")[0]
    u = torch.tensor([0.45063695585370630, 0.48160295861398017], dtype=torch.float64)

    def check(want):
        raise runner.Failure("mismatch", "the layer is wrong")
    with pytest.raises(runner.Failure):
        ties.reference_at_a_tie(reassoc, {}, {}, {"u": u}, True, check)
    # and an op without a float comparison is never forgiven
    sums = ops_from_source("op s { state (t: f64); lift (u: f64) { return u; } "
                           "combine (l, r) { return l.t + r.t; } }", "s.psm")[0]
    assert not ties.reference_at_a_tie(sums, {}, {}, {"u": u}, True, check)


# S = E S + c^2 11^T with E = I - c^2/4 11^T, c = 0.01 t - 0.2: the fixed point 2 attracts while
# c < 2 and repels after (|1 - c^2 / 2| up to 2.9 per token): rounding grows to O(1e5) by T = 300
UNSTABLE_AFFINE = """
op unstable[K, V] {
  state (E1: f64[V, V], S2: f64[V, K], s3: f64[V]);
  lift () { return (eye(V) - 0.5 * 0.5 * outer((0.01 * index - 0.2) * ones(V), (0.01 * index - 0.2) * ones(V)),
                    outer((0.01 * index - 0.2) * ones(V), (0.01 * index - 0.2) * ones(K)),
                    (0.01 * index - 0.2) * ones(V)); }
  combine (l, r) { return (r.E1 @ l.E1, r.E1 @ l.S2 + r.S2, l.s3 + r.s3); }
  identity = (eye(V), zeros, zeros);
  readout (s, y4: f64) { return (s.S2, tanh(y4)); }
}
"""
UNSTABLE_CONFIG = Config(batch=2, time=300, lanes=(2, 1), broadcast=((False, True), (False, False)), block=64,
                         split=0.6066, grads=False, f32=False, seed=53611)
# a tree combine that subtracts nearly equal operands and multiplies by 3 per level
CANCELLING_TREE = """
op cancelling[V] {
  param W3: f64[V, V] = ones;
  param W4: f32[V] = ones;
  state (t1: f32[V], t2: f32);
  lift () { return ((0.01 * index - 0.2) * ones(V), (0.01 * index - 0.2)); }
  combine (l, r) { return (tanh((W3 @ ((l.t1 * W4) - r.t1))), tanh(-1)); }
  readout (s, y5: f32) { return s.t1 + y5 + 0.001 * index; }
}
"""
CANCELLING_CONFIG = Config(batch=1, time=150, lanes=(1,), broadcast=((False,),), block=64, split=0.2958,
                           grads=False, f32=True, seed=55403)


@pytest.mark.parametrize("text, name, dims, config", [
    (UNSTABLE_AFFINE, "unstable", {"K": 2, "V": 2}, UNSTABLE_CONFIG),
    (CANCELLING_TREE, "cancelling", {"V": 3}, CANCELLING_CONFIG),
], ids=["stream-vs-parallel", "float32"])
def test_an_op_that_amplifies_rounding_is_held_to_its_conditioning(tmp_path, monkeypatch, text, name, dims, config):
    # seed 207046: stream and parallel pass 1.8e5 apart, both within rounding of an unstable
    # recurrence; seed 510066: float32 1.3e-2 off float64 with every operation correctly rounded.
    # Passes now, and fails when the runner allows nothing for conditioning (as it did)
    run(text, name, dims, tmp_path, config)
    monkeypatch.setattr(conditioning, "AMPLIFICATION", 0.0)
    with pytest.raises(runner.Failure, match="stream vs parallel" if name == "unstable" else "relative RMS error"):
        run(text, name, dims, tmp_path, config)


# seed 740138: E2 is a product of 300 rank-one updates I - 0.25 x x^T whose factor along x falls
# to 1e-87 and then grows by 1e80. float64 holds every value (at most 1.7e30); in float32 the
# rounding left along that direction is amplified past float32's range, by the stream and the
# parallel pass alike: an overflow the op forces, excused only because the float64 spread of
# float32-sized perturbations itself leaves the range
OVERFLOWING_PRODUCT = """
op overflowing[K] {
  state (E2: f32[K, K]);
  lift () { return eye(K) - 0.5 * 0.5 * outer((0.01 * index - 0.2) * ones(K), (0.01 * index - 0.2) * ones(K)); }
  combine (l, r) { return r.E2 @ l.E2; }
  readout (s, y: f32) { return (s.E2, tanh(y)); }
}
"""


def test_a_float32_overflow_is_excused_only_where_rounding_alone_leaves_the_range(tmp_path, monkeypatch):
    config = Config(batch=2, time=300, block=64, grads=False, f32=True, seed=62427)
    run(OVERFLOWING_PRODUCT, "overflowing", {"K": 3}, tmp_path, config)
    monkeypatch.setattr(conditioning, "no_digit", lambda want, spread, top: torch.zeros_like(spread, dtype=torch.bool))
    # (no overflow excused: the float32 check fails)
    with pytest.raises(runner.Failure, match="relative RMS error inf"):
        run(OVERFLOWING_PRODUCT, "overflowing", {"K": 3}, tmp_path, config)


# seed 1701680: the same rank-one updates, and S2 sums subrange products of them (up to 1e53)
# that cancel to at most ~1e29 in float64. float32 holds no digit of it: the stream is off by 1e8
# relative, the parallel pass overflows on a subrange product. Excused only where the float64
# spread of float32-sized perturbations is at least the value itself (conditioning.no_digit)
CANCELLING_PRODUCTS = """
op cancelling[V] {
  state (E1: f32[V, V], S2: f32[V, V]);
  lift () { return (eye(V) - 0.5 * 0.5 * outer((0.01 * index - 0.2) * ones(V), (0.01 * index - 0.2) * ones(V)),
                    outer((0.01 * index - 0.2) * ones(V), 0.25 * ones(V))); }
  combine (l, r) { return (r.E1 @ l.E1, r.E1 @ l.S2 + r.S2); }
  identity = (eye(V), zeros);
  readout exclusive (p, y3: f32) { return p.S2 * y3; }
}
"""


def test_a_float32_overflow_is_excused_where_float32_holds_no_digit(tmp_path, monkeypatch):
    config = Config(batch=1, time=300, lanes=(1,), block=64, split=0.506690259938099, grads=False, f32=True,
                    seed=21584)
    run(CANCELLING_PRODUCTS, "cancelling", {"V": 3}, tmp_path, config)
    # the earlier rule (excused only past float32's range) fails it, as the campaign did
    monkeypatch.setattr(conditioning, "no_digit", lambda want, spread, top: spread > top)
    with pytest.raises(runner.Failure, match="relative RMS error inf"):
        run(CANCELLING_PRODUCTS, "cancelling", {"V": 3}, tmp_path, config)


# seed 1900800: the same updates in f32 fields, but no f32 input: the runner's reference layer
# computes them in float32 too (only the f64 input y5 is float64), and its parallel pass (the
# paper's tree: t1's combine is not associative) and its stream both overflow at t = 298, where
# the float64 state is ~1e29 and float32's roundoff, grown along x, passes float32's range.
# Excused only where the IR bodies in float64, shaken at float32's roundoff, spread that far
# (runner._float32_holds_no_digit); the other checks are then skipped ("f32-no-digit")
F32_FIELDS_PRODUCT = """
fn fh2(a, b) { return max(a, b) - 0.5 * min(a, b); }
op f32_fields[K, V] {
  state (t1: f32, E3: f32[V, V], S4: f32[V, K]);
  lift () { return (0.25, eye(V) - 0.5 * 0.5 * outer((0.01 * index - 0.2) * ones(V), (0.01 * index - 0.2) * ones(V)), outer((0.01 * index - 0.2) * ones(V), 0.25 * ones(K))); }
  combine (l, r) { return (tanh(((l.t1 - fh2(l.t1, 0.25)) * (if false then logsigmoid(r.t1) else r.t1))), r.E3 @ l.E3, r.E3 @ l.S4 + r.S4); }
  identity = (0.0, eye(V), zeros);
  assume empty_prefix;
  readout (s, y5: f64) { return (s.S4, tanh(s.t1) - y5); }
}
"""


def test_a_float32_reference_overflow_is_excused_where_float64_bodies_spread_past_the_range(tmp_path, monkeypatch):
    config = Config(batch=2, time=300, block=64, split=0.18356198902065546, grads=False, f32=True, seed=5343)
    program = Program(0, "f32_fields", F32_FIELDS_PRODUCT, {"K": 3, "V": 3}, {})
    info = run_program(program, config, tmp_path)
    assert "f32-no-digit" in info["checked"] and "stream" not in info["checked"]
    # a non-finite output float32 holds a digit of stays a failure
    monkeypatch.setattr(conditioning, "no_digit", lambda want, spread, top: torch.zeros_like(spread, dtype=torch.bool))
    with pytest.raises(runner.Failure, match="non-finite output from finite inputs"):
        run_program(program, config, tmp_path)


def test_float64_bodies_spread_nothing_where_the_op_is_well_conditioned(tmp_path):
    """fold_spread of a contracting first-order recurrence: float64 values equal to the IR
    reference and a spread of a few float32 roundoffs, so no_digit excuses nothing there."""
    from layer_reference import Bodies, left_fold_prefixes, reference_outputs
    path = tmp_path / "scalar_decay.psm"
    path.write_text(SCALAR_DECAY)
    op = next(op for op in ops_from_file(path) if op.name == "scalar_decay")
    gen = torch.Generator().manual_seed(1)
    lane = {"x": -torch.rand(40, dtype=torch.float64, generator=gen), "u": torch.randn(40, 3, 2, dtype=torch.float64,
                                                                                        generator=gen),
            "y": torch.randn(40, 3, 2, dtype=torch.float64, generator=gen)}
    steps = [{n: v[t] for n, v in lane.items()} for t in range(40)]
    (want,), (spread,) = conditioning.fold_spread(Bodies(op, {"K": 3, "D": 2}, {}), steps, runner.UNIT32,
                                                 left_fold_prefixes)
    (ref,) = reference_outputs(op, {"K": 3, "D": 2}, {}, lane, tree=False)
    torch.testing.assert_close(want, ref, rtol=1e-12, atol=1e-12)
    assert 0 < spread.max() < 100 * runner.UNIT32
    assert not conditioning.no_digit(want, spread, runner.F32_TOP).any()


def test_conditioning_allows_nothing_to_a_well_conditioned_op_or_a_non_finite_stream(tmp_path):
    path = tmp_path / "scalar_decay.psm"
    path.write_text(SCALAR_DECAY)
    layer = psmc.load(path).scalar_decay(K=3, D=2).double()
    gen = torch.Generator().manual_seed(0)
    inputs = {"x": -0.5 * torch.rand(2, 200, generator=gen, dtype=torch.float64),
              "u": torch.rand(2, 200, 3, 2, generator=gen, dtype=torch.float64) - 0.5,
              "y": torch.rand(2, 200, 3, 2, generator=gen, dtype=torch.float64)}
    want = layer(**inputs)
    spread = conditioning.Spread(layer, inputs, (2,), 200).of(runner.UNIT64)[0]
    assert 0 < spread.max() < 1e-14 * want.abs().max()  # a few ulps: contracting decay
    # a float32 rounding inside this float64 op (1e-8 relative) is still a failure
    off = want * (1 + 1e-8 * torch.sign(torch.randn(want.shape, generator=gen, dtype=torch.float64)))
    assert not conditioning.within((off,), (want,), (spread,), runner.RTOL64, runner.ATOL64)
    assert conditioning.within((want,), (want,), (spread,), runner.RTOL64, runner.ATOL64)
    # a stream that goes non-finite earns no allowance
    bad = dict(inputs, x=inputs["x"].clone())
    bad["x"][0, 100] = float("inf")
    infinite = conditioning.Spread(layer, bad, (2,), 200).of(runner.UNIT64)[0]
    assert torch.isfinite(infinite).all() and not conditioning.within((off,), (want,), (infinite,), 1e-9, 1e-11)


# sign() is a jump like a comparison: 0.01 * index - 0.2 is 0 at index 20 in float64 (the
# interpreter) and not in float32 (the layer, whose t1 is declared f32): sign gives 0 vs +-1
SIGN_TIE = """
op sign_tie[D, K] {
  state (t1: f32[D], t2: f64);
  lift () { return ((0.01 * index - 0.2) * ones(D), 0.25); }
  combine (l, r) { return (tanh((sigmoid(sign(r.t1)) - ((r.t1 - l.t2) * (1 * ones(D))))),
                           tanh((sum(sigmoid((1 * ones(K)))) - softplus(gelu(l.t2))))); }
  readout (s, y3: f64) { return (s.t2, s.t1, tanh(y3)); }
}
"""


def test_sign_at_zero_is_a_tie_like_a_comparison(tmp_path, monkeypatch):
    # campaign seed 300601: parallel (float32) vs the float64 reference off by 0.07 at index 20
    config = Config(batch=2, time=24, lanes=(2,), broadcast=((False,), (False,)), block=4, split=0.85,
                    grads=True, f32=True, seed=18323)
    run(SIGN_TIE, "sign_tie", {"D": 2, "K": 2}, tmp_path, config)
    monkeypatch.setattr(ties, "JUMPS", ties.COMPARISONS)  # sign not taken for a jump, as before
    with pytest.raises(runner.Failure, match="IR reference"):
        run(SIGN_TIE, "sign_tie", {"D": 2, "K": 2}, tmp_path, config)


def test_a_float64_twin_holds_the_reference_layers_params_exactly(tmp_path):
    # the backend checks compare a twin layer with the float64 reference: a float64 twin whose
    # f32-declared params stayed float32 rounded per-lane params (1e-8 off) and returned float32
    # gradients, so the C++ backend looked wrong (found while adding per-lane C++ kernels)
    path = tmp_path / "low_rank.psm"
    path.write_text(SCALAR_DECAY.replace("op scalar_decay[K, D] {", "op scalar_decay[K, D] {\n  param w: f32 = ones;")
                    .replace("exp(x)", "exp(x * w)"))
    cls = psmc.load(path).scalar_decay
    program = Program(0, "scalar_decay", "", {"K": 2, "D": 2}, {})
    ref = cls(lanes=(3,), per_lane=True, K=2, D=2).double()
    with torch.no_grad():
        ref.p_w.mul_(torch.tensor([0.75, 1.0 / 3.0, 1.25], dtype=torch.float64))
    for dtype in (torch.float64, torch.float32):
        twin = runner._twin(cls, program, ref, "torch", dtype)
        assert twin.p_w.dtype == dtype and twin.per_lane == ("w",)
        assert torch.equal(twin.p_w, ref.p_w.to(dtype))


# ----------------------------------------------------------------------------- psmc check
def test_a_transcendental_counterexample_prints(tmp_path):
    path = tmp_path / "tanh.psm"
    path.write_text("""
op tanh_sum[K] {
  state (x: f32[K]);
  combine (l, r) { return tanh(l.x + r.x); }
}
""")
    done = subprocess.run([sys.executable, "-m", "psmc.cli", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "refuted" in done.stdout and "internal error" not in done.stdout + done.stderr


def test_a_transcendental_identity_is_declared_unverified(tmp_path, capsys):
    # a mutant's `identity = (tanh(D), zeros)`: the exact identity check turned tanh(3) into a
    # Fraction and crashed (internal error); a non-rational value cannot be checked exactly
    from psmc.cli import main as psmc_main
    path = tmp_path / "t.psm"
    path.write_text("op t[D] {\n  state (x: f32[D]);\n  lift (u: f32[D]) { return u; }\n"
                    "  combine (l, r) { return l.x + r.x; }\n  identity = tanh(D);\n}\n")
    assert psmc_main(["check", str(path)]) == 0
    out = capsys.readouterr()
    assert "internal error" not in out.out + out.err
    assert "not verified: it holds tanh(1), not a rational number" in out.out


def test_a_param_in_identity_is_a_located_error():
    text = "op p[K] {\n  param w: f32[K] = ones;\n  state (x: f32[K]);\n  combine (l, r) { return l.x * r.x; }\n" \
           "  identity = w;\n}\n"
    with pytest.raises(PsmcError) as err:
        ops_from_source(text, "p.psm")
    assert (err.value.line, err.value.col) == (5, 14)
    assert "identity cannot read param 'w'" in str(err.value)


@pytest.mark.parametrize("body, shape", [
    ("lift (k: f32[K]) { return k; } combine (l, r) { return l.S + r.S; }", "[K]"),
    ("lift (k: f32[K]) { return k[:, None] * ones(K, K); } combine (l, r) { return l.S[0] + r.S[1]; }", "[K]"),
    ("lift (k: f32[K]) { return outer(k, k); } combine (l, r) { return (l.S + r.S)[:, 0:1]; }", "[K, 1]"),
])
def test_a_smaller_non_scalar_value_for_a_field_is_a_located_error(body, shape):
    # it was silently repeated along the missing axes: almost always a forgotten outer
    text = f"op b[K] {{\n  state (S: f32[K, K]);\n  {body}\n}}\n"
    with pytest.raises(PsmcError) as err:
        ops_from_source(text, "b.psm")
    assert err.value.line == 3
    assert f"gives shape {shape} for field 'S' of shape [K, K]" in str(err.value)
    assert "outer" in str(err.value)


def test_scalars_and_literals_still_broadcast_to_a_field(tmp_path):
    path = tmp_path / "scalars.psm"
    path.write_text("op s[K] { state (S: f32[K, K]); lift (x: f32) { return x; } "
                    "combine (l, r) { return l.S + r.S; } identity = 0.0; }\n")
    layer = psmc.load(path).s(K=2)
    x = torch.randn(1, 4)
    want = torch.cumsum(x, 1)[..., None, None].expand(1, 4, 2, 2)
    torch.testing.assert_close(layer(x=x), want)


COMPILE_TIME_CONDITION_F64 = """
op condition_f64[D, K] {
  state (t: f64, u: f64[K]);
  lift (x: f64) { return (x, 0.25 * ones(K)); }
  combine (l, r) { return (tanh(0.5) + r.t, sigmoid(if D > 1 then 0.5 * ones(K) else l.u)); }
  readout (s) { return s.u; }
}
"""


def test_a_constant_under_a_compile_time_condition_is_computed_in_float64(tmp_path):
    # guards the compute-dtype rule: `where(D > 1, 0.5 * ones(K), ...)` feeding an f64 field is a
    # constant and takes the field's dtype (it was rounded through float32: 2e-8 off)
    run(COMPILE_TIME_CONDITION_F64, "condition_f64", {"D": 2, "K": 2}, tmp_path)


RUNTIME_CONDITION_F64 = """
op runtime_condition_f64 {
  state (t: f64, u: f64);
  lift (x: f64, y: f64) { return (x, y); }
  combine (l, r) { return (tanh(l.t) + r.t, sigmoid(where(r.u > l.t, sign(-1), 2.0))); }
  readout (s) { return s.u; }
}
"""


def test_literals_picked_by_a_runtime_condition_are_computed_in_float64(tmp_path):
    # campaign seed 105475: `sigmoid(where(r.u > l.t, sign(-1), 2.0))` feeding an f64 field. The
    # where's condition is not a constant, so its literal branches kept the IR's f32 and the
    # sigmoid rounded through float32 (5e-8 off the reference); a value computed from weak
    # floats only is weak whatever a where's condition, and takes its users' dtype
    run(RUNTIME_CONDITION_F64, "runtime_condition_f64", {}, tmp_path)


# seed 825: compiled with fullgraph, the backend='cpu' layer holds its C++ kernel as the
# psmc::cpu_kernel op, which checks that its inputs arrive with the strides it was traced with.
# At batch 1 and time 1 a size-1 axis of an input view had stride 1 when traced and 0 when run:
# any stride reads index 0 there, so only axes longer than 1 are compared
GATED_SUM = """
op g825 {
  state (a1: f32, h2: f32);
  lift (x3: f32, x4: f32) { return (exp(x3), x4); }
  combine (l, r) { return (r.a1 * l.a1, r.h2 + l.h2 * r.a1); }
  identity = (ones, zeros);
  readout exclusive (p) { return p.h2; }
}
"""


def test_a_size_one_axis_may_change_its_stride_under_the_compiled_cpp_kernel(tmp_path):
    config = Config(batch=1, time=1, lanes=(3, 1), broadcast=((False, False), (True, False)), grads=True,
                    f32=True, seed=40976, cpp=True)
    run(GATED_SUM, "g825", {}, tmp_path, config, kinds={"x3": "log_gate", "x4": "signed"})


# seed 3300338: an f16 run of an op whose product field overflows float32 past some token; the
# half-precision check's excuse for the elements float32 holds to no digit called the zeroing
# helper without the float64 reference it compares against (a TypeError in the runner)
HALF_OVERFLOW = """
op half_overflow[V] {
  state (p1: f32[2 * V], t2: f32);
  lift () { return (exp(0.2 * (0.01 * index - 0.2) * ones(2 * V)), (0.01 * index - 0.2)); }
  combine (l, r) { return (r.p1 * l.p1, tanh((if abs((r.t2 - l.t2)) <= l.t2 then l.t2 else logsigmoid(l.t2)))); }
  identity = (ones, 0.0);
  assume empty_prefix;
  readout (s, y3: f32[2 * V]) { return y3 @ s.p1; }
}
"""


def test_a_half_run_past_float32s_range_is_compared_where_float32_holds_digits(tmp_path):
    config = Config(batch=2, time=300, lanes=(3,), broadcast=((True,), (False,)), block=64,
                    split=0.9866556730783584, grads=False, f32=True, seed=34277, half="f16", per_lane=True)
    run(HALF_OVERFLOW, "half_overflow", {"V": 3}, tmp_path, config)
