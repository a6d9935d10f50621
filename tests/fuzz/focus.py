"""A focused sweep: `python -m tests.fuzz.focus --seconds N --seed S [--feature F] [--scalar-states] [--programs P] [--no-triton] [--wy-chunk L] [--compiled]`.

Generated programs (seeds S+1, S+2, ...) that have generator feature F (default `exclusive`; `any`: all)
and, with --scalar-states, only scalar state fields, each run by the differential runner with
the Triton checks on (their configs of T <= 24, as the campaign's Triton runs). Where a campaign
checks Triton on one program in twenty, this aims every check at one family of kernels (e.g.
exclusive readouts of scalar states, on the state tile of one column). With --no-triton the
programs run with their campaign configs as drawn, long sequences included (e.g. `--feature
low-rank`: the chunked WY fast paths, whose chunks only long sequences cross); --wy-chunk L runs
those paths (psmc.runtime.delta, psmc.runtime.dplr) with chunks of L tokens, so that short
sequences cross chunk boundaries too; --compiled also runs each program's layers through
torch.compile(fullgraph=True), the Triton twin's forward and gradients included. Prints the counts and the failures; exit status 1 when
anything failed.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "codegen"))
os.environ.setdefault("TRITON_INTERPRET", "1")

import campaign  # noqa: E402
from generator import generate  # noqa: E402
from runner import Failure, run_program  # noqa: E402

from psmc.ir import ops_from_source  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.focus", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feature", default="exclusive")
    parser.add_argument("--scalar-states", action="store_true")
    parser.add_argument("--programs", type=int, default=0, help="stop after this many matched programs (0: no limit)")
    parser.add_argument("--no-triton", dest="triton", action="store_false",
                        help="the campaign's configs as drawn (no forced Triton check, no length limit)")
    parser.add_argument("--wy-chunk", type=int, default=0, help="tokens per chunk of the WY fast paths (0: theirs)")
    parser.add_argument("--compiled", action="store_true",
                        help="also run every program through torch.compile(fullgraph=True), its Triton twin too")
    args = parser.parse_args(argv)
    campaign._init_worker()  # one intra-op thread, the faster interpreter
    if args.wy_chunk:
        from psmc.runtime import delta, dplr
        for module in (delta, dplr):
            module._CHUNK = module._CHUNK_AUTOGRAD = args.wy_chunk
    deadline = time.time() + args.seconds
    seed, matched, on_triton, failures = args.seed, 0, 0, []
    trees: collections.Counter = collections.Counter()
    while time.time() < deadline and not (args.programs and matched >= args.programs):
        seed += 1
        program = generate(seed)
        if args.feature != "any" and args.feature not in program.features:
            continue
        if args.scalar_states and any(f.shape for f in ops_from_source(program.text, "p.psm")[0].state):
            continue
        config = campaign.program_config(seed)
        if args.triton and config.time > 24:
            continue
        matched += 1
        config = dataclasses.replace(config, triton=args.triton or config.triton,
                                     compiled=args.compiled or config.compiled)
        with tempfile.TemporaryDirectory() as folder:
            try:
                info = run_program(program, config, Path(folder))
            except Failure as err:
                failures.append((seed, err.message))
                continue
        on_triton += any(c == "triton" or c.startswith("triton-fast") for c in info["checked"])
        trees.update(c for c in info["checked"] if "tree" in c or "cache" in c)
    print(f"seeds {args.seed + 1}-{seed}: {matched} programs with {args.feature!r}"
          f"{' and scalar states' if args.scalar_states else ''}, {on_triton} checked on Triton, "
          f"{len(failures)} failed")
    if trees:  # the tree and cache checks reached (the torch tree, the tree kernels, the serving caches)
        print("  tree and cache checks: " + ", ".join(f"{name} {n}" for name, n in sorted(trees.items())))
    for failed, message in failures:
        print(f"  seed {failed}: {message[:500]}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
