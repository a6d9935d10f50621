"""The package's import structure, read from the source (ast): no stage imports a later one,
the runtime imports no compiler stage, and there is no import cycle.

Stages, in order: grammar (the front end) -> ir -> analysis -> plan -> codegen. The drivers
(psmc.compiler, psmc.cli, psmc.loader) may import every stage; psmc.errors and the package
root are shared by all. Every import counts, also one inside a function (a lazy import is
still a dependency on that stage)."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "psmc"
STAGES = ("grammar", "ir", "analysis", "plan", "codegen")
COMPILER = set(STAGES) | {"compiler", "cli", "loader"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The psmc modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "psmc"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "psmc":
                continue
            for a in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{a.name}"
                out.add(sub if (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (ROOT.parent / Path(*sub.split(".")) / "__init__.py").exists() else target)
    return out


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def files():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_stages_exist():
    assert all((ROOT / s).is_dir() for s in STAGES)


def test_no_stage_imports_a_later_stage():
    wrong = []
    for path in files():
        me = part(module_name(path))
        if me not in STAGES:
            continue
        for target in imports(path):
            other = part(target)
            if other in STAGES and STAGES.index(other) > STAGES.index(me):
                wrong.append(f"{module_name(path)} imports {target} ({other} comes after {me})")
            if other in ("compiler", "cli", "loader"):
                wrong.append(f"{module_name(path)} imports the driver {target}")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_imports_no_compiler_stage():
    wrong = [f"{module_name(p)} imports {t}" for p in files() if part(module_name(p)) == "runtime"
             for t in imports(p) if part(t) in COMPILER]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_stages():
    graph = nx.DiGraph()
    for path in files():
        me = part(module_name(path))
        for target in imports(path):
            if part(target) != me and me and part(target):
                graph.add_edge(me, part(target))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def test_no_import_cycle_between_modules_at_import_time():
    graph = nx.DiGraph()
    for path in files():
        for target in imports(path, top_level_only=True):
            graph.add_edge(module_name(path), target)
    # a package importing its own submodules (psmc.ir -> psmc.ir.lower) is how packages load
    cycles = [c for c in nx.simple_cycles(graph)
              if not any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(c, c[1:] + c[:1]))]
    assert not cycles, cycles


def test_no_import_cycle_inside_codegen_even_through_lazy_imports():
    """The printers import each other in one direction: a lazy import inside a function is a
    cycle too (the Triton printers had one: triton_printer -> triton_matrix -> triton_printer)."""
    graph = nx.DiGraph()
    for path in files():
        me = module_name(path)
        if part(me) != "codegen":
            continue
        graph.add_node(me)
        for target in imports(path):
            if part(target) == "codegen" and target != "psmc.codegen":
                graph.add_edge(me, target)
    assert graph.has_edge("psmc.codegen.triton_kernels", "psmc.codegen.triton_matrix")  # not vacuous
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def test_the_checker_resolves_relative_and_lazy_imports():
    """Not vacuous: the imports the other tests judge are really found."""
    assert "psmc.codegen.module" in imports(ROOT / "compiler.py")  # top level, relative
    assert "psmc.codegen.triton_layout" in imports(ROOT / "compiler.py")  # inside a function
    assert "psmc.codegen.triton_layout" not in imports(ROOT / "compiler.py", top_level_only=True)
    assert "psmc.analysis.classes" in imports(ROOT / "plan" / "__init__.py")  # from a package
