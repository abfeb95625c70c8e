"""instances.csv in, the competition's results CSV out: row by row, resumable."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from lipverify.cli.main import main
from lipverify.errors import InputError
from lipverify.vnncomp.batch import BatchOptions, read_instances, read_results, run_batch
from lipverify.vnncomp.results import read_result
from lipverify.vnncomp.runner import RunOptions

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "vnncomp"
TEST = BENCH / "test_2021"
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="shared benchmarks not present")


def _folder(tmp_path: Path) -> Path:
    """A benchmark folder with the sat instance and an instance whose files do not fit."""
    folder = tmp_path / "bench"
    for sub in ("onnx", "vnnlib"):
        (folder / sub).mkdir(parents=True)
    shutil.copy(TEST / "onnx" / "test_sat.onnx", folder / "onnx")
    for name in ("test_prop.vnnlib", "test_nano.vnnlib"):
        shutil.copy(TEST / "vnnlib" / name, folder / "vnnlib")
    (folder / "instances.csv").write_text(
        "onnx/test_sat.onnx,vnnlib/test_prop.vnnlib,60\n"
        "\n"
        "onnx/test_sat.onnx, vnnlib/test_nano.vnnlib ,60\n")
    return folder


def test_read_instances_resolves_against_the_csv_folder(tmp_path):
    folder = _folder(tmp_path)
    instances = read_instances(folder / "instances.csv")
    assert [(i.onnx, i.vnnlib, i.timeout) for i in instances] == [
        ("onnx/test_sat.onnx", "vnnlib/test_prop.vnnlib", 60.0),
        ("onnx/test_sat.onnx", "vnnlib/test_nano.vnnlib", 60.0)]
    assert instances[0].onnx_path.is_file() and instances[1].vnnlib_path.is_file()


def test_the_shipped_instances_files_read():
    for bench in ("test_2021", "mnist_fc_2022", "oval21_2022"):
        instances = read_instances(BENCH / bench / "instances.csv")
        assert instances and all(i.onnx_path.is_file() and i.vnnlib_path.is_file()
                                 for i in instances)


@pytest.mark.parametrize(("text", "words"), [("a.onnx,b.vnnlib\n", ":1: expected"),
                                             ("a.onnx,b.vnnlib,soon\n", ":1: timeout")])
def test_malformed_instances(tmp_path, text, words):
    path = tmp_path / "instances.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=words):
        read_instances(path)
    with pytest.raises(InputError, match="not found"):
        read_instances(tmp_path / "missing.csv")


def test_batch_rows_resume_and_result_files(tmp_path):
    folder = _folder(tmp_path)
    results = tmp_path / "out" / "results.csv"
    options = BatchOptions(run=RunOptions(timeout=60), max_timeout=30,
                           result_dir=tmp_path / "files", progress=False)
    rows = run_batch(folder / "instances.csv", results, options)
    assert [r.result.value for r in rows] == ["sat", "error"]
    with results.open() as fh:
        cells = list(csv.reader(fh))
    assert [c[:3] for c in cells] == [["bench", "onnx/test_sat.onnx", "vnnlib/test_prop.vnnlib"],
                                      ["bench", "onnx/test_sat.onnx", "vnnlib/test_nano.vnnlib"]]
    assert all(len(c) == 6 and float(c[3]) >= 0 and float(c[5]) >= 0 for c in cells)
    assert read_result(tmp_path / "files" / "test_sat__test_prop.result")[0].value == "sat"
    assert read_result(tmp_path / "files" / "test_sat__test_nano.result")[0].value == "error"
    # Resuming runs nothing new and leaves the file as it was.
    assert run_batch(folder / "instances.csv", results, options) == []
    assert len(read_results(results)) == 2


def test_cli_batch_resumes_a_partial_results_file(tmp_path, capsys):
    folder = _folder(tmp_path)
    results = tmp_path / "results.csv"
    results.write_text("bench,onnx/test_sat.onnx,vnnlib/test_nano.vnnlib,0.1,error,0.2\n")
    code = main(["vnncomp", "--instances", str(folder / "instances.csv"), "--results",
                 str(results), "--timeout", "30", "--no-progress", "--category", "test"])
    assert code == 0
    assert "1 instance(s) run: sat 1" in capsys.readouterr().out
    rows = read_results(results)
    assert [(r.category, r.vnnlib, r.result.value) for r in rows] == [
        ("bench", "vnnlib/test_nano.vnnlib", "error"), ("test", "vnnlib/test_prop.vnnlib", "sat")]


def test_cli_batch_needs_a_results_file(tmp_path, capsys):
    folder = _folder(tmp_path)
    assert main(["vnncomp", "--instances", str(folder / "instances.csv")]) == 1
    assert "--results" in capsys.readouterr().err
