"""`PsmLayer.step` as torch.compile traces it: the checks at trace time, out of the guards.

Dynamo turns every Python value a traced function reads into a guard that it evaluates again
on every call. Traced as written, `step`'s checks read the op's spec slot by slot (names,
ranks, dims, shape functions, dtype tables) and walk the module's parameters: 159 guard
checks for GLA (about 7 us per token on the benchmark machine), against 38 (1.2 us) for a
hand-written step. Yet the outcome of those checks is fixed by a few literals: the layer's
class (whose spec is frozen when its module loads), its configuration (dims, lanes, per-lane
params, backend, fast-path switch, finite check), its parameters' dtypes and devices, and the
inputs' names, shapes, dtypes and devices, which the tensors' own guards pin anyway.

So the traced step (`PsmLayer._traced_step`) reads those literals, a cheap guard each, and
hands them to `signature`, which `torch.compiler.assume_constant_result` runs once per trace,
eagerly, on a stand-in layer of the same class and configuration and on stand-in inputs of the
same signature: the very `_prepare` of eager `step`, so the same errors, raised when the call
is traced. Its result is a constant of the graph, and it is a function of its arguments alone,
which Dynamo guards: when one changes, Dynamo traces again and `signature` runs again. So the
constant assumption holds by construction (nothing it reads is left unguarded). The state is
checked in the trace as in eager `step` (a tag comparison, the full check for an untagged
state), and the token runs through the runner an eager step would choose, so the graph is the
update alone.

Shapes that Dynamo made symbolic (a stream whose batch changed, under automatic dynamic
shapes) are not literals: those calls take the fully traced check.
"""
from __future__ import annotations

import ast
import dataclasses
import functools

import torch


@functools.lru_cache(maxsize=64)
def _stand_in(cls, config: tuple):
    """A layer of class `cls` with configuration `config` (`PsmLayer._traced_step` builds it);
    its parameters' values are never read: the checks look at their dtypes and devices only."""
    dims, lanes, per_lane, backend, use_fast_path, check_finite, params = config
    layer = cls(backend=backend, check_finite=check_finite, lanes=lanes, per_lane=per_lane, **dict(dims))
    layer.use_fast_path = use_fast_path
    with torch.no_grad():
        for name, dtype, device in params:
            p = layer._parameters[name]
            layer._parameters[name] = torch.nn.Parameter(p.to(device=device, dtype=dtype), p.requires_grad)
    return layer


@torch.compiler.assume_constant_result
def signature(cls, config: tuple, sig: tuple) -> tuple:
    """What `_prepare` decides for a step of class `cls`, configuration `config` and inputs
    `sig` ((name, shape, dtype, device) each): (ctx, lead, tag, out_dtype, plan, runner), literals
    (ctx as (dims items, device, dtype-table items, scan kernel): a dict returned here would be
    a graph constant Dynamo cannot guard), plan the (name, shape, dtype) of the inputs that need
    a cast or a reshape, runner the name of the method that runs the token (what `_step_runner`
    chooses under compile; None when it is not a method). None when the inputs are wrong: the
    fully traced check then raises what eager `step` raises."""
    layer = _stand_in(cls, config)
    inputs = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape, dtype, device in sig}
    try:
        call = layer._prepare(inputs, step=True)
    except (TypeError, ValueError):
        return None  # the fully traced check raises it (an exception here would reach the user wrapped)
    plan = tuple((n, tuple(call.inputs[n].shape), call.inputs[n].dtype) for n, x in inputs.items()
                 if x.dtype != call.inputs[n].dtype or x.shape != call.inputs[n].shape)
    ctx = call.ctx
    return (tuple(ctx.d.items()), ctx.dev, tuple(ctx.dt.items()), ctx.scan_kernel), call.lead, call.tag, \
        call.out_dtype, plan, _method_name(layer, layer._step_runner(call))


def _method_name(layer, run) -> str | None:
    """The name of the runner when it is a method of the layer (a function cannot be a graph
    constant: Dynamo cannot guard it), else None (the trace then asks `_step_runner` itself)."""
    return run.__name__ if getattr(run, "__self__", None) is layer else None


# ---------------------------------------------------------------- PsmLayer.step_function
@dataclasses.dataclass(frozen=True)
class StepSignature:
    """What a step function was built for: the op, its inputs' names, (shape, dtype, device)
    of each input and (name, shape, dtype, device) of each state tensor; `constants`, what its
    update reads besides tensors (input names, casts, state slots, finite check, output dtype)."""

    op: str
    names: tuple
    inputs: tuple
    state: tuple
    constants: tuple


_SIGNATURES: list = []  # register(): a step function's key is its index (entries are never changed)


def register(signature: StepSignature) -> int:
    """The key a compiled step function hands `step_mismatch` (an int: one cheap guard)."""
    _SIGNATURES.append(signature)
    return len(_SIGNATURES) - 1


@torch.compiler.assume_constant_result
def step_constants(key: int, state: tuple, inputs: tuple) -> tuple:
    """(None, step function `key`'s constants) when called with state tensors and inputs of
    these signatures (`PsmLayer`'s `_describe`), (the error message, None) when they are not
    the ones it was built for.
    A function of its arguments alone (registered signatures never change), which Dynamo
    guards: the key is one guard, the signatures are pinned by the tensors' own guards."""
    signature = _SIGNATURES[key]
    error = mismatch_error(signature, state, inputs, strict=False)
    return (None, signature.constants) if error is None else (str(error), None)


def mismatch_error(sig: StepSignature, state: tuple, inputs: tuple, strict: bool = True):
    """The ValueError (TypeError for a wrong input count) naming the first input or state
    tensor that differs from `sig`; None when none does (strict: the caller knows one does)."""
    def shown(d):
        return d if isinstance(d, str) else f"{d[0]} {d[1]} on {d[2]}"
    if len(inputs) != len(sig.inputs):
        return TypeError(f"{sig.op} step function takes the state tensors and {len(sig.inputs)} inputs "
                         f"({', '.join(sig.names)}), got {len(inputs)} inputs")
    for name, got, want in zip(sig.names, inputs, sig.inputs):
        if got != want:
            return ValueError(f"{sig.op} step function: input '{name}' is {shown(got)}, but the function was built "
                              f"for {shown(want)}: build one for this signature with layer.step_function(...), or "
                              "use layer.step")
    want = tuple(s[1:] for s in sig.state)
    if state and state != want:
        return ValueError(f"{sig.op} step function: the state tensors are ({', '.join(shown(d) for d in state)}), but "
                          f"this signature's state is ({', '.join(f'{s[0]}: {shown(s[1:])}' for s in sig.state)}): "
                          "pass state.tensors() of a state of this layer, or () before the first token")
    if strict:
        raise AssertionError("mismatch_error called on a matching signature")
    return None


# ------------------------------------------------- a step function's traced form as literal source
def _literal(value) -> str | None:
    """`value` as Python source that evaluates to it exactly (ints, floats, bools, None, tuples of
    them, torch dtypes), else None."""
    if value is None or value.__class__ in (bool, int) or isinstance(value, torch.dtype):
        text = repr(value)
    elif value.__class__ is float:
        text = repr(value) if value == value and abs(value) != float("inf") else None
    elif value.__class__ is tuple:
        parts = [_literal(v) for v in value]
        text = None if None in parts else f"({', '.join(parts)}{',' if len(parts) == 1 else ''})"
    else:
        return None
    return text if text is not None and eval(text, {"torch": torch}) == value else None


def _check(var: str, want: tuple) -> str:
    """The condition that tensor `var` has (shape, dtype, device) `want`, from literals."""
    shape, dtype, device = want
    return (f"isinstance({var}, torch.Tensor) and {var}.shape == {_literal(tuple(shape))} and "
            f"{var}.dtype == {dtype!r} and {var}.device.type == {device.type!r} and "
            f"{var}.device.index {'is' if device.index is None else '=='} {device.index!r}")


def literal_source(name: str, sig: StepSignature, update: tuple, bound, carry: str, result: str) -> str | None:
    """The source of step function `name` for signature `sig` (PsmLayer.step_function): eager, it
    calls `_eager`; traced, it checks the signature and runs `update` (the fast step's lines, from
    `x_<input>`s and `carry` to `out` and the new prefix), every constant written as a literal, so
    that torch.compile guards its tensors and a few globals (torch, len, isinstance), no closure
    cell. `bound` is the bound fast step whose
    closure holds those constants; `carry` and `result` are the expressions of the prefix read
    from `state_tensors` and of the state tensors returned. None when a name the update reads is
    not a literal constant (then the closure form serves)."""
    tree = ast.parse("\n".join(update + (f"_ = {result}",)))
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    given = {"torch", "carry"} | {f"x_{n}" for n in sig.names}
    free = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
                  - stored - given)
    cells = dict(zip(bound.__code__.co_freevars, (c.cell_contents for c in bound.__closure__ or ())))
    constants = []
    for var in free:
        text = _literal(cells[var]) if var in cells else None
        if text is None:
            return None
        constants.append(f"    {var} = {text}")
    # (the inputs as x_<name>, as in the update: an input's name may be any other local's)
    args = ", ".join(f"x_{n}" for n in sig.names) + ("," if len(sig.names) == 1 else "")
    state_ok = " and ".join(_check(f"state_tensors[{i}]", s[1:]) for i, s in enumerate(sig.state))
    checks = [_check(f"x_{n}", want) for n, want in zip(sig.names, sig.inputs)]
    checks.append(f"(len(state_tensors) == 0 or len(state_tensors) == {len(sig.state)} and {state_ok})")
    lines = [
        f"def {name}(state_tensors, *inputs):",
        f'    """One {sig.op} token for one signature (PsmLayer.step_function): eager, the checked step; '
        'traced, the update with its constants as literals."""',
        "    if not _compiling():",
        "        return _eager(state_tensors, inputs)",
        "    # traced: the signature checked from literals (the tensors' own guards pin what they read)",
        f"    if len(inputs) != {len(sig.names)}:",
        "        _mismatch(state_tensors, inputs)",
        f"    {args} = inputs",
        "    if not (" + "\n            and ".join(checks) + "):",
        "        _mismatch(state_tensors, inputs)",
        *constants,
        f"    carry = {carry}",
        *("    " + line for line in update),
        f"    return out, {result}",
    ]
    return "\n".join(lines) + "\n"


def literal_function(source: str, name: str, eager, mismatch):
    """The function `name` that `source` defines, in a namespace holding `torch`, `_compiling`
    (torch.compiler.is_compiling: one guard where `torch.compiler.is_compiling` is two), `_eager`
    and `_mismatch` alone."""
    namespace = {"torch": torch, "_compiling": torch.compiler.is_compiling, "_eager": eager, "_mismatch": mismatch}
    exec(compile(source, f"<psmc step function {name}>", "exec"), namespace)
    fn = namespace[name]
    fn.__source__ = source
    return fn
