"""`python -m benchmarks [--quick] [--only CASE[,CASE]] [--repeat N] [--out PATH]`.

Runs the cases of issue 7 on this machine, prints median times and ratios to the best peer
for each, and writes each case's table into docs/benchmarks.md (replacing that case's
previous table, keeping everything else). Installs nothing; a missing peer is skipped and
named. Each full run stays within a few minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import compile_time, cpu, delta, dplr, gla, machine, peers, recurrence, report, streaming, timing
from .cases import Settings

CASES = {
    "recurrence": recurrence.run,
    "gla": gla.run_gla,
    "simple_gla": gla.run_simple_gla,
    "delta_rule": delta.run,
    "gated_delta_rule": delta.run_gated,
    "gated_delta_product": delta.run_product,
    "rwkv7": dplr.run_rwkv7,
    "kda": dplr.run_kda,
    "streaming": streaming.run,
    "compile": compile_time.run,
    "cpu": cpu.run,
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, fewer streaming sizes and examples")
    parser.add_argument("--only", action="append", default=[], metavar="CASE",
                        help=f"run only these cases (repeatable or comma-separated): {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (default 7; quick 3)")
    parser.add_argument("--out", default="docs/benchmarks.md",
                        help="markdown file to update (default docs/benchmarks.md; '-' writes nothing)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--psmc-path", choices=["auto", "api", "runtime"], default="auto",
                        help="reach psmc through the public API (psmc.load), the runtime functions it calls, "
                             "or the API when it loads (default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock (default) or this process's CPU time (a shared machine's waits not "
                             "charged; use with --threads 1); cpu tables get their own markers")
    parser.add_argument("--compile-peers", action="store_true",
                        help="also time torch.compile'd associative_scan (compiling takes about a minute)")
    args = parser.parse_args(argv)
    args.only = [name for item in args.only for name in item.split(",") if name] or list(CASES)
    unknown = [name for name in args.only if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    peers.PSMC_PATH["mode"] = args.psmc_path
    if args.clock == "cpu":
        timing.CLOCK.update(name="cpu", read=time.process_time)
    settings = Settings(quick=args.quick, repeat=args.repeat or (3 if args.quick else 7),
                        compile_peers=args.compile_peers, budget_s=5.0 if args.quick else 15.0)
    command = "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in argv)
    about = machine.describe()
    print(command)
    print("; ".join(f"{key}: {value}" for key, value in about.items()))
    blocks = {}
    for name in args.only:
        result = CASES[name](settings)
        print()
        print(report.text(result), flush=True)
        key = name if args.threads == 2 else f"{name}-threads{args.threads}"  # 2: the setting
        key += "-cpuclock" if args.clock == "cpu" else ""
        blocks[key] = report.markdown(result, command, about, key)
    if args.out != "-":
        report.write(Path(args.out), blocks)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
