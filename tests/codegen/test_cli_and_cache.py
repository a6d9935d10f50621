"""`psmc compile` writes a module that imports and runs on its own and is byte-for-byte
deterministic; a corrupt or half-written cache entry is recompiled, never imported."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

import psmc
from layer_cases import CASES, EXAMPLES_DIR
from psmc.cli import main as cli_main
from psmc.loader import compiled_path

ALLOWED_IMPORTS = {"math", "torch", "triton", "psmc"}


def start_python(code: str, *args, cwd, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"exit {process.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"


def test_compiled_module_imports_only_torch_and_the_runtime_and_runs_standalone(tmp_path):
    out = tmp_path / "gla_layer.py"
    assert cli_main(["compile", str(EXAMPLES_DIR / "gla.psm"), "-o", str(out)]) == 0
    imported = set()
    for node in ast.walk(ast.parse(out.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert {name.split(".")[0] for name in imported} <= ALLOWED_IMPORTS, imported
    assert all(name.startswith("psmc.runtime") for name in imported if name.split(".")[0] == "psmc"), imported

    # A fresh interpreter in another directory imports the file by path and runs it.
    standalone = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("gla_layer", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
g = torch.Generator().manual_seed(0)
k, gk, q = (torch.rand(2, 6, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
v = torch.rand(2, 6, 3, 5, generator=g, dtype=torch.float64)
out = module.gla()(k=k, v=v, gk=-gk, q=q)
torch.save(out, sys.argv[2])
"""
    saved = tmp_path / "out.pt"
    finish(start_python(standalone, out, saved, cwd=tmp_path))
    g = torch.Generator().manual_seed(0)
    k, gk, q = (torch.rand(2, 6, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.rand(2, 6, 3, 5, generator=g, dtype=torch.float64)
    want = psmc.load(CASES["gla"].path).gla()(k=k, v=v, gk=-gk, q=q)
    assert torch.equal(torch.load(saved), want)


def test_recompiling_every_example_gives_identical_bytes(tmp_path):
    """Two processes with different string-hash seeds (set and dict orders that depend on
    hashing would show) compile every example at the same time; the outputs are identical."""
    compile_all = """
import sys
from pathlib import Path
from psmc.cli import main
for path in sorted(Path(sys.argv[1]).glob("*.psm")):
    assert main(["compile", str(path), "-o", str(Path(sys.argv[2]) / (path.stem + ".py"))]) == 0, path
"""
    folders = [tmp_path / f"seed{seed}" for seed in (1, 2)]
    running = []
    for seed, out in enumerate(folders, start=1):
        out.mkdir()
        running.append(start_python(compile_all, EXAMPLES_DIR, out, cwd=tmp_path,
                                    env_extra={"PYTHONHASHSEED": str(seed)}))
    for process in running:
        finish(process)
    outputs = [{p.name: p.read_bytes() for p in out.glob("*.py")} for out in folders]
    assert set(outputs[0]) == {f"{name}.py" for name in CASES}
    for name, data in outputs[0].items():
        assert data == outputs[1][name], f"{name} differs between two compiles"


CORRUPTIONS = {
    "garbage": lambda text: "raise RuntimeError('a corrupt cache entry was imported')\n",
    "half-written": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    # The body changed after the checksum was written (the checksum line is kept).
    "tampered": lambda text: text.replace("import torch\n", "raise RuntimeError('a tampered cache entry was "
                                          "imported')\nimport torch\n", 1),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_corrupt_cache_entry_is_recompiled(tmp_path, monkeypatch, how):
    monkeypatch.setenv("PSMC_CACHE_DIR", str(tmp_path / "cache"))
    # A source of its own (the comment makes its cache key and module name unique), so this
    # process has never imported it and a trusted corrupt file would be imported here.
    source = tmp_path / "running_total.psm"
    source.write_text(f"# corrupted cache entry: {how}\n"
                      "op running_total { state (s: f32); combine (l, r) { return l.s + r.s; } }\n",
                      encoding="utf-8")
    cached = compiled_path(source)
    original = cached.read_bytes()
    corrupt = CORRUPTIONS[how](original.decode("utf-8"))
    assert corrupt != original.decode("utf-8")
    cached.write_text(corrupt, encoding="utf-8")

    module = psmc.load(source)
    assert cached.read_bytes() == original
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(module.running_total()(s=x), torch.tensor([[1.0, 3.0, 6.0]]))


def test_two_processes_loading_the_same_file_into_one_cache_both_succeed(tmp_path):
    """Both compile at once into the same cache directory (atomic rename of a complete file):
    both import a valid module, and exactly one checksummed entry is left, with no temp files."""
    load_and_run = """
import sys, torch, psmc
layer = psmc.load(sys.argv[1]).cumsum()
out = layer(x=torch.arange(4.0).reshape(1, 4))
assert out.tolist() == [[0.0, 1.0, 3.0, 6.0]], out
"""
    cache = tmp_path / "cache"
    running = [start_python(load_and_run, CASES["cumsum"].path, cwd=tmp_path,
                            env_extra={"PSMC_CACHE_DIR": str(cache)}) for _ in range(2)]
    for process in running:
        finish(process)
    entries = sorted(p.name for p in (cache / "modules").iterdir())
    assert len(entries) == 1 and entries[0].startswith("psm_") and entries[0].endswith(".py"), entries
