"""Running many generated programs and mutants: the CI slice and long campaigns share this.

Every task is a seed: program seed s is `generate(s)` run under `draw_config(Random(s))`;
mutant seed s mutates an example or a generated program chosen by `Random(s)`. Tasks run in
worker processes (spawned: no forked torch thread pools), each with one intra-op thread and
its own scratch folder; results come back as plain tuples, so a run is the same list whatever
the number of workers.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

MUTANT_SALT = 0x6D757461  # mutant seeds draw from another stream than program seeds
CONFIG_SALT = 0x5EED
HALF_SALT = 0x4A1F  # the half-precision draw: its own stream, so the earlier draws stay as they were
VARLEN_SALT = 0x7A11  # the varlen draw, likewise
PER_LANE_SALT = 0x1A4E  # the per-lane draw, likewise
COMPILED_SALT = 0x7C0D  # the torch.compile draw, likewise
# the C++ backend is compared on every CPP_EVERY-th program seed (whose plan it covers): a build
# costs seconds, the other checks a fraction of one; builds are cached by content in
# PSMC_CACHE_DIR, which the worker processes share
CPP_EVERY = 25

_SCRATCH = None


@dataclass(frozen=True)
class Outcome:
    kind: str  # 'program' | 'mutant'
    seed: int
    failure: str | None  # the failure class, None when every check passed
    message: str
    text: str  # the program (or mutant) text
    detail: str  # the config of a program run
    features: frozenset
    checked: frozenset
    valid: bool = True  # a mutant that is a valid program
    cpu: float = 0.0  # CPU seconds the task took (its worker's process time: C++ builds run in child processes)


def _scratch() -> Path:
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="psmc_fuzz_"))
    return _SCRATCH


def _init_worker():
    import torch
    torch.set_num_threads(1)
    # Triton's interpreter without its repeated patching (tests/triton_interpreter.py)
    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.append(tests)
    import triton_interpreter
    triton_interpreter.install()


def _timed(task):
    def run(seed: int) -> Outcome:
        start = time.process_time()
        outcome = task(seed)
        return dataclasses.replace(outcome, cpu=time.process_time() - start)
    run.__name__ = run.__qualname__ = task.__name__
    return run


def program_config(seed: int):
    """The run config of program seed `seed` (deterministic)."""
    from runner import draw_compiled, draw_config, draw_half, draw_per_lane, draw_varlen
    config = draw_config(random.Random(seed ^ CONFIG_SALT))
    return dataclasses.replace(config, cpp=seed % CPP_EVERY == 0, half=draw_half(random.Random(seed ^ HALF_SALT)),
                               varlen=draw_varlen(random.Random(seed ^ VARLEN_SALT), config),
                               per_lane=draw_per_lane(random.Random(seed ^ PER_LANE_SALT)),
                               compiled=draw_compiled(random.Random(seed ^ COMPILED_SALT)))


def _program_task(seed: int) -> Outcome:
    from generator import generate
    from runner import Failure, failure_class, run_program
    program = generate(seed)
    config = program_config(seed)
    folder = _scratch() / f"p{seed}"
    folder.mkdir(exist_ok=True)
    try:
        info = run_program(program, config, folder)
    except Failure as err:
        return Outcome("program", seed, failure_class(err), err.message, program.text, repr(config),
                       program.features, frozenset())
    except Exception as err:  # the runner itself broke: report it as a failure too
        return Outcome("program", seed, f"runner: {type(err).__name__}", str(err), program.text, repr(config),
                       program.features, frozenset())
    checked = set(info["checked"]) | {f"plan-{info['plan']}"} | ({f"fast-{info['fast']}"} if info["fast"] else set())
    if config.time > 64:
        checked.add("T-above-block")
    if config.block < 64 and config.time > config.block * config.block:
        checked.add("multi-level-blocks")
    if config.lanes:
        checked.add(f"lanes-{len(config.lanes)}")
        if any(any(m) for m in config.broadcast):
            checked.add("lane-broadcast")
    return Outcome("program", seed, None, "", program.text, repr(config), program.features, frozenset(checked))


def _mutant_task(seed: int) -> Outcome:
    from generator import generate
    from mutate import MutantFailure, check_mutant, example_texts, mutant_class, mutate
    rng = random.Random(seed ^ MUTANT_SALT)
    examples = example_texts()
    base = rng.choice(examples) if rng.random() < 0.5 else generate(rng.randrange(2**31)).text
    text = mutate(base, rng)
    try:
        valid = check_mutant(text, _scratch() / f"m{seed}.psm")
    except MutantFailure as err:
        return Outcome("mutant", seed, mutant_class(err), err.message, text, "", frozenset(), frozenset())
    except Exception as err:
        return Outcome("mutant", seed, f"runner: {type(err).__name__}", str(err), text, "", frozenset(), frozenset())
    return Outcome("mutant", seed, None, "", text, "", frozenset(), frozenset(), valid)


def program_task(seed: int) -> Outcome:
    return _timed(_program_task)(seed)


def mutant_task(seed: int) -> Outcome:
    return _timed(_mutant_task)(seed)


def pool(jobs: int):
    """Worker processes for `run_tasks` (None for jobs <= 1: run in this process)."""
    if jobs <= 1:
        _init_worker()
        return None
    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker)


def run_tasks(task, seeds, workers=None) -> list[Outcome]:
    seeds = list(seeds)
    if workers is None:
        return [task(s) for s in seeds]
    jobs = workers._max_workers
    return list(workers.map(task, seeds, chunksize=max(1, min(8, len(seeds) // (jobs * 4)))))


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def report(outcomes: list[Outcome], limit: int = 5) -> str:
    """Failures grouped by class, the shortest instance of each shown in full."""
    by_class: dict = {}
    for o in outcomes:
        if o.failure is not None:
            by_class.setdefault(o.failure, []).append(o)
    lines = []
    for cls, items in sorted(by_class.items(), key=lambda kv: -len(kv[1])):
        first = min(items, key=lambda o: len(o.text))
        lines.append(f"[{len(items)}x] {cls}\n  seeds {[o.seed for o in items[:limit]]}\n  {first.message}\n"
                     f"  {first.detail}\n" + "\n".join("    " + line for line in first.text.splitlines()))
    return "\n".join(lines)
