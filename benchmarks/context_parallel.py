"""`python -m benchmarks.context_parallel [--tokens T] [--repeat N] [--worlds 1,2,4]`.

Context parallelism on this machine: one sequence of T tokens split evenly over 1, 2 and 4 gloo
processes on 127.0.0.1 (one torch thread each). For a few plans it measures the median wall time
of a forward and of a forward + backward (the slowest rank, between barriers) and the bytes each
rank put into the exchanges per layer call (psmc.runtime.context_parallel.SENT_BYTES), next to
the bytes of one state and of the rank's activations, so the O(ranks x state) volume is visible.
World 1 is the plain single-process layer (no cp_group). The "carry" column says how the last
rank (which receives a carry) applied it (psmc.runtime.context_parallel.SCHEMES): 'cheap carry'
(the fast path once, the carry added by the op's algebra), 'fast path twice', 'generic scan';
tree plans have none. The `gla varlen` row packs the sequence as 7 sequences of about T / 7 tokens
(cu_seqlens), so ranks hold several sequences and some span a boundary. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import machine

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

GLA_INPUTS = {"k": ((32,), "x"), "v": ((32,), "x"), "gk": ((32,), "log_gate"), "q": ((32,), "x")}
# name -> (op, plan, dims, lanes, inputs: name -> (trailing shape, kind), packed sequences (cu_seqlens) or 0)
CASES = {
    "gla": ("gla", "exact, chunkwise fast path", {"K": 32, "V": 32}, (4,), GLA_INPUTS, 0),
    "gla_varlen": ("gla", "exact, chunkwise, 7 packed sequences", {"K": 32, "V": 32}, (4,), GLA_INPUTS, 7),
    "linear_recurrence": ("linear_recurrence", "exact, first-order fast path", {}, (64,),
                          {"x": ((), "x"), "log_a": ((), "log_gate")}, 0),
    "delta_rule": ("delta_rule", "exact, delta-rule fast path", {"K": 16, "V": 16}, (4,),
                   {"q": ((16,), "x"), "k": ((16,), "unit_vector"), "v": ((16,), "x"), "beta": ((), "unit")}, 0),
    "welford": ("welford", "exact, generic scan", {}, (64,), {"x": ((), "x")}, 0),
    "tree_rnn": ("tree_rnn", "tree (fixed Blelloch)", {"D": 16}, (), {"h": ((16,), "x")}, 0),
    "transformer_psm": ("transformer_psm", "tree over chunks (C = 16)", {"C": 16, "D": 16, "H": 2}, (),
                        {"x": ((16,), "x")}, 0),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(spec_inputs: dict, cls, tokens: int, lanes: tuple, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for slot in cls.spec.inputs:
        shape, kind = spec_inputs[slot.name]
        u = torch.rand((1, tokens, *lanes, *shape), generator=gen)
        if kind == "unit_vector":
            out[slot.name] = torch.nn.functional.normalize(u - 0.5, dim=-1)
        elif kind == "unit":
            out[slot.name] = u
        else:
            out[slot.name] = -0.1 * u if kind == "log_gate" else u - 0.5
    return out


def _rank(rank: int, world: int, port: int, module_file: str, name: str, args: dict, out: str):
    import importlib.util

    from psmc.runtime import context_parallel

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = importlib.util.spec_from_file_location("cp_bench_layer", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    op, _, dims, lanes, spec_inputs, sequences = CASES[name]
    torch.manual_seed(0)
    layer = module.__psmc_layers__[op](**dims)
    cls = type(layer)
    full = _inputs(spec_inputs, cls, args["tokens"], lanes, seed=1)
    per = args["tokens"] // world
    mine = {n: x[:, rank * per:(rank + 1) * per].clone() for n, x in full.items()}
    group = dist.group.WORLD if world > 1 else None
    varlen = {}
    if sequences:  # the global cu_seqlens, the same on every rank (world 1: plain varlen)
        varlen = {"cu_seqlens": torch.linspace(0, args["tokens"], sequences + 1).round().long()}

    def sync():
        if world > 1:
            dist.barrier()

    def forward(backward: bool):
        xs = {n: x.requires_grad_(backward) for n, x in mine.items()}
        out = layer(**xs, cp_group=group, **varlen) if group is not None else layer(**xs, **varlen)
        outs = out if isinstance(out, tuple) else (out,)
        if backward:
            sum(o.float().square().mean() for o in outs if o.requires_grad).backward()

    times = {}
    for backward in (False, True):
        forward(backward)  # warm-up
        runs = []
        for _ in range(args["repeat"]):
            sync()
            start = time.perf_counter()
            forward(backward)
            sync()
            runs.append(time.perf_counter() - start)
        times["fwd+bwd" if backward else "fwd"] = statistics.median(runs)
    context_parallel.SENT_BYTES.clear()
    context_parallel.SCHEMES.clear()
    forward(False)
    schemes = sorted(context_parallel.SCHEMES)
    sent_fwd = dict(context_parallel.SENT_BYTES)
    context_parallel.SENT_BYTES.clear()
    forward(True)
    sent_both = dict(context_parallel.SENT_BYTES)
    with torch.no_grad():
        _, state = layer(**{n: x[:, :args["tokens"] // max(1, sequences)] for n, x in full.items()},
                         return_state=True)  # one sequence's state
    state_bytes = state.nbytes if not hasattr(state, "inner") else state.inner.nbytes
    activation_bytes = sum(x.numel() * x.element_size() for x in mine.values())
    if rank == 0:
        torch.save({"times": times, "sent_fwd": sent_fwd, "sent_both": sent_both, "state_bytes": state_bytes,
                    "activation_bytes": activation_bytes}, out)
    if rank == world - 1:
        torch.save(schemes, out + ".schemes")
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the whole sequence (default 4096)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--worlds", default="1,2,4", help="process counts (default 1,2,4)")
    parser.add_argument("--only", default=",".join(CASES), help=f"ops (default {','.join(CASES)})")
    args = parser.parse_args(argv)
    from psmc.loader import compiled_path

    worlds = [int(w) for w in args.worlds.split(",")]
    print(f"machine: {machine.cpu_model()}, {torch.get_num_threads()} threads visible, load average "
          f"{machine.load_average()} at start; torch {torch.__version__}; gloo on 127.0.0.1, 1 thread per rank")
    print(f"command: python -m benchmarks.context_parallel {' '.join(argv)}".rstrip())
    print()
    print("| case | plan | ranks | carry | fwd ms | fwd+bwd ms | state B | slice activations B | sent fwd B/rank | "
          "sent fwd+bwd B/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            op, plan = CASES[name][:2]
            module_file = str(compiled_path(EXAMPLES / f"{op}.psm"))
            for world in worlds:
                out = f"{tmp}/{name}_{world}.pt"
                run_args = {"tokens": args.tokens, "repeat": args.repeat}
                mp.spawn(_rank, args=(world, _free_port(), module_file, name, run_args, out), nprocs=world,
                         join=True)
                r = torch.load(out)
                schemes = ", ".join(torch.load(out + ".schemes")) or "-"
                sent_fwd = sum(r["sent_fwd"].values())
                sent_both = sum(r["sent_both"].values())
                ms = {k: f"{1e3 * v:.1f}" for k, v in r["times"].items()}
                print(f"| {name.replace('_varlen', ' varlen')} | {plan} | {world} | {schemes} | {ms['fwd']} | "
                      f"{ms['fwd+bwd']} | {r['state_bytes']} | {r['activation_bytes']} | {sent_fwd} | {sent_both} |",
                      flush=True)
    print(f"\nload average at the end: {machine.load_average()}")


if __name__ == "__main__":
    main(sys.argv[1:])
