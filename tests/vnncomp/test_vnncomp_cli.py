"""`lipverify vnncomp`: bad inputs give one line on stderr, a non-zero exit and `error`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lipverify.cli.main import main
from lipverify.cli.vnncomp import seconds_since_process_start
from lipverify.vnncomp.results import read_result
from lipverify.vnncomp.vnnlib import read_vnnlib

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "vnncomp"
TEST = BENCH / "test_2021"
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="shared benchmarks not present")

PROP = (TEST / "vnnlib" / "test_prop.vnnlib") if BENCH.is_dir() else Path()


def _spec(tmp_path: Path, text: str, name: str = "spec") -> Path:
    path = tmp_path / f"{name}.vnnlib"
    path.write_text(text)
    return path


def _declarations(inputs: int, outputs: int) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(inputs)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(outputs)]
    lines += [f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 0.1))" for i in range(inputs)]
    return "\n".join(lines) + "\n"


def _bad_cases(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    onnx = TEST / "onnx" / "test_sat.onnx"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf")
    return {
        "syntax": (onnx, _spec(tmp_path, _declarations(5, 5) + "(assert (<= Y_0 Y_1)\n"),
                   "spec.vnnlib:21: '(' is never closed"),
        "undeclared": (onnx, _spec(tmp_path, _declarations(5, 5) + "(assert (<= Y_9 0))\n",
                                     "undeclared"),
                       "undeclared.vnnlib:21: undeclared variable 'Y_9'"),
        "input count": (onnx, TEST / "vnnlib" / "test_nano.vnnlib",
                        "declares 1 inputs but"),
        "output count": (onnx, _spec(tmp_path, _declarations(5, 3) + "(assert (<= Y_0 0))\n",
                                       "outputs"),
                         "declares 3 outputs but"),
        "corrupt onnx": (corrupt, PROP, "onnxruntime cannot load"),
        "missing onnx": (tmp_path / "nope.onnx", PROP, "nope.onnx"),
    }


@pytest.mark.parametrize("case", ["syntax", "undeclared", "input count", "output count",
                                  "corrupt onnx", "missing onnx"])
def test_bad_instances_write_error_and_exit_non_zero(tmp_path, capsys, case):
    onnx, vnnlib, words = _bad_cases(tmp_path)[case]
    out = tmp_path / "result.txt"
    code = main(["vnncomp", str(onnx), str(vnnlib), "--timeout", "20", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert out.read_text() == "error\n"
    assert len(err.splitlines()) == 1 and err.startswith("lipverify: error: ")
    assert words in err


def test_missing_arguments_are_errors(tmp_path, capsys):
    out = tmp_path / "r.txt"
    assert main(["vnncomp", "--out", str(out)]) == 1
    assert out.read_text() == "error\n"
    assert main(["vnncomp", str(TEST / "onnx" / "test_sat.onnx"), str(PROP)]) == 1
    assert "--out" in capsys.readouterr().err


def test_sat_result_carries_a_counterexample_onnxruntime_confirms(tmp_path, capsys):
    out = tmp_path / "result.txt"
    onnx = TEST / "onnx" / "test_sat.onnx"
    assert main(["vnncomp", str(onnx), str(PROP), "--timeout", "30", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("sat")
    result, (x, y) = read_result(out)
    assert result.value == "sat"
    (case,) = read_vnnlib(PROP).cases
    assert np.all(x >= case.lower - 1e-4) and np.all(x <= case.upper + 1e-4)
    session = ort.InferenceSession(str(onnx))
    inp = session.get_inputs()[0]
    y_ort = session.run(None, {inp.name: x.astype(np.float32).reshape(1, 1, 1, 5)})[0].ravel()
    np.testing.assert_allclose(y, y_ort, rtol=1e-6)
    # test_prop's violation: Y_0 is the minimum of the outputs
    assert np.all(y_ort[0] <= y_ort[1:])


def test_prepare_checks_without_answering(capsys):
    onnx, vnnlib = TEST / "onnx" / "test_nano.onnx", TEST / "vnnlib" / "test_nano.vnnlib"
    assert main(["vnncomp", "--prepare", str(onnx), str(vnnlib)]) == 0
    assert "1 inputs, 1 outputs" in capsys.readouterr().out


SCRIPTS = Path(__file__).resolve().parents[2] / "plugins" / "vnncomp"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIPVERIFY": str(Path(sys.executable).with_name("lipverify"))}
    return subprocess.run(["bash", str(SCRIPTS / name), *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


@needs_bash
def test_run_instance_script_from_another_directory(tmp_path):
    onnx = TEST / "onnx" / "test_sat.onnx"
    out = tmp_path / "res" / "out.txt"
    run = _script("run_instance.sh", "v1", "test", str(onnx), str(PROP), str(out), " 30 ",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert out.read_text().startswith("sat\n(\n(X_0 ")
    bad = _bad_cases(tmp_path)["undeclared"][1]
    run = _script("run_instance.sh", "v1", "test", str(onnx), str(bad), str(out), "30",
                  cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "undeclared variable" in run.stderr
    assert out.read_text() == "error\n"
    wrong = _script("run_instance.sh", "v2", cwd=tmp_path)
    assert wrong.returncode != 0 and "usage" in wrong.stderr


@needs_bash
@pytest.mark.slow
def test_install_and_prepare_scripts_from_another_directory(tmp_path):
    install = _script("install_tool.sh", "v1", cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    onnx = TEST / "onnx" / "test_sat.onnx"
    prep = _script("prepare_instance.sh", "v1", "test", str(onnx), str(PROP), cwd=tmp_path)
    assert prep.returncode == 0 and "5 inputs, 5 outputs" in prep.stderr
    bad = _script("prepare_instance.sh", "v1", "test", str(onnx),
                  str(TEST / "vnnlib" / "test_nano.vnnlib"), cwd=tmp_path)
    assert bad.returncode == 0 and "declares 1 inputs" in bad.stderr


def test_process_age_counts_towards_the_time_limit():
    first = seconds_since_process_start()
    time.sleep(0.05)
    assert 0 < first <= seconds_since_process_start()
