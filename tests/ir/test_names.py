"""Names that mean something to Python are ordinary names in a `.psm` file.

The front end accepts any NAME the grammar allows, including Python keywords (`class`,
`lambda`, `import`), builtins and modules (`torch`, `math`, `len`), dunders (`__import__`,
`__init__`, `__builtins__`) and the names generated code uses itself (`self`, `cx`, `lead`,
`index`, `t0`, `x_lead`, `_F`). They stay harmless because of the mangling rule, which this file
checks on the generated module:

- an input `n` is the method parameter `x_n`;
- a state field `n` is `l_n` / `r_n` in combine (earlier / later element) and `s_n` in readout;
- a param `n` is the registered parameter `p_n` (read as `self.p_n`);
- a dim `n` is only a string key, `cx.d['n']`;
- an op `n` is the class `Op_n`, always reachable as `__psmc_layers__['n']`, and also bound as
  the module attribute `n` when that cannot shadow anything the module uses;
- a `let` name `n` names its value `v_n` (a value without a let is a numbered temporary `tN`);
- fn names, fn parameters and the element names of combine/readout never reach the generated
  code (fns are inlined);
- everything else from the source (names in specs, the op's text in the class docstring) appears
  only inside string literals.

An input whose name is also a keyword parameter of `forward` / `step` (`state`, `return_state`)
is passed positionally (inputs bind positionally in declaration order). An input named `self`
is an error at its name: no Python call could pass it by keyword (fields and params may be
called `self`).
"""
import ast
import importlib.util
import re
import sys

import pytest
import torch

from psmc.compiler import compile_source
from psmc.errors import PsmcError
from psmc.ir import ops_from_source

TEMPLATE = """
# {op}: a running sum written with hostile names; the readout adds a second input and the
# running sum of a third one.
fn {fn}({p1}, {p2}) {{ return {p1} + {p2}; }}

op {op}[{d1}, {d2}] {{
  param {w1}: f32[{d2}] = ones;
  param {w2}: f32[{d1}] = zeros;
  state ({f1}: f32[{d2}], {f2}: f32);
  lift ({i1}: f32[{d2}], {i2}: f32, {i3}: f32) {{ let {t1} = {i1} * {i2}; return ({t1}, {i3}); }}
  combine ({e1}, {e2}) {{
    let {t2} = {e1}.{f2} + {e2}.{f2};
    return ({fn}({e1}.{f1}, {e2}.{f1}), {t2});
  }}
  identity = (zeros, 0.0);
  readout ({e3}, {i4}: f32[{d2}]) {{ return {e3}.{f1} * {w1} + {i4} + {e3}.{f2} + sum({w2}); }}
}}
"""
HOSTILE = dict(fn="torch", p1="self", p2="math", op="class", d1="lambda", d2="cx", w1="__init__", w2="self",
               f1="__import__", f2="index", i1="lead", i2="x_lead", i3="index", i4="__builtins__",
               t1="t0", t2="l_index", e1="import", e2="_F", e3="return_state")
# The same program with every user name spelled as a unique marker, to find where names land.
MARKED = {key: f"{key}_marker" for key in HOSTILE}
PREFIXES = ("x_", "l_", "r_", "s_", "p_", "v_", "Op_")


def import_generated(source: str, tmp_path, name: str):
    """Write the module to a file (Triton's @jit needs real source) and import it."""
    path = tmp_path / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"psmc_test_names_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_front_end_accepts_hostile_names():
    (op,) = ops_from_source(TEMPLATE.format(**HOSTILE))
    assert op.name == "class" and op.dims == ("lambda", "cx")
    assert [v.name for v in op.inputs] == ["lead", "x_lead", "index", "__builtins__"]
    assert [f.name for f in op.state] == ["__import__", "index"]
    assert [p.name for p in op.params] == ["__init__", "self"]
    # an input called `index` shadows the position inside lift: the lift reads the input
    assert (op.lift[1].op, op.lift[1].attrs) == ("arg", ("index",))


@pytest.mark.parametrize("name", ["class", "def", "import", "lambda", "None_", "__import__", "__class__",
                                  "__builtins__", "torch", "math", "self", "cx", "lead", "index", "t0",
                                  "x_a", "_F", "_ops", "print", "exec", "eval", "open", "state", "lift",
                                  "combine", "readout", "exclusive", "T"])
def test_any_name_is_a_valid_input_field_and_param(name):
    input_name = name if name != "self" else "x"  # an input may not be called self (below)
    text = (f"op o[D] {{ param {name}_p: f32[D]; state ({name}: f32[D]); lift ({input_name}: f32[D]) "
            f"{{ return {input_name}; }} combine (l, r) {{ return l.{name} + r.{name} * {name}_p; }} }}")
    (op,) = ops_from_source(text)
    assert op.state[0].name == name and op.inputs[0].name == input_name


@pytest.mark.parametrize("where", ["lift (self: f32) { return self; }",
                                   "lift (x: f32) { return x; } readout (s, self: f32) { return s.y * self; }"])
def test_an_input_named_self_is_a_located_error(where):
    # issue 11: it compiled, but `layer(self=...)` could never be called (nn.Module.__call__'s self)
    text = f"op o {{\n  state (y: f32);\n  {where}\n  combine (l, r) {{ return l.y + r.y; }}\n}}\n"
    with pytest.raises(PsmcError) as err:
        ops_from_source(text, "self.psm")
    line, col = err.value.line, err.value.col
    assert line == 3 and text.splitlines()[2][col - 1:].startswith("self"), str(err.value)
    assert "cannot be named 'self'" in str(err.value) and "rename" in str(err.value)


def identifiers(tree) -> list[tuple[str, ast.AST]]:
    out = []
    for node in ast.walk(tree):
        for attr in ("id", "arg", "attr", "name"):
            value = getattr(node, attr, None)
            if isinstance(value, str):
                out.append((value, node))
        if isinstance(node, ast.alias):
            out.append((node.asname or node.name, node))
    return out


def test_user_names_reach_generated_code_only_behind_a_prefix():
    compiled = compile_source(TEMPLATE.format(**MARKED), "marked.psm")
    tree = ast.parse(compiled.source)
    seen = {}
    for ident, node in identifiers(tree):
        for key, marker in MARKED.items():
            if marker in ident:
                seen.setdefault(key, set()).add(ident)
    # the op's own name may also be the module-level alias (a plain assignment at top level)
    aliases = {t.id for stmt in tree.body if isinstance(stmt, ast.Assign) for t in stmt.targets
               if isinstance(t, ast.Name)}
    for key, idents in seen.items():
        for ident in idents:
            ok = any(ident == prefix + MARKED[key] for prefix in PREFIXES)
            ok = ok or (key == "op" and ident == MARKED["op"] and ident in aliases)
            assert ok, f"{key} appears as the identifier {ident!r}"
    assert seen["i1"] == {"x_i1_marker"} and seen["w1"] == {"p_w1_marker"}
    assert seen["f1"] >= {"l_f1_marker", "r_f1_marker", "s_f1_marker"}
    assert seen["t1"] == {"v_t1_marker"} and seen["t2"] == {"v_t2_marker"}  # let names survive, prefixed
    # names that live only in the DSL never reach the module, not even behind a prefix
    for key in ("fn", "p1", "p2", "e1", "e2", "e3", "d1", "d2"):
        assert key not in seen, f"{key} leaked into the generated code as {seen.get(key)}"


def test_hostile_names_compile_run_and_stream(tmp_path):
    compiled = compile_source(TEMPLATE.format(**HOSTILE), "hostile.psm")
    tree = ast.parse(compiled.source)
    bare = {ident for ident, node in identifiers(tree) if isinstance(node, ast.Name)}
    assert not bare & {"__import__", "__builtins__", "lambda_", "x_lead_"}  # never a bare user name
    module = import_generated(compiled.source, tmp_path, "hostile")
    assert not hasattr(module, "class") or getattr(module, "class") is module.__psmc_layers__["class"]
    layer = module.__psmc_layers__["class"](**{"lambda": 2, "cx": 3})
    gen = torch.Generator().manual_seed(0)
    B, T = 2, 5
    lead = torch.randn(B, T, 3, generator=gen)
    x_lead = torch.randn(B, T, generator=gen)
    index = torch.randn(B, T, generator=gen)
    builtins_ = torch.randn(B, T, 3, generator=gen)
    inputs = {"lead": lead, "x_lead": x_lead, "index": index, "__builtins__": builtins_}
    out = layer(**inputs)
    expected = torch.cumsum(lead * x_lead[..., None], 1) + builtins_ + torch.cumsum(index, 1)[..., None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    state = layer.init_state()
    for t in range(T):
        step_out, state = layer.step(state, **{k: v[:, t] for k, v in inputs.items()})
        torch.testing.assert_close(step_out, expected[:, t], rtol=1e-5, atol=1e-5)


def test_inputs_named_like_forward_keywords_bind_positionally(tmp_path):
    text = """
    op __import__ {
      state (cx: f32, state: i64);
      lift (cx: f32, return_state: f32) { return (cx * 2.0 + return_state, index); }
      combine (l, r) { return (l.cx + r.cx, r.state); }
    }
    """
    compiled = compile_source(text, "keywords.psm")
    module = import_generated(compiled.source, tmp_path, "keywords")
    assert not hasattr(module, "__import__") or module.__import__ is not module.__psmc_layers__["__import__"]
    layer = module.__psmc_layers__["__import__"]()
    self_, return_state = torch.randn(2, 4), torch.randn(2, 4)
    total, position = layer(self_, return_state)
    torch.testing.assert_close(total, torch.cumsum(2 * self_ + return_state, 1))
    assert position.tolist() == [[0, 1, 2, 3]] * 2


GLA_BODY = ("[K, V] { state (a: f32[K], S: f32[K, V]); "
            "lift (k: f32[K], v: f32[V], gk: f32[K]) { return (exp(gk), outer(k, v)); } "
            "combine (l, r) { return (l.a * r.a, r.a[:, None] * l.S + r.S); } identity = (ones, zeros); "
            "readout (s, q: f32[K]) { return q @ s.S; } }")


SUM_BODY = " { state (x: f32); combine (l, r) { return l.x + r.x; } }"


def compile_ops_named(names, tmp_path, module_name, body=GLA_BODY):
    text = "\n".join(f"op {name}{body}" for name in names)
    return import_generated(compile_source(text, f"{module_name}.psm").source, tmp_path, module_name)


def test_op_aliases_name_their_own_op(tmp_path):
    # `Op_a` is both the class of op `a` and the public alias of op `Op_a`: the alias must not
    # take op a's class away (or hand op a the class of op Op_a), in either order
    for names in (["Op_a", "a"], ["a", "Op_a"]):
        module = compile_ops_named(names, tmp_path, "aliases_" + "_".join(names), SUM_BODY)
        for name in names:
            assert module.__psmc_layers__[name].spec.name == name
            alias = getattr(module, name, None)
            if isinstance(alias, type) and hasattr(alias, "spec"):
                assert alias.spec.name == name, f"module.{name} is the layer of op {alias.spec.name!r}"


def test_op_names_never_shadow_what_the_module_uses(tmp_path):
    # an op named like a builtin the generated code calls (`len`, `tuple`) or like a module
    # global (`tl`) must not change what any layer computes
    names = ["len", "tuple", "tl", "plain"]
    module = compile_ops_named(names, tmp_path, "shadow")
    gen = torch.Generator().manual_seed(1)
    k, q = torch.randn(1, 6, 2, generator=gen), torch.randn(1, 6, 2, generator=gen)
    v, gk = torch.randn(1, 6, 3, generator=gen), -torch.rand(1, 6, 2, generator=gen)
    # the same layer under four names: each must run and agree with a plain recurrence
    S = torch.zeros(1, 2, 3)
    expected = []
    for t in range(6):
        S = gk[:, t].exp()[..., None] * S + k[:, t, :, None] * v[:, t, None, :]
        expected.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    expected = torch.stack(expected, 1)
    broken = {}
    for name in names:
        try:
            out = module.__psmc_layers__[name](K=2, V=3)(k=k, v=v, gk=gk, q=q)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        except Exception as err:  # report every op that broke, not just the first
            broken[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    assert broken == {}


def test_docstring_cannot_be_escaped(tmp_path):
    # the op's text (comments included) becomes the class docstring: quotes and backslashes
    # in it stay text
    text = ('op doc {  # """; PWNED = 1; """ \\N{BULLET} \\x \\u12 \\\n'
            '  state (x: f32);  # \'\'\' and a trailing backslash \\\n'
            '  combine (l, r) { return l.x + r.x; }\n}\n')
    compiled = compile_source(text, "doc.psm")
    module = import_generated(compiled.source, tmp_path, "doc")
    assert not hasattr(module, "PWNED")
    doc = module.__psmc_layers__["doc"].__doc__
    assert '# """; PWNED = 1; """ \\N{BULLET} \\x \\u12 \\' in doc
    assert re.search(r"trailing backslash \\\n", doc)


def test_let_names_survive_into_the_generated_code():
    """`let kv = outer(k, v)` is `v_kv = ...` in the module, also after canonicalisation and
    when two lets of one body share a name (the second gets a trailing underscore)."""
    text = ("fn kv(a, b) { let m = outer(a, b); return m; }\n"
            "op letty[K, V] { state (a: f32[K], S: f32[K, V]);\n"
            "  lift (k: f32[K], v: f32[V], gk: f32[K]) { let decay = exp(gk); return (decay, kv(k, v)); }\n"
            "  combine (l, r) { let z = l.S * r.a[:, None]; return (l.a * r.a, z + r.S); }\n"
            "  readout (s, q: f32[K]) { let o = q @ s.S; let m = o * 2.0; return m; } }")
    source = compile_source(text, "letty.psm").source
    for line in ("v_decay = torch.exp(x_gk)", "v_m = _ops.outer(x_k, x_v)", "v_z = t1 * l_S",
                 "v_o = _ops.matmul(x_q, s_S, 1, 2)"):
        assert line in source, line
    assert "v_m = 2.0 * v_o" in source  # readout's own `m` (another method: the name is free)


def test_two_values_with_one_let_name_get_two_identifiers():
    text = ("fn kv(a, b) { let m = outer(a, b); return m; }\n"
            "op two[K, V] { state (S: f32[K, V], U: f32[K, V]);\n"
            "  lift (k: f32[K], v: f32[V], w: f32[V]) { return (kv(k, v), kv(k, w)); }\n"
            "  combine (l, r) { return (l.S + r.S, l.U + r.U); } }")
    source = compile_source(text, "two.psm").source
    assert "v_m = _ops.outer(x_k, x_v)" in source and "v_m_ = _ops.outer(x_k, x_w)" in source
