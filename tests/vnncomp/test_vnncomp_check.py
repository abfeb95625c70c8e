"""Counterexample checks with onnxruntime on the original ONNX files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lipverify.errors import ModelError
from lipverify.vnncomp.check import (
    ACCEPT_TOLERANCE,
    BOX_TOLERANCE,
    OnnxOracle,
    check_counterexample,
    in_box,
    project_to_box,
)
from lipverify.vnncomp.results import parse_counterexample
from lipverify.vnncomp.vnnlib import parse_vnnlib_text, read_vnnlib

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "vnncomp"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="shared benchmarks not present")


def _identity_onnx(path: Path, n: int, dtype: int = TensorProto.FLOAT) -> Path:
    """y = x, an independent tiny network."""
    x = helper.make_tensor_value_info("x", dtype, [1, n])
    y = helper.make_tensor_value_info("y", dtype, [1, n])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


SPEC = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
        "(declare-const Y_1 Real)\n(assert (>= X_0 0.1))\n(assert (<= X_0 0.3))\n"
        "(assert (>= X_1 0))\n(assert (<= X_1 1))\n(assert (>= Y_0 Y_1))\n")


def test_identity_network_counterexamples(tmp_path):
    oracle = OnnxOracle(_identity_onnx(tmp_path / "id.onnx", 2))
    assert (oracle.num_inputs, oracle.num_outputs) == (2, 2)
    (case,) = parse_vnnlib_text(SPEC).cases
    good = check_counterexample(oracle, case, np.array([0.3, 0.2]))
    assert good is not None and good.margin <= 0
    np.testing.assert_array_equal(good.y, good.x)  # what onnxruntime computed for what's written
    assert check_counterexample(oracle, case, np.array([0.1, 0.9])) is None
    # Exactly on the boundary (Y_0 = Y_1) is not offered: `>` would not hold there.
    assert check_counterexample(oracle, case, np.array([0.2, 0.2])) is None
    # Outside the box: projected back in, then checked at the projected point.
    projected = check_counterexample(oracle, case, np.array([0.5, 0.2]))
    assert projected is not None and in_box(projected.x, case, 0.0)
    assert check_counterexample(oracle, case, np.array([np.nan, 0.0])) is None
    assert check_counterexample(oracle, case, np.array([0.3])) is None


def test_projection_stays_inside_bounds_float32_cannot_represent(tmp_path):
    oracle = OnnxOracle(_identity_onnx(tmp_path / "id.onnx", 2))
    lower = np.array([0.1, -0.30353115613746867])
    upper = np.array([0.1, -0.29855281193475053])
    x = project_to_box(np.array([0.0, 5.0]), lower, upper, oracle)
    assert np.all(np.abs(x - np.clip(x, lower, upper)) < 1e-7)
    assert x[1] <= upper[1] and np.float32(x[1]) == x[1]
    assert BOX_TOLERANCE == 1e-4


def test_double_precision_inputs(tmp_path):
    oracle = OnnxOracle(_identity_onnx(tmp_path / "id64.onnx", 2, TensorProto.DOUBLE))
    assert oracle.cast(np.array([0.1]))[0] == 0.1


def test_unloadable_onnx_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        OnnxOracle(bad)


@needs_bench
@pytest.mark.parametrize("bench", ["test_2021", "mnist_fc_2022", "oval21_2022"])
def test_shipped_counterexamples_pass_and_perturbed_box_fails(bench):
    with (BENCH / bench / "checks.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["stored_counterexample"]][:3]
    assert rows
    for row in rows:
        oracle = OnnxOracle(BENCH / bench / row["onnx"])
        case = read_vnnlib(BENCH / bench / row["vnnlib"]).cases[0]
        x, _ = parse_counterexample((BENCH / bench / row["stored_counterexample"]).read_text())
        found = check_counterexample(oracle, case, x)
        assert found is not None and case.prop.violated(found.y)
        # The box centre of an instance whose centre is safe is no counterexample.
        if float(row["centre_min_slack"]) > 0:
            assert check_counterexample(oracle, case, case.centre) is None


def test_counterexamples_within_tolerance_of_a_bound_float32_cannot_represent(tmp_path):
    # X_0 fixed at 0.1 (no float32 value): its float32 neighbours, 6e-9 and 1.5e-9 away, are
    # counterexamples within the competition's tolerance; a point farther out is never one.
    oracle = OnnxOracle(_identity_onnx(tmp_path / "id.onnx", 2))
    spec = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
            "(declare-const Y_1 Real)\n(assert (>= X_0 0.1))\n(assert (<= X_0 0.1))\n"
            "(assert (>= X_1 0))\n(assert (<= X_1 1))\n")
    below = float(np.nextafter(np.float32(0.1), np.float32(0)))
    above = float(np.float32(0.1))
    (low,) = parse_vnnlib_text(spec + f"(assert (<= Y_0 {below + 1e-12!r}))\n").cases
    (high,) = parse_vnnlib_text(spec + "(assert (>= Y_0 0.1))\n").cases
    # The float32 point the backends' box ends at is accepted as found, on either side.
    for case, x0 in ((low, below), (high, above)):
        found = check_counterexample(oracle, case, np.array([x0, 0.5]))
        assert found is not None and found.x[0] == x0 and found.margin < 0
    # The same holds from anywhere: the projection tries the neighbour it rounds to.
    assert check_counterexample(oracle, high, np.array([0.5, 0.5])) is not None
    # Beyond the tolerance, a violating point is refused, rounded or not.
    (wide,) = parse_vnnlib_text(spec + "(assert (<= Y_0 0.0999))\n").cases
    assert check_counterexample(oracle, wide, np.array([0.0999, 0.5])) is None
    assert check_counterexample(oracle, wide, np.array([0.1 - 2 * ACCEPT_TOLERANCE, 0.5])) is None
    assert ACCEPT_TOLERANCE <= BOX_TOLERANCE / 2
    assert not in_box(np.array([0.1 - 1.01 * ACCEPT_TOLERANCE, 0.5]), wide)
    assert in_box(np.array([0.1 - 0.99 * ACCEPT_TOLERANCE, 0.5]), wide)
