"""`psmc.load(path)`: compile a `.psm` file, cache the generated module by content hash,
import it. A corrupt or half-written cache entry is recompiled, never trusted; concurrent
compiles of the same file both succeed (atomic rename of a complete, checksummed file)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from . import __version__

_MARK = "# psmc-checksum: "


def cache_dir() -> Path:
    env = os.environ.get("PSMC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psmc"


def _key(text: str, filename: str) -> str:
    return hashlib.sha256(f"{__version__}\0{os.path.basename(filename)}\0{text}".encode()).hexdigest()[:32]


def _with_checksum(source: str) -> str:
    return source + _MARK + hashlib.sha256(source.encode()).hexdigest() + "\n"


def _valid(path: Path) -> bool:
    try:
        data = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, sep, tail = data.rpartition(_MARK)
    return bool(sep) and tail.strip() == hashlib.sha256(body.encode()).hexdigest()


def compiled_path(path, *, force: bool = False) -> Path:
    """Compile `path` if needed and return the cached module file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    target_dir = cache_dir() / "modules"
    target = target_dir / f"psm_{_key(text, str(path))}.py"
    if not force and _valid(target):
        return target
    from .compiler import compile_source  # imported lazily: a cache hit needs no compiler

    compiled = compile_source(text, str(path))
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=".tmp_", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_with_checksum(compiled.source))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path, *, force: bool = False):
    """Compile (cached) and import; returns the module (attributes: one class per op)."""
    module_path = compiled_path(path, force=force)
    name = "psmc_generated." + module_path.stem
    if name in sys.modules and not force:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
