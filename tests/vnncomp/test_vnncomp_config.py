"""YAML VNN-COMP batch configs: the shipped ones validate, bad keys are named, a config runs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from lipverify.backends.attack import AttackBackend
from lipverify.cli.main import build_parser, main
from lipverify.cli.vnncomp import _batch_config
from lipverify.config import VnncompConfig, load_any_config, load_vnncomp_config
from lipverify.errors import InputError
from lipverify.vnncomp.batch import read_results
from lipverify.vnncomp.results import VnncompResult
from lipverify.vnncomp.runner import RunOptions, run_instance

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT.parent / "shared" / "benchmarks" / "vnncomp"
TEST = BENCH / "test_2021"
SHIPPED = sorted((ROOT / "configs").glob("vnncomp_*.yaml"))
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="shared benchmarks not present")


def _write(tmp_path: Path, data: dict[str, Any], name: str = "batch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _test_config(tmp_path: Path, **changes: Any) -> Path:
    """A copy of the shipped test_2021 config: instances absolute, results in `tmp_path`."""
    data = yaml.safe_load((ROOT / "configs" / "vnncomp_test_2021.yaml").read_text())
    data.update({"instances": str(TEST / "instances.csv"),
                 "results": str(tmp_path / "results.csv"),
                 "result_dir": str(tmp_path / "files"), **changes})
    return _write(tmp_path, data)


def _expected() -> dict[tuple[str, str], str]:
    with (TEST / "expected.csv").open() as fh:
        return {(r["onnx"], r["vnnlib"]): r["expected"] for r in csv.DictReader(fh)}


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lipverify: error: "), err
    return err


def test_both_benchmarks_have_a_shipped_config():
    assert {p.name for p in SHIPPED} >= {"vnncomp_test_2021.yaml", "vnncomp_mnist_fc.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate_and_point_at_the_shared_benchmarks(path, capsys):
    assert main(["config", str(path)]) == 0
    assert "valid" in capsys.readouterr().out
    config = load_vnncomp_config(path)
    assert Path(config.instances).parent.parent == BENCH.resolve()
    assert Path(config.results).is_relative_to(ROOT / "results")


def test_relative_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    folder.mkdir()
    _write(folder, {"instances": "bench/instances.csv", "results": "../out/r.csv",
                    "result_dir": "files", "backends": {"attack": None}})
    monkeypatch.chdir(tmp_path)
    config = load_any_config("cfg/batch.yaml")
    assert isinstance(config, VnncompConfig)
    assert config.instances == str(folder / "bench" / "instances.csv")
    assert config.results == str(tmp_path / "out" / "r.csv")
    assert config.result_dir == str(folder / "files")
    assert config.backends == {"attack": {}}
    assert (config.isolate, config.device, config.timeout) == (True, "cpu", None)


@pytest.mark.parametrize(("change", "words"), [
    ({"bogus": 1}, "unknown config key 'bogus'"),
    ({"backends": {"attack": {"bogus": 1}}}, "unknown config key 'backends.attack.bogus'"),
    ({"backends": {"attack": {"steps": "many"}}}, "config key 'backends.attack.steps'"),
    ({"backends": {"nosuch": {}}}, "unknown backend 'nosuch'"),
    ({"timeout": -1}, "config key 'timeout' must be positive"),
])
@pytest.mark.parametrize("command", ["config", "vnncomp"])
def test_bad_keys_are_one_line_errors_naming_them(tmp_path, capsys, change, words, command):
    path = _test_config(tmp_path, **change)
    argv = ["config", str(path)] if command == "config" else ["vnncomp", "--config", str(path)]
    assert main(argv) == 1
    assert words in _one_line_error(capsys)
    assert not (tmp_path / "results.csv").exists()  # nothing ran


def test_required_keys_are_named(tmp_path):
    with pytest.raises(InputError, match="config key 'results' is required"):
        load_vnncomp_config(_write(tmp_path, {"instances": "x.csv"}))


def test_flags_override_the_config(tmp_path):
    path = _test_config(tmp_path, disable=["spectral"])
    argv = ["--disable-backend", "local", "vnncomp", "--config", str(path), "--results",
            "other.csv", "--timeout", "5", "--category", "cat", "--backends", "lirpa,spectral",
            "--no-isolate"]
    config = _batch_config(build_parser().parse_args(argv))
    assert (config.results, config.timeout, config.category) == ("other.csv", 5.0, "cat")
    assert config.backends == {"lirpa": {}, "spectral": {}}
    assert config.disable == ["spectral", "local"] and config.isolate is False
    kept = _batch_config(build_parser().parse_args(["vnncomp", "--config", str(path)]))
    assert kept == load_vnncomp_config(path)


def test_a_config_runs_the_batch_with_the_known_answers(tmp_path, capsys):
    path = _test_config(tmp_path)
    assert main(["vnncomp", "--config", str(path), "--no-progress"]) == 0
    assert "5 instance(s) run" in capsys.readouterr().out
    rows = read_results(tmp_path / "results.csv")
    got = {(r.onnx, r.vnnlib): r.result.value for r in rows}
    assert len(rows) == 5 and {r.category for r in rows} == {"test_2021"}
    assert got == _expected()
    assert len(list((tmp_path / "files").glob("*.result"))) == 5


def test_backend_options_in_a_config_reach_the_backend(tmp_path, monkeypatch, capsys):
    seen = []
    certify = AttackBackend.certify

    def spy(self, network, problem):  # noqa: ANN001, ANN202 - a stand-in for the method
        seen.append(self.options)
        return certify(self, network, problem)

    monkeypatch.setattr(AttackBackend, "certify", spy)
    instances = tmp_path / "instances.csv"
    instances.write_text(f"{TEST / 'onnx' / 'test_unsat.onnx'},"
                         f"{TEST / 'vnnlib' / 'test_prop.vnnlib'},60\n")
    path = _test_config(tmp_path, instances=str(instances), isolate=False,
                        backends={"attack": {"steps": 7, "restarts": 3}, "lirpa": {}})
    assert main(["vnncomp", "--config", str(path), "--no-progress"]) == 0
    assert [(o.steps, o.restarts) for o in seen] == [(7, 3)]
    assert [r.result.value for r in read_results(tmp_path / "results.csv")] == ["unsat"]


def test_a_bad_option_is_an_error_from_the_backend_process():
    options = RunOptions(timeout=60, backends=("attack",),
                         backend_options={"attack": {"bogus": 1}})
    answer = run_instance(TEST / "onnx" / "test_unsat.onnx", TEST / "vnnlib" / "test_prop.vnnlib",
                          options)
    assert answer.result == VnncompResult.ERROR
    assert "'backends.attack.bogus'" in answer.message
