"""Result files: the status mapping, the counterexample format (against the shipped files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lipverify.errors import InputError
from lipverify.types import Status
from lipverify.vnncomp.results import (
    VnncompResult,
    format_counterexample,
    parse_counterexample,
    read_result,
    result_from_status,
    write_result,
)

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "vnncomp"


def test_every_status_maps_to_the_competition_word():
    expected = {Status.VERIFIED: "unsat", Status.FALSIFIED: "sat", Status.UNKNOWN: "unknown",
                Status.TIMEOUT: "timeout", Status.ERROR: "error"}
    assert {s: result_from_status(s).value for s in Status} == expected


def test_non_status_is_refused():
    with pytest.raises(InputError):
        result_from_status("verified")


def test_counterexample_round_trip_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=7).astype(np.float32).astype(np.float64)
    y = rng.normal(size=3)
    text = format_counterexample(x, y)
    assert text.startswith("(\n(X_0 ") and text.endswith(")\n")
    x2, y2 = parse_counterexample(text)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


@pytest.mark.skipif(not BENCH.is_dir(), reason="shared benchmarks not present")
def test_reads_the_shipped_counterexample():
    x, y = parse_counterexample((BENCH / "test_2021" / "counterexamples" /
                                 "test_sat__test_prop.counterexample").read_text())
    assert x.shape == (5,) and y.shape == (5,)
    assert x[3] == 0.5 and y[0] == pytest.approx(-0.02032240480184555)


def test_write_and_read_result_files(tmp_path):
    out = tmp_path / "sub" / "result.txt"
    write_result(out, VnncompResult.UNSAT)
    assert out.read_text() == "unsat\n"
    write_result(out, VnncompResult.SAT, np.array([0.5, -1.0]), np.array([2.0]))
    assert out.read_text().splitlines()[:2] == ["sat", "("]
    result, (x, y) = read_result(out)
    assert result == VnncompResult.SAT and list(x) == [0.5, -1.0] and list(y) == [2.0]
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # no temporary left behind


def test_sat_without_counterexample_is_refused(tmp_path):
    with pytest.raises(InputError, match="counterexample"):
        write_result(tmp_path / "r", VnncompResult.SAT)


@pytest.mark.parametrize("text", ["(X_0 1)\n(X_2 3)", "(X_0 abc)"])
def test_malformed_counterexamples(text):
    with pytest.raises(InputError):
        parse_counterexample(text)
