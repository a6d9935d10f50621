"""Docs that run: every ```python and ```bash/```sh/```shell block of README.md and docs/*.md
is executed, so the documentation cannot drift from the code.

A page runs top to bottom in one fresh temporary directory (never the repository root): its
shell blocks may create files that later blocks use (e.g. `cat > gla.psm`), and each Python
block runs in its own interpreter, so a snippet must define every name it uses. Output samples
are ```text blocks. A block may be skipped only by a visible marker on the line right before it,
`<!-- no-run: reason -->` (installs, full benchmarks, long experiments); the skips are counted
and listed below so they stay few. Every fenced block must say its language, so a new page
cannot hide an unrun snippet in a bare ``` block.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NOT_RUN = {"text", "psm", "console", "diff", "json", "toml", "yaml", "markdown", "md", "output", "triton"}
NO_RUN = re.compile(r"<!--\s*no-run:\s*(.+?)\s*-->")
# Skips allowed in the whole documentation (raise it only with a reason in the marker).
MAX_SKIPS = 6
TIMEOUT_S = 240


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang} block)"


def blocks(page: Path) -> list[Block]:
    out, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m.group(1)):])
            i += 1
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = NO_RUN.search(before)
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", skip.group(1) if skip else None))
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_block_says_its_language_and_skips_are_few():
    bare = [b.where for b in ALL if not b.lang]
    assert not bare, f"fenced blocks without a language (use python, bash, or text for output samples): {bare}"
    unknown = [f"{b.where}: {b.lang}" for b in ALL if b.lang not in RUN and b.lang not in NOT_RUN]
    assert not unknown, f"blocks of a language this test neither runs nor knows as non-code: {unknown}"
    skipped = [f"{b.where}: {b.skip}" for b in ALL if b.skip and b.lang in RUN]
    assert len(skipped) <= MAX_SKIPS, f"too many <!-- no-run --> blocks ({len(skipped)} > {MAX_SKIPS}): {skipped}"
    print(f"docs blocks: {sum(b.lang in RUN for b in ALL)} runnable, {len(skipped)} skipped:", *skipped, sep="\n  ")


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PSMC_CACHE_DIR"] = str(cache)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(block: Block, cwd: Path, env: dict):
    if RUN[block.lang] == "python":
        script = cwd / f"_block_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where} ran past {TIMEOUT_S} s; mark long commands with <!-- no-run: reason -->")
    if done.returncode:
        numbered = "\n".join(f"{block.line + i:5d} | {line}" for i, line in enumerate(block.code.splitlines(), 1))
        pytest.fail(f"{block.where} failed (exit {done.returncode}), run from an empty directory:\n{numbered}\n"
                    f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}", pytrace=False)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang in RUN and not b.skip for b in blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs_from_an_empty_directory(page, tmp_path, private_psmc_cache):
    env = _env(private_psmc_cache)
    # the `psmc` command of this checkout, whether or not the package is installed
    bin_dir = tmp_path / "_bin"
    bin_dir.mkdir()
    (bin_dir / "psmc").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m psmc.cli "$@"\n')
    (bin_dir / "psmc").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "work"
    work.mkdir()
    for block in blocks(page):
        if block.lang in RUN and not block.skip:
            _run(block, work, env)
