"""docs/compiler.md: every python block runs on its own (fresh namespace, an empty working
directory) and prints what the page says it prints."""
import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_block_of_docs_compiler_runs(tmp_path):
    text = (ROOT / "docs" / "compiler.md").read_text(encoding="utf-8")
    opening = re.findall(r"^```(\w*)$", text, flags=re.M)[::2]
    assert all(opening), "every fenced block says its language (python, or text for a diagram)"
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    before = os.getcwd()
    os.chdir(tmp_path)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for i, block in enumerate(blocks):
                exec(compile(block, f"docs/compiler.md python block {i + 1}", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(before)
    printed = out.getvalue()
    assert "log(1 + exp(x)) | _F.softplus | tl.where(" in printed
    assert "mul(c, outer(k, v))" in printed
    assert "exp(add(x, y)) {'exp_product': 1}" in printed
    assert "gated_delta_rule   identity-plus-low-rank (gated)" in printed
    assert "gated_delta_product identity-plus-low-rank (gated): E = g * M_r @ ... @ M_1" in printed
    assert "running-sum" in printed and "None" in printed
    assert "delta_rule [(1, 2, 4, 3)]" in printed
