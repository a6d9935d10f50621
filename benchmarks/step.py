"""Decode step and torch.compile speed-ups (issue 13): `python -m benchmarks.step`.

Rows, all in one process on one machine, ms per token over --tokens tokens (one torch thread,
`torch.no_grad()`):
- psmc GLA `step` (B=1, H=4, K=V=64), eager, against the same update written by hand in eager
  torch (S = exp(gk) * S + k v^T, o = q S / sqrt(K)): target <= 1.5x;
- both under torch.compile (fullgraph, inductor): target psmc compiled <= 1.0x the compiled hand
  step, for `layer.step` and for `layer.step_function` (state tensors and positional inputs in,
  plain tensors out: the bare hand step's interface); beside them the hand step keeping a count
  (S, n + 1) and the hand step behind psmc's interface (a ScanState in and out, keyword inputs),
  which split `step`'s gap into its causes;
- the selective SSM (Mamba S6, B=1, D=256 channels, N=16) `step` against its hand-written
  update (h = exp(delta A) h + delta B u, y = sum(h C)), eager;
- the GLA parallel pass (B=1, T=1024) eager vs torch.compile'd, and the first-order recurrence.
Each row pair is timed interleaved (hand, psmc, hand, psmc, ...: --repeat rounds) and the
median per row is reported, so a load change on a shared machine hits both sides alike.
psmc's GLA stream state keeps S only (dead-field elimination drops the decay product `a`).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import typing
from pathlib import Path

import torch

import psmc
from psmc.runtime.state import ScanState

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
B, H, K, V = 1, 4, 64, 64
D, N = 256, 16  # the selective SSM: channels (lanes) and state size


def hand_step(S, k, v, gk, q):
    S = torch.exp(gk).unsqueeze(-1) * S + k.unsqueeze(-1) * v.unsqueeze(-2)
    return (q.unsqueeze(-2) @ S).squeeze(-2) / K ** 0.5, S


def hand_counted_step(S, n, k, v, gk, q):
    out, S = hand_step(S, k, v, gk, q)
    return out, S, n + 1


class HandInterface(torch.nn.Module):
    """The hand-written update behind psmc's step interface: a module method taking a ScanState
    and keyword inputs, returning the output and a new ScanState (S and the token count): what a
    compiled `step` pays besides the update (Dynamo rebuilds the frozen state after the graph)."""

    def step(self, state, **inputs):
        out, S = hand_step(state.prefix[1], inputs["k"], inputs["v"], inputs["gk"], inputs["q"])
        return out, ScanState.make((None, S), state.count + 1, state.op)


LAYERS = 4  # the stacked decode step: layer i's output is layer i+1's query


def stack_rows(args, state0, ks, vs, gks, qs):
    """A decode step of LAYERS GLA layers compiled as one graph (how a model is compiled): the
    per-call cost of torch.compile is paid once per token for the whole stack."""
    layers = [psmc.load(EXAMPLES / "gla.psm").gla(K=K, V=V) for _ in range(LAYERS)]

    def hand_stack(Ss, k, v, gk, q):
        out = []
        for S in Ss:
            q, S = hand_step(S, k, v, gk, q)
            out.append(S)
        return q, out

    def psmc_stack(states, k, v, gk, q):
        out = []
        for layer_, state in zip(layers, states):
            q, state = layer_.step(state, k=k, v=v, gk=gk, q=q)
            out.append(state)
        return q, out

    def run(step, init):
        def go(count):
            carry = init
            with torch.no_grad():
                for t in range(count):
                    _, carry = step(carry, ks[t], vs[t], gks[t], qs[t])
        return go

    Ss, states = [state0.prefix[1]] * LAYERS, [state0] * LAYERS
    rows = [("hand-written eager steps", run(hand_stack, Ss)),
            ("hand-written steps, one torch.compile(fullgraph) graph", run(torch.compile(hand_stack, fullgraph=True), Ss)),
            ("psmc gla steps, eager", run(psmc_stack, states)),
            ("psmc gla steps, one torch.compile(fullgraph) graph", run(torch.compile(psmc_stack, fullgraph=True), states))]
    times = per_token_ms([fn for _, fn in rows], args.tokens, args.repeat)
    print(f"\nA stack of {LAYERS} GLA layers stepped together (layer i's output is layer i+1's query), same rounds, "
          "ms per token per layer")
    print("| row | ms / token / layer | vs hand-written eager | vs hand-written compiled |")
    print("|---|---:|---:|---:|")
    for (name, _), ms in zip(rows, times):
        print(f"| {name} | {ms / LAYERS:.4f} | {ms / times[0]:.2f}x | {ms / times[1]:.2f}x |")


class _TupleState(typing.NamedTuple):  # --pieces: the same fields as a tuple subclass
    prefix: tuple
    count: torch.Tensor
    op: str


@dataclasses.dataclass(eq=False)
class _MutableState:  # --pieces: the same fields as a mutable dataclass
    prefix: tuple
    count: torch.Tensor
    op: str = ""


def _hand_into(cls):
    """The hand step taking and returning a state of class `cls` (S in prefix[1], the count)."""
    def step(state, k, v, gk, q):
        out, S = hand_step(state.prefix[1], k, v, gk, q)
        if cls is ScanState:
            return out, ScanState.make((None, S), state.count + 1, state.op)
        if cls is _TupleState:
            return out, _TupleState((None, S), state.count + 1, state.op)
        new = object.__new__(cls)
        new.prefix, new.count, new.op = (None, S), state.count + 1, state.op
        return out, new
    return step


def pieces(layer, state0, token):
    """--pieces: where a compiled step's time goes, each piece timed alone (timeit on --clock, min
    of 40 x 1000 calls): guard evaluation (Dynamo's guard manager on this call's locals), the whole call,
    and the hand step with its state as a frozen dataclass, a mutable one or a NamedTuple."""
    import timeit
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from psmc.runtime.layer import PsmLayer
    torch.set_grad_enabled(False)
    S, inputs = state0.prefix[1], dict(token)
    k, v, gk, q = (inputs[n] for n in ("k", "v", "gk", "q"))
    iface = HandInterface()
    compiled = {"bare hand step": torch.compile(hand_step, fullgraph=True),
                "hand step behind psmc's interface": torch.compile(iface.step, fullgraph=True),
                "psmc step": torch.compile(layer.step, fullgraph=True)}
    calls = {"bare hand step": lambda: compiled["bare hand step"](S, k, v, gk, q),
             "hand step behind psmc's interface": lambda: compiled["hand step behind psmc's interface"](state0, **inputs),
             "psmc step": lambda: compiled["psmc step"](state0, **inputs)}
    fn = layer.step_function(**inputs)
    compiled["psmc step_function"] = torch.compile(fn, fullgraph=True)
    tensors = state0.tensors()
    calls["psmc step_function"] = lambda: compiled["psmc step_function"](tensors, k, v, gk, q)
    frames = {"bare hand step": (hand_step.__code__, dict(S=S, k=k, v=v, gk=gk, q=q)),
              "hand step behind psmc's interface": (HandInterface.step.__code__,
                                                    dict(self=iface, state=state0, inputs=inputs)),
              "psmc step": (PsmLayer.step.__code__, dict(self=layer, state=state0, args=(), inputs=inputs)),
              "psmc step_function": (fn.__code__, dict(state_tensors=tensors, inputs=(k, v, gk, q)))}
    frames["psmc step_function"][1].update(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    states = {"a frozen dataclass (ScanState)": (ScanState, state0),
              "a mutable dataclass": (_MutableState, _MutableState(state0.prefix, state0.count, state0.op)),
              "a typing.NamedTuple": (_TupleState, _TupleState(state0.prefix, state0.count, state0.op))}
    for name, (cls, st) in states.items():
        f = torch.compile(_hand_into(cls), fullgraph=True)
        calls[f"hand step, state {name}"] = lambda f=f, st=st: f(st, k, v, gk, q)
    for f in calls.values():
        f(), f()
    best = {name: [] for name in calls}
    guard = {}
    for name, (code, f_locals) in frames.items():
        (entry,) = _debug_get_cache_entry_list(code)
        executed = entry.guard_manager.check_verbose(f_locals).num_guards_executed
        check = entry.guard_manager.check
        timer = timeit.Timer(lambda: check(f_locals), timer=CLOCK)
        guard[name] = (executed, min(timer.repeat(number=1000, repeat=40)) / 1000 * 1e6)
    for _ in range(40):
        for name, f in calls.items():
            best[name].append(timeit.Timer(f, timer=CLOCK).timeit(number=1000) / 1000 * 1e6)
    bare = min(best["bare hand step"])
    print(f"Where a compiled step's time goes (us per call, min of 40 x 1000 calls, each piece alone, "
          f"{'cpu' if CLOCK is time.thread_time else 'wall'} clock)")
    print("| compiled call | guard checks executed | guard evaluation | whole call | vs bare hand step |")
    print("|---|---:|---:|---:|---:|")
    for name, times in best.items():
        executed, us = guard.get(name, ("", None))
        shown = f"{us:.2f}" if us is not None else ""
        print(f"| {name} | {executed} | {shown} | {min(times):.2f} | {min(times) / bare:.3f}x |")


def hand_tuples_step(state_tensors, *inputs):
    """The hand update behind step_function's interface (a state tuple and positional inputs in,
    (out, (S,)) out)."""
    k, v, gk, q = inputs
    out, S = hand_step(state_tensors[0], k, v, gk, q)
    return out, (S,)


def ab(layer, state0, token, rounds: int = 600, calls: int = 100):
    """--ab: the compiled bare hand step, that hand step behind step_function's interface and the
    compiled step_function, `calls` calls each per round in a shuffled order, `rounds` rounds: the
    median and quartiles of the per-round ratios (a load change within a round hits all three)."""
    import random
    torch.set_grad_enabled(False)
    S, (k, v, gk, q) = state0.prefix[1], (token[n] for n in ("k", "v", "gk", "q"))
    hand = torch.compile(hand_step, fullgraph=True)
    tuples = torch.compile(hand_tuples_step, fullgraph=True)
    fn = torch.compile(layer.step_function(**token), fullgraph=True)
    st = (S,)
    rows = {"bare hand step": lambda: hand(S, k, v, gk, q), "hand step, step_function's interface":
            lambda: tuples(st, k, v, gk, q), "psmc step_function": lambda: fn(st, k, v, gk, q)}
    for f in rows.values():
        f(), f()
    ratios = {name: [] for name in rows}
    order = list(rows)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        took = {}
        for name in order:
            f, start = rows[name], CLOCK()
            for _ in range(calls):
                f()
            took[name] = CLOCK() - start
        for name in rows:
            ratios[name].append(took[name] / took["bare hand step"])
    print(f"Compiled calls against the compiled bare hand step, {rounds} shuffled rounds x {calls} calls, "
          f"{'cpu' if CLOCK is time.thread_time else 'wall'} clock: median ratio (quartiles)")
    for name, r in ratios.items():
        r.sort()
        print(f"| {name} | {statistics.median(r):.3f} ({r[len(r) // 4]:.3f}-{r[3 * len(r) // 4]:.3f}) |")


def hand_ssm_step(h, u, delta, A, Bt, C):
    d = delta.unsqueeze(-1)
    h = torch.exp(d * A) * h + d * Bt * u.unsqueeze(-1)
    return (h * C).sum(-1), h


CLOCK = time.perf_counter  # --clock cpu: time.thread_time, the CPU time of this thread


def per_token_ms(fns: list, tokens: int, repeat: int) -> list:
    """Median ms per token of each `fn(count)`, the functions timed in interleaved rounds."""
    for fn in fns:
        fn(3)  # warm up (and compile)
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = CLOCK()
            fn(tokens)
            times[i].append((CLOCK() - start) / tokens * 1e3)
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="eager rows only (compiling takes minutes)")
    ap.add_argument("--step-only", action="store_true", help="the single GLA step table only (no stack, SSM or "
                                                                 "parallel-pass rows)")
    ap.add_argument("--pieces", action="store_true", help="only where a compiled step's time goes: guard "
                                                              "evaluation and whole call, timed alone (about 30 s)")
    ap.add_argument("--ab", action="store_true", help="only the compiled step_function against the compiled hand "
                                                          "step, interleaved A/B rounds (about 15 s)")
    ap.add_argument("--parallel-only", action="store_true", help="only the parallel pass, eager against "
                                                                   "torch.compile (a minute or two of compiling)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: time.thread_time, this thread's CPU time (on a shared, "
                         "loaded machine it leaves out the time other processes hold the core; one torch thread)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = psmc.load(EXAMPLES / "gla.psm").gla(K=K, V=V)
    n = args.tokens + 3
    ks, vs, qs = (torch.randn(n, B, H, K) for _ in range(3))
    gks = torch.nn.functional.logsigmoid(torch.randn(n, B, H, K))
    _, state0 = layer(k=ks[:1].transpose(0, 1), v=vs[:1].transpose(0, 1), gk=gks[:1].transpose(0, 1),
                      q=qs[:1].transpose(0, 1), return_state=True)

    if args.pieces:
        return pieces(layer, state0, dict(k=ks[0], v=vs[0], gk=gks[0], q=qs[0]))
    if args.ab:
        return ab(layer, state0, dict(k=ks[0], v=vs[0], gk=gks[0], q=qs[0]))
    if args.parallel_only:
        return parallel_rows(layer, args.repeat)

    def run_psmc(step):
        def go(count):
            state = state0
            with torch.no_grad():
                for t in range(count):
                    _, state = step(state, k=ks[t], v=vs[t], gk=gks[t], q=qs[t])
        return go

    def run_hand(step):
        def go(count):
            S = state0.prefix[1]
            with torch.no_grad():
                for t in range(count):
                    _, S = step(S, ks[t], vs[t], gks[t], qs[t])
        return go

    def run_counted(step):  # the hand-written update keeping what psmc's state keeps: S and a token count
        def go(count):
            S, n_ = state0.prefix[1], state0.count
            with torch.no_grad():
                for t in range(count):
                    _, S, n_ = step(S, n_, ks[t], vs[t], gks[t], qs[t])
        return go

    def run_function(fn):  # layer.step_function: state tensors and positional inputs in, plain tensors out
        def go(count):
            tensors = state0.tensors()
            with torch.no_grad():
                for t in range(count):
                    _, tensors = fn(tensors, ks[t], vs[t], gks[t], qs[t])
        return go

    step_fn = layer.step_function(k=ks[0], v=vs[0], gk=gks[0], q=qs[0])
    fns = [("hand-written eager torch step", run_hand(hand_step)), ("psmc gla step, eager", run_psmc(layer.step))]
    if not args.no_compile:
        fns += [("hand-written step, torch.compile(fullgraph)", run_hand(torch.compile(hand_step, fullgraph=True))),
                ("psmc gla step, torch.compile(fullgraph)", run_psmc(torch.compile(layer.step, fullgraph=True))),
                ("hand-written step + token count, torch.compile(fullgraph)",
                 run_counted(torch.compile(hand_counted_step, fullgraph=True))),
                ("hand-written step behind psmc's interface (ScanState in/out, keyword inputs), torch.compile(fullgraph)",
                 run_psmc(torch.compile(HandInterface().step, fullgraph=True))),
                ("psmc step_function, torch.compile(fullgraph=True)",
                 run_function(torch.compile(step_fn, fullgraph=True))),
                ("psmc step_function, eager", run_function(step_fn)),
                ("torch.compile floor: x + 1 on one element, per call",
                 lambda count, f=torch.compile(lambda x: x + 1, fullgraph=True), x=torch.zeros(1): [f(x) for _ in range(count)])]
    times = per_token_ms([fn for _, fn in fns], args.tokens, args.repeat)
    hand = times[0]
    print(f"GLA decode step, B={B}, H={H}, K=V={K}, {args.threads} thread(s), median of {args.repeat} interleaved "
          f"rounds x {args.tokens} tokens, {args.clock} clock")
    print("| row | ms / token | vs hand-written eager | vs hand-written compiled |")
    print("|---|---:|---:|---:|")
    for i, ((name, _), ms) in enumerate(zip(fns, times)):
        vs_compiled = f"{ms / times[2]:.2f}x" if len(times) > 2 and i >= 2 else ""
        print(f"| {name} | {ms:.4f} | {ms / hand:.2f}x | {vs_compiled} |")
    if not args.no_compile:
        print(f"psmc compiled / the hand step behind psmc's interface compiled: {times[3] / times[5]:.2f}x "
              f"(psmc's own per-call cost); that hand step / the bare hand step: {times[5] / times[2]:.2f}x "
              "(the interface's: a state object rebuilt after the graph, its count, keyword inputs)")
        print(f"psmc step_function compiled / the bare hand step compiled: {times[6] / times[2]:.2f}x (target <= 1.0x); "
              f"step_function eager / hand eager: {times[7] / hand:.2f}x")
    if args.step_only:
        return
    if not args.no_compile:
        stack_rows(args, state0, ks, vs, gks, qs)

    # the selective SSM (first-order: no hand-form fast step; backend='auto' runs the C++ step)
    ssm = psmc.load(EXAMPLES / "selective_ssm.psm").selective_ssm(N=N)
    us, deltas = torch.randn(n, B, D), torch.rand(n, B, D) * 0.1
    Bs, Cs = torch.randn(n, B, 1, N), torch.randn(n, B, 1, N)
    A = -torch.rand(1, D, N)
    _, ssm0 = ssm(u=us[:1].transpose(0, 1), delta=deltas[:1].transpose(0, 1), A=A.unsqueeze(1),
                  B=Bs[:1].transpose(0, 1), C=Cs[:1].transpose(0, 1), return_state=True)

    def run_ssm(layer_):
        def go(count):
            state = ssm0
            with torch.no_grad():
                for t in range(count):
                    _, state = layer_.step(state, u=us[t], delta=deltas[t], A=A, B=Bs[t], C=Cs[t])
        return go

    def run_ssm_hand(count):
        h = ssm0.prefix[1]
        with torch.no_grad():
            for t in range(count):
                _, h = hand_ssm_step(h, us[t], deltas[t], A, Bs[t], Cs[t])

    torch_ssm = psmc.load(EXAMPLES / "selective_ssm.psm").selective_ssm(N=N, backend="torch")
    rows = [("hand-written eager torch step", run_ssm_hand), ("psmc selective_ssm step, eager (backend='auto')",
                                                                run_ssm(ssm)),
            ("psmc selective_ssm step, eager (backend='torch')", run_ssm(torch_ssm))]
    times = per_token_ms([fn for _, fn in rows], args.tokens, args.repeat)
    print(f"\nSelective SSM (S6) decode step, B={B}, D={D} channels, N={N}, same rounds")
    print("| row | ms / token | vs hand-written eager |")
    print("|---|---:|---:|")
    for (name, _), ms in zip(rows, times):
        print(f"| {name} | {ms:.4f} | {ms / times[0]:.2f}x |")

    if not args.no_compile:
        parallel_rows(layer, args.repeat)


def parallel_rows(layer, repeat: int):
    """The parallel pass, eager against torch.compile(fullgraph) (Inductor), in one process."""
    T = 1024
    x = {n_: torch.randn(1, T, H, K) for n_ in ("k", "v", "q")}
    x["gk"] = torch.nn.functional.logsigmoid(torch.randn(1, T, H, K))
    lr = psmc.load(EXAMPLES / "linear_recurrence.psm").linear_recurrence()
    y = {"log_a": -torch.rand(4, T, 256), "x": torch.randn(4, T, 256)}
    x_grad = {n_: t.clone().requires_grad_() for n_, t in x.items()}
    y_grad = {n_: t.clone().requires_grad_() for n_, t in y.items()}

    def forward(mod, inp):
        with torch.no_grad():
            return mod(**inp)

    def train(mod, inp):  # forward and backward
        mod(**inp).sum().backward()

    print(f"\nParallel pass, eager vs torch.compile(fullgraph) (ms per call, median of {repeat})")
    print("| layer | eager | compiled | speed-up |")
    print("|---|---:|---:|---:|")
    for name, mod, inp, run in (("gla B=1 T=1024 H=4 K=V=64, forward", layer, x, forward),
                                ("gla B=1 T=1024 H=4 K=V=64, forward + backward", layer, x_grad, train),
                                ("linear_recurrence B=4 T=1024 D=256, forward", lr, y, forward),
                                ("linear_recurrence B=4 T=1024 D=256, forward + backward", lr, y_grad, train)):
        compiled = torch.compile(mod, fullgraph=True)
        eager_ms, comp_ms = per_token_ms([lambda c: [run(mod, inp) for _ in range(c)],
                                          lambda c: [run(compiled, inp) for _ in range(c)]], 1, repeat)
        print(f"| {name} | {eager_ms:.2f} | {comp_ms:.2f} | {eager_ms / comp_ms:.2f}x |")

if __name__ == "__main__":
    main()
