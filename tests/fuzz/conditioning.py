"""Ill-conditioned recurrences: where two correct evaluation orders differ by more than a
fixed tolerance.

The runner compares evaluations of the same exact value done in different orders (the
parallel scan's brackets against the token-by-token stream, float32 against float64). For most
generated programs the rounding errors of either side stay near the unit roundoff and a fixed
relative tolerance separates rounding from bugs. Some recurrences amplify rounding instead: a
matrix-affine op whose transitions have eigenvalues beyond 1 around a fixed point (program seed
207046: S = E S + c^2 11^T with E = I - c^2/4 11^T has the fixed point 2 for every c, and any
deviation grows by |1 - c^2/2| per token, up to 2.9 at T = 300), or a tree combine that
subtracts nearly equal operands and multiplies by 3 per level (seed 510066). There a rounding
of 1e-16 becomes O(1) and both sides are "right" to the precision the problem allows.

So a check that failed asks how much this op, on these inputs, amplifies rounding: it streams
the layer twice more with every step's state (and, for a float32 comparison, the inputs)
multiplied elementwise by 1 + u * U(-1, 1), u a few unit roundoffs, and takes the spread of the
outputs from the unperturbed stream. A failure is forgiven only when the difference stays
within AMPLIFICATION times that spread on every element. A well-conditioned op has a spread of
a few ulps, far below the tolerances, so nothing is forgiven there; a real bug (a float32
rounding inside a float64 op, a wrong bracket, a wrong value) is 1e7 times larger than the
spread of any op whose check it could hide behind.
"""
from __future__ import annotations

import functools

import torch

# how far apart two evaluation orders may land, in units of the spread of perturbed streams
# (each side rounds once or more per operation where the perturbation rounds once per token:
# the observed ratio on seeds 207046 and 510066 is 0.3-3)
AMPLIFICATION = 100.0
TRIALS = 2


def _shake(x, unit: float, gen: torch.Generator):
    """x times 1 + unit * U(-1, 1) elementwise; counts, integer and bool values as they are."""
    if not x.is_floating_point():
        return x
    return x * (1 + unit * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1))


def _perturbed(tensors: dict, unit: float, gen: torch.Generator) -> dict:
    return {n: _shake(x, unit, gen) for n, x in tensors.items()}


def _perturb_state(state, unit: float, gen: torch.Generator):
    return state._map(lambda t: _shake(t, unit, gen))


def stream(layer, inputs: dict, state, start: int, stop: int, after_step=None):
    """Tokens start .. stop - 1 through `layer.step`: (outputs stacked on the time axis, the last
    state). `after_step` maps each step's state before the next token (a perturbation here;
    the runner's streams pass none)."""
    rows = []
    for t in range(start, stop):
        out, state = layer.step(state, **{n: x[:, t] for n, x in inputs.items()})
        rows.append(out if isinstance(out, tuple) else (out,))
        if after_step is not None:
            state = after_step(state)
    return tuple(torch.stack(parts, dim=1) for parts in zip(*rows)), state


class Spread:
    """The rounding amplification of one layer on one batch of inputs, computed on demand (a
    check pays for it only after it failed) and kept per unit roundoff."""

    def __init__(self, layer, inputs: dict, batch_shape: tuple, steps: int):
        self.layer, self.inputs, self.batch_shape, self.steps = layer, inputs, batch_shape, steps
        self._cache: dict = {}

    def of(self, unit: float, inputs_too: bool = False) -> tuple:
        """Per output, the elementwise largest |perturbed - unperturbed| over TRIALS streams
        whose states (and inputs, when `inputs_too`) are shaken at relative size `unit`."""
        key = (unit, inputs_too)
        if key not in self._cache:
            with torch.no_grad():
                init = self.layer.init_state(batch_shape=self.batch_shape)
                base, _ = stream(self.layer, self.inputs, init, 0, self.steps)
                spread = [torch.zeros_like(b, dtype=torch.float64) for b in base]
                for trial in range(TRIALS):
                    gen = torch.Generator().manual_seed(7919 * (trial + 1))
                    inputs = _perturbed(self.inputs, unit, gen) if inputs_too else self.inputs
                    shaken, _ = stream(self.layer, inputs, self.layer.init_state(batch_shape=self.batch_shape),
                                       0, self.steps, functools.partial(_perturb_state, unit=unit, gen=gen))
                    for s, a, b in zip(spread, shaken, base):
                        if b.is_floating_point():
                            # a non-finite stream proves nothing about rounding: no allowance there
                            gap = (a.double() - b.double()).abs()
                            torch.maximum(s, torch.where(gap.isfinite(), gap, torch.zeros_like(gap)), out=s)
            self._cache[key] = tuple(spread)
        return self._cache[key]


def within(got: tuple, want: tuple, spread: tuple, rtol: float, atol: float) -> bool:
    """Whether every float output is within its tolerance plus AMPLIFICATION x its spread."""
    for g, w, s in zip(got, want, spread):
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return False
            continue
        diff = (g.double() - w.double()).abs()
        bound = atol + rtol * w.double().abs() + AMPLIFICATION * s
        if not bool(((diff <= bound) | (g.isnan() & w.isnan())).all()):
            return False
    return True


def no_digit(want, spread, top: float):
    """Where a dtype whose largest value is `top` cannot hold the value `want` to even one digit:
    rounding alone, amplified by the op (the `spread`), carries it past `top` (seed 740138: a
    product of 300 rank-one updates whose rounding along a decayed direction grows by 1e80), or
    is at least as large as the value itself (seed 1701680: the state sums subrange products of
    up to 1e53 that cancel to 1e29; the float32 stream is off by 1e8 relative and the parallel
    pass overflows on a subrange product). A float32 overflow there is no less right than any
    other float32 value."""
    return (spread > top) | (spread >= want.abs())


def rms_within(got, want, spread, bound: float, top: float | None = None) -> bool:
    """The relative-RMS form (the float32 and half checks): |got - want| / |want| <= bound plus
    AMPLIFICATION x |spread| / |want| (2-norms over the output).

    `top` (the largest value of the dtype `got` was computed in): an element that is non-finite
    in `got` is excused where `no_digit` holds (below). Any other non-finite element fails; the
    rest are held to the RMS bound."""
    w, g, spread = want.double(), got.double(), spread.double()
    if top is not None:
        excused = ~g.isfinite() & w.isfinite() & no_digit(w, spread, top)
        w, g, spread = w[~excused], g[~excused], spread[~excused]
    scale = w.norm().clamp_min(1e-6)
    return bool((g - w).norm() / scale <= bound + AMPLIFICATION * spread.norm() / scale)


def fold_spread(bodies, lane_steps: list, unit: float, scan, trials: int = TRIALS) -> tuple:
    """The float64 outputs of one lane from the IR bodies (tests/codegen/layer_reference.py's
    `Bodies`, every float value widened to float64) combined by `scan` (its left fold, or the
    paper's tree for a tree plan), and their spread when every combine's result is shaken at
    relative size `unit`: (outputs, spreads), one `[T, *output]` tensor each. The runner's own
    spread (`Spread`) streams the layer, which computes a program's f32 values in float32 when
    no float64 input reaches them; where that stream overflows it proves nothing, so this one
    runs the bodies in float64 instead."""
    def wide(values):
        return tuple(v.double() if v.is_floating_point() else v for v in values)

    def run(gen):
        def combine(left, right):
            out = wide(bodies.combine(left, right))
            return out if gen is None else tuple(_shake(v, unit, gen) for v in out)
        elements = [wide(bodies.lift(step, i)) for i, step in enumerate(lane_steps)]
        prefixes = scan(elements, combine)
        rows = [wide(bodies.readout(p, step, i)) for i, (p, step) in enumerate(zip(prefixes, lane_steps))]
        return tuple(torch.stack(parts) for parts in zip(*rows))

    with torch.no_grad():
        base = run(None)
        spread = [torch.zeros_like(b, dtype=torch.float64) for b in base]
        for trial in range(trials):
            shaken = run(torch.Generator().manual_seed(7919 * (trial + 1)))
            for s, a, b in zip(spread, shaken, base):
                if b.is_floating_point():
                    gap = (a - b).abs()
                    torch.maximum(s, torch.where(gap.isnan(), torch.zeros_like(gap), gap), out=s)
    return base, tuple(spread)
