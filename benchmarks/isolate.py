"""The GPU benchmark's rows in a child process that the parent can kill (gpu.py --isolate).

A row's SIGALRM budget (gpu.time_limit) cannot end a call that never returns to Python: a
compile that runs for minutes inside C++ (fla's autotuner compiling its backward kernels'
configurations on the H200, 2026-12-04) or a hung kernel. Python runs the handler only when
the call returns, so one such row used to stop the whole table. Here the rows run in a child
(`gpu.py --child EVENTS`), which writes one JSON event per line to the file EVENTS:

    {"event": "group", "index": i}                      a group (one entry of the plan) starts
    {"event": "case", "row": [group, shape, dtype, impl], "budget": s}   a row starts
    {"event": "case-end"}                               that row is done (its row may follow)
    {"event": "row", "index": i, "row": [...8 fields]}  a finished row, sent again if a note is added
    {"event": "say", "text": "..."}                     any other output line
    {"event": "done"}                                   the child got to the end

The parent reads them as they come. When a row outlives its budget plus a grace period (or
the work between two rows outlives SETUP_S), it kills the child's process group, writes that
row as killed, and starts a new child at the row after it (`--start-group`, `--skip-cases`:
the rows already done are not run again). A child that exits early (a crash, or a CUDA error,
after which its context is unusable) is restarted the same way.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE_S = 20.0  # past a row's own budget before the parent kills it
SETUP_S = 150.0  # the work between two rows (a group's layers built, its .psm files compiled)
POLL_S = 0.2


class EventLog:
    """The child's side: one JSON object per line, flushed at once (the parent reads it live)."""

    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the child's lifetime

    def emit(self, event: str, **fields):
        self.file.write(json.dumps({"event": event, **fields}) + "\n")
        self.file.flush()


def supervise(child_argv: list, groups: int, report, deadline: float, warm: bool) -> None:
    """Run `python gpu.py *child_argv --child EVENTS --start-group G --skip-cases N` until every
    group of the plan has run or the deadline passes, restarting after a kill or a crash.
    Rows and lines go to `report` (gpu.Report) as they arrive."""
    start_group, skip = 0, 0
    script = str(Path(__file__).resolve().parent / "gpu.py")
    while start_group < groups and deadline - time.perf_counter() > 5:
        events = tempfile.NamedTemporaryFile(prefix="psmc-bench-", suffix=".jsonl", delete=False)
        events.close()
        budget = deadline - time.perf_counter()
        cmd = [sys.executable, script, *child_argv, "--child", events.name, "--start-group", str(start_group),
               "--skip-cases", str(skip), "--budget", f"{budget:.0f}"]
        # its own process group (killed whole); its output comes as events (stderr: tracebacks)
        child = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL)
        state = _Watch(start_group, skip)
        try:
            outcome = _follow(child, events.name, state, report, deadline)
        finally:  # (an interrupted parent, e.g. by an outer timeout, takes its child with it)
            if child.poll() is None:
                _kill(child)
            os.unlink(events.name)
        if outcome == "done":
            return
        progressed = (state.group, state.cases) != (start_group, skip)
        if state.in_case:  # the row that was running: killed or crashed (the next child starts after it)
            why = {"killed": f"killed: the call did not return within its budget + {GRACE_S:.0f} s (the child "
                             "was restarted at the next row)",
                   "deadline": "killed: the benchmark's total time ran out in this row"}.get(
                outcome, f"the child process exited with code {outcome} in this row (restarted at the next row)")
            if warm:
                report.say(f"  warm {' | '.join(state.case)}: {why}")
            else:
                report.row(*state.case, None, None, "-", why)
        elif outcome == "killed" or not progressed:  # stuck or failing outside any row: the group's setup
            report.say(f"  group {state.group}: ended outside a row ({outcome}); going on with the next group")
            state.group, state.cases = state.group + 1, 0
        elif outcome != "deadline":
            report.say(f"  group {state.group}: the child process exited with code {outcome} after a row; "
                       "going on with the next row")
        if outcome == "deadline":
            return
        start_group, skip = state.group, state.cases


class _Watch:
    """What the parent knows of the child: the group it is in, the rows started in that group,
    the row running now and when the parent gives up on it."""

    def __init__(self, group: int, skip: int):
        self.group, self.cases = group, skip
        self.case = None
        self.in_case = False
        self.rows: dict = {}  # the child's row index -> the report's
        self.until = time.perf_counter() + SETUP_S


def _follow(child, path: str, state: _Watch, report, deadline: float):
    """Read the child's events until it ends ('done', or its exit code) or is killed ('killed',
    'deadline')."""
    offset, buffered = 0, ""
    while True:
        exited = child.poll() is not None
        with open(path, encoding="utf-8") as f:
            f.seek(offset)
            chunk = f.read()
            offset = f.tell()
        buffered += chunk
        *lines, buffered = buffered.split("\n")
        for line in lines:
            if line.strip() and _apply(json.loads(line), state, report) == "done":
                child.wait()
                return "done"
        if exited:
            return child.returncode
        now = time.perf_counter()
        if now > deadline + GRACE_S:
            _kill(child)
            return "deadline"
        if now > state.until:
            _kill(child)
            return "killed"
        time.sleep(POLL_S)


def _apply(event: dict, state: _Watch, report):
    kind = event["event"]
    if kind == "group":
        state.group, state.cases, state.case, state.in_case = event["index"], 0, None, False
        state.until = time.perf_counter() + SETUP_S
    elif kind == "case":
        state.cases += 1
        state.case, state.in_case = tuple(event["row"]), True
        state.until = time.perf_counter() + event["budget"] + GRACE_S
    elif kind == "case-end":
        state.in_case = False
        state.until = time.perf_counter() + SETUP_S
    elif kind == "row":  # a row, or a later version of one (a note added after it was written)
        if event["index"] in state.rows:
            report.rows[state.rows[event["index"]]] = tuple(event["row"])
            report.rows_changed()
        else:
            state.rows[event["index"]] = len(report.rows)
            report.row(*event["row"])
    elif kind == "say":
        report.say(event["text"])
    return kind


def _kill(child):
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
