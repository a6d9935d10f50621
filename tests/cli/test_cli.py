"""`psmc check`: exit status, file:line:col reports, and the --json schema (issue 2, item 6)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from psmc.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.psm"))
BAD = "op bad {\n  state (x: f32);\n  combine (l, r) { return foo(l.x); }\n}\n"
ISSUE_2_KEYS = {"op", "dims", "state", "inputs", "outputs"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PSMC_CACHE_DIR", str(tmp_path / "cache"))


def run_main(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_all_examples_exits_0(tmp_path):
    # the real command, in a fresh interpreter, as a user types it
    env = dict(os.environ, PSMC_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "psmc.cli", "check", *map(str, EXAMPLES)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for path in EXAMPLES:
        assert f"{path}: op {path.stem}" in result.stdout


def test_check_prints_the_op_summary(capsys):
    code, out, err = run_main(capsys, "check", str(ROOT / "examples/gla.psm"))
    assert code == 0 and err == ""
    assert "op gla[K, V]" in out
    assert "a: f32[K], S: f32[K, V]" in out  # state
    assert "k: f32[K], v: f32[V], gk: f32[K], q: f32[K]" in out  # inputs
    assert "f32[V]" in out  # output


@pytest.mark.parametrize("example", ["gla", "transformer_psm"])  # a token op, and a chunk op (a causal row)
def test_check_rows_share_one_value_column(capsys, example):
    """Every row of the summary starts its value in the same column, the analysis' verdicts
    included (a chunk op's 'causal readout' label used to push them one column right)."""
    code, out, _ = run_main(capsys, "check", str(ROOT / f"examples/{example}.psm"))
    assert code == 0
    labels = ("state", "associativity", "identity", "commutative", "structure", "plan", "stream state")
    labels += ("causal readout",) if example == "transformer_psm" else ()
    starts = {}
    for line in out.splitlines():
        for label in labels:
            if line.startswith(f"  {label} "):
                starts[label] = len(line) - len(line[2 + len(label):].lstrip(" "))
    assert set(starts) == set(labels), starts
    assert len(set(starts.values())) == 1, starts


def test_param_count_for_given_dims(capsys):
    path = str(ROOT / "examples/transformer_psm.psm")
    code, out, _ = run_main(capsys, "check", "--dim", "D=4", path)
    assert code == 0 and "= 384 parameters" in out  # 2 blocks x (3 + 1 + 4 + 4) x 4^2
    code, out, _ = run_main(capsys, "check", path)
    assert code == 0 and "(pass --dim to count)" in out


def test_bad_file_exits_1_with_position(tmp_path, capsys):
    bad = tmp_path / "bad.psm"
    bad.write_text(BAD)
    code, out, err = run_main(capsys, "check", str(bad))
    assert code == 1
    assert f"{bad}:3:27: unknown builtin 'foo'" in err
    assert "    combine (l, r) { return foo(l.x); }\n" + " " * 30 + "^^^" in err


def test_one_bad_file_fails_the_run_but_the_others_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.psm"
    bad.write_text(BAD)
    code, out, err = run_main(capsys, "check", str(ROOT / "examples/cumsum.psm"), str(bad))
    assert code == 1
    assert "op cumsum" in out and "bad.psm:3:27:" in err


def test_missing_file_exits_1(tmp_path, capsys):
    code, out, err = run_main(capsys, "check", str(tmp_path / "nope.psm"))
    assert code == 1 and "no such file" in err


def test_syntax_error_exits_1(tmp_path, capsys):
    bad = tmp_path / "syntax.psm"
    bad.write_text("op a { state (x: f32) }\n")
    code, _, err = run_main(capsys, "check", str(bad))
    assert code == 1 and f"{bad}:1:23: expected ';' after the state declaration" in err


def test_json_for_valid_files(capsys):
    paths = [str(ROOT / "examples/gla.psm"), str(ROOT / "examples/transformer_psm.psm")]
    code, out, err = run_main(capsys, "check", "--json", *paths)
    assert code == 0
    records = json.loads(out)
    assert [r["op"] for r in records] == ["gla", "transformer_psm"]
    for record in records:
        assert ISSUE_2_KEYS <= set(record)
        # the analysis issue's keys
        assert record["associativity"] in ("proven", "refuted", "unknown", "assumed")
        assert record["plan"] in ("exact-scan", "tree-scan")
    gla = records[0]
    assert gla["dims"] == ["K", "V"]
    assert gla["state"] == [{"name": "a", "dtype": "f32", "shape": ["K"]},
                            {"name": "S", "dtype": "f32", "shape": ["K", "V"]}]
    assert [i["name"] for i in gla["inputs"]] == ["k", "v", "gk", "q"]
    assert gla["outputs"] == [{"name": "out", "dtype": "f32", "shape": ["V"]}]
    assert records[1]["chunk"] == "C"


def test_json_for_errors(tmp_path, capsys):
    bad = tmp_path / "bad.psm"
    bad.write_text(BAD)
    code, out, err = run_main(capsys, "check", "--json", str(ROOT / "examples/cumsum.psm"), str(bad))
    assert code == 1
    records = json.loads(out)
    assert records[0]["op"] == "cumsum"
    (error,) = records[1]["errors"]
    assert {k: error[k] for k in ("file", "line", "col")} == {"file": str(bad), "line": 3, "col": 27}
    assert error["message"] == "unknown builtin 'foo'"


def test_bad_dim_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", "--dim", "D=zero", str(ROOT / "examples/gla.psm")])
    assert info.value.code == 2
    assert "--dim expects NAME=POSITIVE_INT" in capsys.readouterr().err


@pytest.mark.parametrize("example, words", [
    ("gla", "chunked tensor-core Triton kernels (psmc.runtime.triton_chunk)"),
    ("gated_delta_rule", "chunked tensor-core Triton kernels (psmc.runtime.triton_delta)"),
    # a state axis N per channel: the fused state loop, cheaper than the first-order scan there
    ("selective_ssm", "the generated state loop (triton-state-loop"),
    ("linear_recurrence", "the first-order scan kernel (psmc.runtime.triton_scan"),
])
def test_check_says_what_runs_on_a_gpu(capsys, example, words):
    """The fast paths name the kernels backend='auto' runs for CUDA tensors, and packing."""
    code, out, _ = run_main(capsys, "check", str(ROOT / f"examples/{example}.psm"))
    row = [line for line in out.splitlines() if line.strip().startswith("on a GPU")]
    assert code == 0 and len(row) == 1 and words in row[0] and "packed sequences" in row[0]


def test_check_says_nothing_of_a_gpu_fast_path_where_there_is_none(capsys):
    code, out, _ = run_main(capsys, "check", str(ROOT / "examples/ema.psm"))
    assert code == 0 and "on a GPU" not in out
