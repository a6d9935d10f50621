"""Elements (tuples of tensors, one per state field) and the moves the scans make along time.

In a parallel pass every tensor of an element is `[B, T, *lanes, *field]`: time is axis 1,
counted from the left, so none of these helpers needs to know a field's rank. A *step* element
(stream states, carries, identities) has no time axis: `[B, *lanes, *field]`.
Every helper is out-of-place and differentiable. A field may be None (a field a stream prefix
leaves out, see psmc.analysis.liveness): the helpers pass it through as None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Element = tuple[Tensor | None, ...]
# The generated aggregator: (earlier, later) -> combined, batched over any leading axes.
Combine = Callable[[Element, Element], Element]

TIME = 1


def length(x: Element) -> int:
    """Number of time steps of a parallel-pass element."""
    return next(t for t in x if t is not None).shape[TIME]


def take(x: Element, index: Tensor) -> Element:
    """Gather time steps `index` (an int64 tensor, any device) from every field."""
    return tuple(None if t is None else t.index_select(TIME, index.to(t.device)) for t in x)


def put(x: Element, index: Tensor, values: Element) -> Element:
    """A copy of `x` whose time steps `index` are replaced by `values` (out of place)."""
    return tuple(None if t is None or v is None else t.index_copy(TIME, index.to(t.device), v.to(t.dtype))
                 for t, v in zip(x, values))


def strided(x: Element, start: int, step: int, count: int) -> Element:
    """Time steps start, start + step, ... (count of them), as views."""
    stop = start + step * (count - 1) + 1
    return tuple(None if t is None else t[:, start:stop:step] for t in x)


def window(x: Element, start: int, count: int) -> Element:
    """Time steps [start, start + count), as views."""
    return tuple(None if t is None else t.narrow(TIME, start, count) for t in x)


def at(x: Element, step: int) -> Element:
    """The step element at time `step` (time axis removed), as views."""
    return tuple(None if t is None else t.select(TIME, step) for t in x)


def with_time(step: Element) -> Element:
    """A step element as a one-step parallel element (adds the time axis)."""
    return tuple(None if t is None else t.unsqueeze(TIME) for t in step)


def join(parts: Sequence[Element]) -> Element:
    """Concatenate elements along time; one part is returned as it is (no copy)."""
    if len(parts) == 1:
        return parts[0]
    return tuple(None if any(f is None for f in fields) else torch.cat(fields, dim=TIME) for fields in zip(*parts))


def interleave(evens: Element, odds: Element) -> Element:
    """evens[0], odds[0], evens[1], odds[1], ...; evens may be one step longer than odds."""
    n_odd = length(odds)
    paired = tuple(
        torch.stack((e.narrow(TIME, 0, n_odd), o.to(e.dtype)), dim=TIME + 1).flatten(TIME, TIME + 1)
        for e, o in zip(evens, odds)
    )
    if length(evens) == n_odd:
        return paired
    return join([paired, window(evens, n_odd, length(evens) - n_odd)])


def step_like(step: Element, like: Element) -> Element:
    """Broadcast a step element (a carry, or an identity with lead []) to one time step of
    `like` and give it the time axis, in `like`'s dtypes and device."""
    out = []
    for s, t in zip(step, like):
        if s is None or t is None:
            out.append(None)
            continue
        one_step = t.select(TIME, 0)
        out.append(torch.broadcast_to(s.to(device=t.device, dtype=t.dtype), one_step.shape).unsqueeze(TIME))
    return tuple(out)


def clone_step(step: Element) -> Element:
    """Own copies of a step element, so a stream state never pins a whole pass's storage."""
    return tuple(None if t is None else t.clone() for t in step)
