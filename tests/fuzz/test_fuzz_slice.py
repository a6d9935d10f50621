"""The CI slice of the fuzzer (issue 11): a fixed, deterministic set of seeds.

- 200 generated programs through the differential runner (tests/fuzz/runner.py): psmc check,
  parallel == streaming == continued == decode-after-prefill == the IR reference, fast path ==
  generic scan, f64 gradients parallel == streamed, float32 close to float64, Triton (under
  TRITON_INTERPRET=1) == torch where the plan has kernels (forward, gradients, step, continued),
  the C++ backend == torch on every 25th seed whose plan it covers (a build costs seconds:
  under ten builds, cached by content in the session's PSMC_CACHE_DIR, which the workers share),
  bf16/f16 inputs within their rounding of float64 on a fifth of the programs, and
  torch.compile(fullgraph=True) forward and step equal to eager on a tenth;
- 1,000 mutants of the examples and of generated programs through psmc check and compile:
  a located error or a valid program, never an internal error.
The slice also proves its own reach: the programs cover every family and feature issue 11
lists and every check ran on some of them (a generator that silently stopped producing, say,
chunk ops or exclusive readouts fails here). Long campaigns: `python -m tests.fuzz --minutes N`.
Failures print the shortest failing program of each class with its seed and config; rerun one
with `python -c "import campaign; print(campaign.program_task(SEED))"` from tests/fuzz.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import campaign
from generator import Program, generate, programs
from runner import Config, run_program

PROGRAMS = range(200)  # the first with every feature below: 194 (campaigns run thousands)
MUTANTS = range(1000)

FEATURES = {
    # associative families, and random non-associative combines (tree scans)
    "sum", "max", "min", "product", "diag-affine", "matrix-affine", "logsumexp", "online-softmax", "first",
    "last", "segmented", "argmax", "welford", "random-combine", "tree",
    "count-i64", "count-i32", "count-f32",
    # fields: 1-3 of them, every dtype, scalar / vector / matrix
    "fields-1", "fields-2", "fields-3", "dtype-f32", "dtype-f64", "dtype-i64", "dtype-i32", "dtype-bool",
    "rank-0", "rank-1", "rank-2",
    "scalar-decay-beside-vector", "scalar-decay-beside-matrix", "constant-decay",
    # bodies
    "identity", "no-identity", "exclusive", "readout-inputs", "readout-index", "index", "no-lift",
    "lift-no-inputs", "param", "fn", "composite-dim", "where", "if-scalar", "compile-time-condition",
    "reduction", "matmul-param", "param-decay",
    # chunk ops with causal chunk readouts
    "chunk", "chunk-sum", "chunk-decay", "chunk-tree", "attention",
    # affine maps with a low-rank E: the delta rule, diagonal plus rank one, a rank-two near miss
    "low-rank", "low-rank-delta", "low-rank-dplr", "low-rank-rank-two",
    # r delta steps per token (DeltaProduct), and a near miss that must stay generic
    "low-rank-delta-product", "low-rank-delta-product-miss", "low-rank-delta-product-rows",
}
CHECKS = {"check", "stream", "continued", "reference", "generic", "grads", "f32", "plan-exact",
          "plan-tree", "fast-first_order", "fast-delta_rule", "fast-dplr", "T-above-block", "multi-level-blocks", "lanes-1", "lanes-2",
          "lane-broadcast", "tree-cache", "chunk-cache", "chunk-cache-tree", "chunk-cache-exact", "delta-product",
          # every backend the plan lists: Triton (interpreted) and the C++ kernels (a sample)
          "triton", "triton-grads", "triton-step", "triton-continued", "triton-compiled",
          "cpp", "cpp-grads", "cpp-step", "cpp-continued", "cpp-f32", "cpp-compiled",
          "cpp-compiled-grads",
          # bf16 / f16 inputs
          "half-bf16", "half-f16",
          # varlen packing with a ragged step after it, per-lane params, torch.compile(fullgraph)
          "varlen", "per-lane", "compiled"}


@pytest.fixture(scope="module")
def workers():
    pool = campaign.pool(campaign.default_jobs())
    yield pool
    if pool is not None:
        pool.shutdown()


@pytest.mark.heavy
def test_generated_programs_agree_on_every_path(workers):
    outcomes = campaign.run_tasks(campaign.program_task, PROGRAMS, workers)
    failed = [o for o in outcomes if o.failure is not None]
    assert not failed, f"{len(failed)} of {len(outcomes)} programs failed:\n{campaign.report(outcomes)}"
    features = set().union(*(o.features for o in outcomes))
    assert FEATURES <= features, f"the slice no longer generates: {sorted(FEATURES - features)}"
    checked = set().union(*(o.checked for o in outcomes))
    assert CHECKS <= checked, f"no program in the slice reached: {sorted(CHECKS - checked)}"


# decayed linear attention (generator._linear_attention_program), a family that takes seeds from
# LINEAR_ATTENTION_FROM on: its first 24 programs, every spelling kind among them
LINEAR_ATTENTION_FEATURES = {"linear-attention", "linear-attention-none", "linear-attention-scalar",
                             "linear-attention-key", "linear-attention-exclusive", "linear-attention-bonus",
                             "linear-attention-reads", "linear-attention-squashed", "linear-attention-miss"}


def _linear_attention_seeds(count: int = 24) -> list:
    from generator import LINEAR_ATTENTION_FROM
    seeds, seed = [], LINEAR_ATTENTION_FROM
    while len(seeds) < count:
        if "linear-attention" in generate(seed).features:
            seeds.append(seed)
        seed += 1
    return seeds


def test_linear_attention_programs_take_the_chunkwise_form_and_agree(workers):
    outcomes = campaign.run_tasks(campaign.program_task, _linear_attention_seeds(), workers)
    failed = [o for o in outcomes if o.failure is not None]
    assert not failed, f"{len(failed)} of {len(outcomes)} programs failed:\n{campaign.report(outcomes)}"
    features = set().union(*(o.features for o in outcomes))
    assert LINEAR_ATTENTION_FEATURES <= features, f"not generated: {sorted(LINEAR_ATTENTION_FEATURES - features)}"
    checked = set().union(*(o.checked for o in outcomes))
    assert "linear-attention" in checked  # (the runner's plan check: chunkwise, and the misses not)


def test_mutants_are_valid_programs_or_located_errors(workers):
    outcomes = campaign.run_tasks(campaign.mutant_task, MUTANTS, workers)
    failed = [o for o in outcomes if o.failure is not None]
    assert not failed, f"{len(failed)} of {len(outcomes)} mutants failed:\n{campaign.report(outcomes)}"
    valid = sum(o.valid for o in outcomes)
    # both outcomes are exercised: mutants reach the analysis and codegen, and the error paths
    assert 20 <= valid <= len(outcomes) - 500, f"{valid} valid mutants of {len(outcomes)}"


def test_the_generator_is_deterministic():
    assert [generate(s).text for s in range(20)] == [generate(s).text for s in range(20)]
    assert len({generate(s).text for s in range(50)}) == 50


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs())
def test_hypothesis_drives_the_generator(program, tmp_path_factory):
    # the same generator, its choices drawn by hypothesis: a failure here shrinks to a program
    # built from the simplest choices (first family, fewest fields, no extras)
    assert isinstance(program, Program)
    run_program(program, Config(batch=1, time=5, grads=False, f32=False, seed=1), tmp_path_factory.mktemp("h"))


def test_a_disagreement_is_caught(tmp_path, monkeypatch):
    # the runner is not vacuous: a layer whose step drifts from its parallel pass fails it
    import psmc.runtime.layer as layer_module
    from runner import Failure
    original = layer_module.PsmLayer.step

    def drifting(self, state, *args, **inputs):
        out, state = original(self, state, *args, **inputs)
        return (out * 1.001 if not isinstance(out, tuple) else out), state

    monkeypatch.setattr(layer_module.PsmLayer, "step", drifting)
    text = "op drift { state (s: f64); lift (x: f64) { return x; } combine (l, r) { return l.s + r.s; } }\n"
    with pytest.raises(Failure, match="stream vs parallel"):
        run_program(Program(0, "drift", text, {}, {}), Config(time=4, seed=2), tmp_path)


def test_draw_config_reaches_long_sequences_and_small_blocks():
    configs = [campaign.random.Random(s ^ campaign.CONFIG_SALT) for s in PROGRAMS]
    from runner import draw_config
    drawn = [draw_config(r) for r in configs]
    assert any(c.time > 64 for c in drawn) and any(c.block < 64 and c.time > c.block ** 2 for c in drawn)
    assert random.Random(0).random() == random.Random(0).random()


def test_the_config_samples_the_cpp_backend_and_half_precision_deterministically():
    configs = [campaign.program_config(s) for s in PROGRAMS]
    assert [s for s, c in zip(PROGRAMS, configs) if c.cpp] == list(range(0, len(PROGRAMS), campaign.CPP_EVERY))
    assert {c.half for c in configs} == {"", "bf16", "f16"}
    assert {bool(c.varlen) for c in configs} == {True, False} and {c.per_lane for c in configs} == {True, False}
    assert {c.compiled for c in configs} == {True, False}
    assert all(len(c.varlen) == c.batch and all(1 <= n < c.time for n in c.varlen) for c in configs if c.varlen)
    assert configs == [campaign.program_config(s) for s in PROGRAMS]
    # the extra draws come from their own salts: the earlier fields are what draw_config gives
    from runner import draw_config
    assert all(dataclasses.replace(c, cpp=False, half="", varlen=(), per_lane=False, compiled=False)
               == draw_config(random.Random(s ^ campaign.CONFIG_SALT)) for s, c in zip(PROGRAMS, configs))


BOTH_BACKENDS = "op both[K] { state (x: f32[K]); lift (u: f32[K]) { return tanh(u); } " \
                "combine (l, r) { return l.x + r.x; } identity = zeros; readout (s) { return s.x; } }\n"


@pytest.mark.parametrize("fault", ["cpp-fallback", "cpp-step", "triton-step", "triton-lane", "triton-grads"])
def test_a_backend_disagreement_is_caught(tmp_path, monkeypatch, fault):
    # the backend checks are not vacuous: a C++ backend that silently serves with torch, a
    # C++ or Triton step that drifts (the Triton decode lane, from the second token, too),
    # Triton gradients that drift, each fail the runner
    from runner import Failure
    from psmc.runtime import cpu_support, triton_support
    config = Config(batch=2, time=5, lanes=(2,), grads=False, f32=True, seed=5,
                    cpp=fault.startswith("cpp"), triton=fault.startswith("triton"))
    if fault == "cpp-fallback":
        monkeypatch.setattr(cpu_support, "use_cpu", lambda layer, call, kind, state=None: False)
        match = "without calling its C\\+\\+ kernels"
    elif fault == "triton-lane":
        from psmc.runtime import triton_lane
        bind = triton_lane.bind_step

        def drifting_lane(layer, call, general):
            lane = bind(layer, call, general)

            def drifted(inputs, state):
                outputs, state = lane(inputs, state)
                return tuple(o * 1.001 for o in outputs), state
            return drifted
        monkeypatch.setattr(triton_lane, "bind_step", drifting_lane)
        match = "step stream vs torch parallel"
    elif fault.endswith("-step"):
        module = cpu_support if fault == "cpp-step" else triton_support
        original = module.step

        def drifting(layer, call, state):
            outputs, state = original(layer, call, state)
            return tuple(o * 1.001 for o in outputs), state
        monkeypatch.setattr(module, "step", drifting)
        match = "step stream vs torch parallel"
    else:
        original = triton_support._ScanFunction.backward

        def drifting_backward(ctx, *grads):
            return tuple(g * 1.01 if g is not None else g for g in original(ctx, *grads))
        monkeypatch.setattr(triton_support._ScanFunction, "backward", staticmethod(drifting_backward))
        match = "triton vs torch: gradient"
    with pytest.raises(Failure, match=match):
        run_program(Program(0, "both", BOTH_BACKENDS, {"K": 3}, {}), config, tmp_path)


def test_a_compiled_layer_that_drifts_or_breaks_its_graph_is_caught(tmp_path, monkeypatch):
    # the compile check is not vacuous: a traced path that computes something else than eager,
    # and a graph break (an error under fullgraph), each fail the runner
    from runner import Failure
    from psmc.runtime.layer import PsmLayer
    config = Config(batch=2, time=5, lanes=(2,), grads=False, f32=False, seed=5, compiled=True)
    program = Program(0, "both", BOTH_BACKENDS, {"K": 3}, {})
    original = PsmLayer.forward

    def drifting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out * 1.001 if torch.compiler.is_compiling() else out
    monkeypatch.setattr(PsmLayer, "forward", drifting)
    with pytest.raises(Failure, match="torch.compile\\(fullgraph\\) forward vs eager"):
        run_program(program, config, tmp_path)

    def breaking(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break()
        return original(self, *args, **kwargs)
    monkeypatch.setattr(PsmLayer, "forward", breaking)
    with pytest.raises(Failure, match="compile: torch.compile\\(fullgraph\\) forward"):
        run_program(program, config, tmp_path)


# the fast paths with hand-written chunked Triton kernels: a KDA-like DPLR program (per-key decay
# times a rank-one removal) and a gated delta rule, as the generator's low-rank programs spell them
FAST_KERNEL_PROGRAMS = {
    "dplr": "op kdaish[K, V] { state (E: f32[K, K], S: f32[K, V]); "
            "lift (k: f32[K], w: f32[K], beta: f32, v: f32[V]) "
            "{ return (diag(exp(w)) @ (eye(K) - beta * outer(k, k)), beta * outer(k, v)); } "
            "combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); } identity = (eye(K), zeros); "
            "readout (s, q: f32[K]) { return q @ s.S * 0.5; } }\n",
    "delta_rule": "op gated[K, V] { state (E: f32[K, K], S: f32[K, V]); "
                  "lift (k: f32[K], g: f32, beta: f32, v: f32[V]) "
                  "{ return (exp(g) * (eye(K) - beta * outer(k, k)), beta * outer(k, v)); } "
                  "combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); } identity = (eye(K), zeros); "
                  "readout (s, q: f32[K]) { return q @ s.S; } }\n",
}


@pytest.mark.parametrize("fast", sorted(FAST_KERNEL_PROGRAMS))
def test_the_fast_paths_chunked_triton_kernels_are_checked(tmp_path, monkeypatch, fast):
    # a Triton run of a program whose fast path has chunked kernels runs them (interpreted) and
    # compares them with the float64 layer; a kernel that drifts fails the runner
    import runner
    from runner import Failure
    from psmc.runtime import triton_delta, triton_dplr
    program, config = _fast_kernel_run(fast)
    info = run_program(program, config, tmp_path)
    assert info["fast"] == fast
    assert {f"triton-fast-{fast}", f"triton-fast-{fast}-varlen", f"triton-fast-{fast}-grads"} <= set(info["checked"])
    module, name = (triton_dplr, "triton_chunk_dplr") if fast == "dplr" else (triton_delta, "triton_chunk_delta_rule")
    original = getattr(module, name)

    def drifting(*args, **kwargs):
        o, state = original(*args, **kwargs)
        return o * 1.001, state
    monkeypatch.setattr(module, name, drifting)
    assert runner.FAST_KERNELS[fast][1] == name
    with pytest.raises(Failure, match=f"triton-fast: {name}"):
        run_program(program, config, tmp_path)


def _fast_kernel_run(fast: str):
    """(a program whose fast path is `fast`, a Triton run's config for it)."""
    kinds = {"k": "unit_vector", "beta": "unit", "w": "log_gate", "g": "log_gate"}
    program = Program(0, "kdaish" if fast == "dplr" else "gated", FAST_KERNEL_PROGRAMS[fast], {"K": 4, "V": 3}, kinds)
    return program, Config(batch=2, time=20, lanes=(2,), grads=False, f32=True, seed=3, triton=True)


@pytest.mark.parametrize("drift", ["backward", "packed"])
def test_the_dplr_kernels_training_and_packed_calls_are_checked(tmp_path, monkeypatch, drift):
    # a Triton run of a DPLR program also trains it on the chain kernels (gradients against the
    # torch form's) and packs its rows (all sequences in one call, against the kernels' one pass):
    # a backward pass or a packed call that drifts fails the runner
    from runner import Failure
    from psmc.runtime import triton_dplr
    name = "dstates" if drift == "backward" else "triton_chunk_dplr"
    original = getattr(triton_dplr, name)

    def drifting(*args, **kwargs):  # (the leaving states' gradients: what two chunks from a zero state exercise)
        out, state = original(*args, **kwargs)
        return (out if drift == "packed" and kwargs.get("cu_chunks") is None else out * 1.01), state
    monkeypatch.setattr(triton_dplr, name, drifting)
    match = "triton-fast: grad-mismatch: states" if drift == "backward" else "triton-fast: .*varlen"
    with pytest.raises(Failure, match=match):
        run_program(*_fast_kernel_run("dplr"), tmp_path)
