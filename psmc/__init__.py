"""psmc: a compiler for prefix-scannable sequence layers.

    import psmc
    GLA = psmc.load("examples/gla.psm").gla
"""
__version__ = "0.1.0"

from .errors import PsmcError  # noqa: E402


def load(path, **options):
    """Compile a `.psm` file (cached by content) and import it; returns a module whose
    attributes are the generated layer classes, one per op."""
    from .loader import load as _load
    return _load(path, **options)


def cat_states(states):
    """Concatenate stream states along the batch (rows with different token counts give a
    RaggedState that keeps each row's count); see psmc.runtime.batch."""
    from .runtime.batch import cat_states as _cat
    return _cat(states)


__all__ = ["PsmcError", "cat_states", "load", "__version__"]
