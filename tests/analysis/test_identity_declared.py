"""A declared identity that is not one is an error at `psmc check` and at `psmc.load`, with the
counterexample and a caret at the `identity` line, unless the op says `assume empty_prefix;`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import psmc
from psmc.errors import PsmcAnalysisError

BAD = """op badsum {
  state (y: f32);
  lift (x: f32) { return (x); }
  combine (l, r) { return (l.y + r.y); }
  identity = 1.0;
  readout (s) { return s.y; }
}
"""
PREFIX_ONLY = BAD.replace("  identity = 1.0;\n", "  identity = 1.0;\n  assume empty_prefix;\n").replace(
    "readout (s)", "readout exclusive (s)")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_wrong_identity_is_an_error_at_load_with_the_counterexample(tmp_path):
    path = write(tmp_path, "bad.psm", BAD)
    with pytest.raises(PsmcAnalysisError) as err:
        psmc.load(path)
    text = str(err.value)
    assert "bad.psm:5:3: op 'badsum' declares an identity that is not one: the declared identity 1.0 is not a" in text
    assert "combine(e, x) = 1 but x = 0" in text or "combine(x, e) = 1 but x = 0" in text
    assert "    identity = 1.0;\n    ^^^^^^^^^^^^^^^" in text.replace("      ", "    ")
    assert "assume empty_prefix;" in text


def test_wrong_identity_is_an_error_at_check(tmp_path):
    path = write(tmp_path, "bad.psm", BAD)
    done = subprocess.run([sys.executable, "-m", "psmc.cli", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 1
    out = done.stdout + done.stderr
    assert "declares an identity that is not one" in out and "but x = 0" in out and "Traceback" not in out


def test_assume_empty_prefix_accepts_it_and_the_layer_runs(tmp_path):
    import torch
    path = write(tmp_path, "prefix.psm", PREFIX_ONLY)
    layer = psmc.load(path).badsum()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # exclusive readout: the empty prefix is the declared 1.0, then running sums
    torch.testing.assert_close(layer(x=x), torch.tensor([[1.0, 1.0, 3.0]]))
    done = subprocess.run([sys.executable, "-m", "psmc.cli", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
