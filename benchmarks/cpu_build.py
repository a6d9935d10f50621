"""Build time of the C++ CPU kernels per example: what a first call compiles.

    python -m benchmarks.cpu_build                      # every example with C++ kernels
    python -m benchmarks.cpu_build --examples gla,mlstm

psmc.runtime.cpu_support builds one library per pass and float type (the op's source holds
the four entry points, each behind its own macro: psmc.codegen.cpp_printer.export_macro). Per
example, from an empty cache each time, with the runtime's compiler flags:

- `f32 forward`: what a float32 inference call builds;
- `f32 training`: what a float32 training call builds (forward and backward, two libraries);
- `all four`: one library with every entry point, which every first call built before the
  split (float32 and float64, forward and backward).

Single measurements (a build happens once per cache); the machine's load changes them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="", help="comma-separated example names (default: all with C++ kernels)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    import psmc
    from psmc.runtime import cpu_support

    if cpu_support.compiler() is None:
        print("no C++ compiler: nothing to time", file=sys.stderr)
        return 1
    wanted = [n for n in args.examples.split(",") if n]
    rows = []
    with tempfile.TemporaryDirectory() as modules:
        os.environ["PSMC_CACHE_DIR"] = modules
        for path in sorted((ROOT / "examples").glob("*.psm")):
            for name, cls in psmc.load(path).__psmc_layers__.items():
                source = getattr(getattr(cls, "_cpu_kernels", None), "source", None)
                if source is None or (wanted and name not in wanted):
                    continue
                f32 = torch.float32
                forward = _build(source, [cpu_support.export_flag("forward", f32)])
                backward = _build(source, [cpu_support.export_flag("backward", f32)])
                every = _build(source, [cpu_support.export_flag(kind, dtype) for kind in cpu_support.PASSES
                                        for dtype in (torch.float32, torch.float64)])
                rows.append((name, forward, forward + backward, every))
    if not rows:
        print(f"no example with C++ kernels among {wanted}", file=sys.stderr)
        return 1
    _print(rows, cpu_support.CFLAGS)
    return 0


def _build(source: str, defines: list) -> float:
    """Seconds to build `source` with `defines` into a fresh directory (what load_inline runs)."""
    from torch.utils import cpp_extension

    from psmc.runtime import cpu_support
    with tempfile.TemporaryDirectory() as root:
        name = "psmc_bench_" + Path(root).name.replace("-", "_")
        start = time.perf_counter()
        cpp_extension.load_inline(name, [source], is_python_module=False, no_implicit_headers=True,
                                  build_directory=root, extra_cflags=list(cpu_support.CFLAGS) + defines,
                                  extra_ldflags=list(cpu_support.LDFLAGS), verbose=False)
        return time.perf_counter() - start


def _print(rows, flags) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"flags: {' '.join(flags)}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'example'.ljust(width)}  {'f32 forward s':>13} {'f32 training s':>14} {'all four s':>10} {'forward / all':>13}")
    for name, forward, training, every in rows:
        print(f"{name.ljust(width)}  {forward:13.1f} {training:14.1f} {every:10.1f} {forward / every:13.2f}")
    total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"{'total'.ljust(width)}  {total[0]:13.1f} {total[1]:14.1f} {total[2]:10.1f} {total[0] / total[2]:13.2f}")


if __name__ == "__main__":
    sys.exit(main())
