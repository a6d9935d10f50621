"""Long fuzzing campaigns: `python -m tests.fuzz --minutes N --seed S [--jobs J] [--out DIR]`.

Runs generated programs (the differential runner) and front-end mutants, alternating batches,
from seed S on, until N minutes have passed. Each new failure class gets a reproducer in DIR
(default fuzz-failures/, git-ignored): the shortest program or mutant seen of that class, with
its seed and run config, rewritten whenever a shorter one turns up. Prints counts as it goes
and a summary at the end (also DIR/summary.json). Exit status 1 when anything failed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "codegen"))
os.environ.setdefault("TRITON_INTERPRET", "1")

import campaign  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0, help="first seed (programs and mutants count up from it)")
    parser.add_argument("--jobs", type=int, default=campaign.default_jobs())
    parser.add_argument("--out", default="fuzz-failures")
    parser.add_argument("--batch", type=int, default=100, help="tasks per batch")
    parser.add_argument("--mutants-per-program", type=float, default=1.0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes
    counts = {"programs": 0, "mutants": 0, "valid_mutants": 0, "program_failures": 0, "mutant_failures": 0,
              "cpu_seconds": 0.0}
    classes: dict = {}  # class -> {"count", "length", "file", "seeds"}
    features: dict = {}
    checked: dict = {}
    started = time.time()
    workers = campaign.pool(args.jobs)
    # SIGTERM stops the campaign after the batch in flight, which still counts, and the summary
    # is written (an exception raised inside a task that runs in this process would be taken
    # for the task's own failure: psmc check turns KeyboardInterrupt into exit status 130)
    signal.signal(signal.SIGTERM, _stop)
    run_batches(args, deadline, workers, counts, classes, features, checked, out)
    if STOPPED:
        print("stopped early (SIGTERM): the summary counts the batches that finished", flush=True)
    if workers is not None:
        workers.shutdown()
    counts["cpu_seconds"] = round(counts["cpu_seconds"], 1)
    next_program, next_mutant = counts.pop("next_program"), counts.pop("next_mutant")
    summary = {"seed": args.seed, "minutes": round((time.time() - started) / 60, 1), **counts,
               "next_program_seed": next_program, "next_mutant_seed": next_mutant,
               "classes": classes, "features": dict(sorted(features.items())), "checked": dict(sorted(checked.items()))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("features", "checked")}, indent=2))
    return 1 if classes else 0


STOPPED = []


def _stop(signum, frame):
    STOPPED.append(signum)


def run_batches(args, deadline, workers, counts, classes, features, checked, out):
    next_program, next_mutant = args.seed, args.seed
    counts["next_program"], counts["next_mutant"] = next_program, next_mutant
    started = time.time()
    while time.time() < deadline and not STOPPED:
        n_mut = max(1, round(args.batch * args.mutants_per_program))
        for task, seeds, kind in ((campaign.program_task, range(next_program, next_program + args.batch), "programs"),
                                  (campaign.mutant_task, range(next_mutant, next_mutant + n_mut), "mutants")):
            outcomes = campaign.run_tasks(task, seeds, workers)
            for o in outcomes:
                counts[kind] += 1
                counts["cpu_seconds"] += o.cpu
                if kind == "mutants" and o.failure is None and o.valid:
                    counts["valid_mutants"] += 1
                for f in o.features:
                    features[f] = features.get(f, 0) + 1
                for c in o.checked:
                    checked[c] = checked.get(c, 0) + 1
                if o.failure is None:
                    continue
                counts["program_failures" if kind == "programs" else "mutant_failures"] += 1
                entry = classes.setdefault(o.failure, {"count": 0, "length": None, "file": None, "seeds": []})
                entry["count"] += 1
                entry["seeds"].append(o.seed)  # every failing seed: each re-runs alone after a fix
                if entry["length"] is None or len(o.text) < entry["length"]:
                    name = entry["file"] or f"{o.kind}_{len(classes):03d}"
                    (out / f"{name}.psm").write_text(
                        f"# {o.failure}\n# seed {o.seed}: {o.message}\n# {o.detail}\n".replace("\n# \n", "\n")
                        + o.text, encoding="utf-8")
                    if entry["file"] is None:
                        print(f"NEW CLASS {name}: {o.failure}", flush=True)
                    entry["file"], entry["length"] = name, len(o.text)
        next_program += args.batch
        next_mutant += n_mut
        counts["next_program"], counts["next_mutant"] = next_program, next_mutant
        elapsed = time.time() - started
        print(f"[{elapsed / 60:6.1f} min] programs {counts['programs']} ({counts['program_failures']} failed), "
              f"mutants {counts['mutants']} ({counts['valid_mutants']} valid, {counts['mutant_failures']} failed), "
              f"classes {len(classes)}", flush=True)

if __name__ == "__main__":
    sys.exit(main())
