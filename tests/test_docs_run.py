"""Docs that run: every ```python and ```bash/```sh/```shell block of README.md and docs/*.md
is executed, so the documentation cannot drift from the code.

A page runs top to bottom in one fresh temporary directory (never the repository root): its
shell blocks may create files that later blocks use (e.g. `cat > gla.psm`). A page's blocks
run in ONE Python process (importing torch once per page, not once per block: that import
was most of the test's time), each Python block in a fresh namespace, so a snippet must
still define every name it uses; the page shares one PSMC_CACHE_DIR with the session. Output samples
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
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line} ({self.lang} block)"


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


# The page runner: executed as `python -c RUNNER blocks.json` in the page's directory. Python
# blocks run with exec() in a fresh namespace (named __main__), bash blocks in `bash -euo
# pipefail`; the first failure prints its block and traceback and exits 1.
RUNNER = r"""
import json, subprocess, sys, traceback
for i, (where, lang, path) in enumerate(json.load(open(sys.argv[1]))):
    print(f"@@block {i}", flush=True)
    if lang == "python":
        code = open(path, encoding="utf-8").read()
        try:
            exec(compile(code, path, "exec"), {"__name__": "__main__", "__file__": path})
        except SystemExit as e:
            if e.code not in (None, 0):
                print(f"@@failed {i} (SystemExit {e.code})", flush=True)
                sys.exit(1)
        except BaseException:
            traceback.print_exc()
            print(f"@@failed {i}", flush=True)
            sys.exit(1)
    else:
        done = subprocess.run(["bash", "-euo", "pipefail", path])
        if done.returncode:
            print(f"@@failed {i} (exit {done.returncode})", flush=True)
            sys.exit(1)
"""


def _run_page(runnable: list[Block], cwd: Path, env: dict):
    import json

    listing = []
    for i, block in enumerate(runnable):
        path = cwd / f"_block_{block.line}.{'py' if RUN[block.lang] == 'python' else 'sh'}"
        path.write_text(block.code, encoding="utf-8")
        listing.append((block.where, RUN[block.lang], str(path)))
    (cwd / "_blocks.json").write_text(json.dumps(listing), encoding="utf-8")
    cmd = [sys.executable, "-c", RUNNER, str(cwd / "_blocks.json")]
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = re.findall(r"@@block (\d+)", out)
        where = runnable[int(started[-1])].where if started else runnable[0].where
        pytest.fail(f"{where} ran past the page's {TIMEOUT_S} s; mark long commands with <!-- no-run: reason -->")
    if done.returncode:
        failed = re.findall(r"@@failed (\d+)", done.stdout)
        block = runnable[int(failed[-1])] if failed else runnable[-1]
        numbered = "\n".join(f"{block.line + i:5d} | {line}" for i, line in enumerate(block.code.splitlines(), 1))
        pytest.fail(f"{block.where} failed (exit {done.returncode}), run from an empty directory:\n{numbered}\n"
                    f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}", pytrace=False)


@pytest.mark.heavy
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
    _run_page([b for b in blocks(page) if b.lang in RUN and not b.skip], work, env)


def test_a_failing_block_is_reported_with_its_page_and_line(tmp_path, private_psmc_cache):
    """The runner is not vacuous: a block that raises fails the page and names the block;
    names do not leak from one Python block into the next."""
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```bash\ntrue\n```\n\n```python\nprint(x)\n```\n",
                    encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    runnable = [b for b in blocks(page) if b.lang in RUN]
    with pytest.raises(pytest.fail.Exception) as info:
        _run_page(runnable, work, _env(private_psmc_cache))
    assert "(python block) failed (exit 1)" in str(info.value) and ":9 (python block)" in str(info.value)
    assert "NameError: name 'x' is not defined" in str(info.value)
