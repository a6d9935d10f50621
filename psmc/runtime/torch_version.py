"""The installed torch's (major, minor), read once, for the few places where psmc works around
an older torch's compiler (each names what differs where it asks)."""
from __future__ import annotations

import torch

TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def at_least(major: int, minor: int) -> bool:
    return TORCH >= (major, minor)
