"""Instances with known answers (the CI subset): never a wrong answer, and the easy ones solved.

The full run of every shipped instance is `benchmarks/bench_vnncomp.py`.
"""

from __future__ import annotations

import csv
import functools
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fixed_input import FIXED, FIXED_BELOW

from lipverify.backends.registry import BackendRegistry
from lipverify.vnncomp.check import ACCEPT_TOLERANCE
from lipverify.vnncomp.results import VnncompResult
from lipverify.vnncomp.runner import RunOptions, falsifier_round, run_instance
from lipverify.vnncomp.vnnlib import read_vnnlib
from lipverify.vnncomp.worker import BackendOptions, WorkerBackends

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "vnncomp"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="shared benchmarks not present")

# (benchmark, onnx stem, vnnlib stem): every test_2021 instance, and mnist_fc instances whose
# answer a bound-only verifier with a falsifier reaches in seconds (centre, PGD, CROWN).
SUBSET = [
    ("test_2021", "test_nano", "test_nano"),
    ("test_2021", "test_tiny", "test_tiny"),
    ("test_2021", "test_small", "test_small"),
    ("test_2021", "test_sat", "test_prop"),
    ("test_2021", "test_unsat", "test_prop"),
    ("mnist_fc_2022", "mnist-net_256x2", "prop_12_0.03"),  # sat: the box centre
    ("mnist_fc_2022", "mnist-net_256x2", "prop_1_0.05"),   # sat: PGD
    ("mnist_fc_2022", "mnist-net_256x2", "prop_0_0.03"),   # unsat
]


@functools.cache
def _can_verify() -> bool:
    """Whether a bound-propagation backend (which verifies these unsat instances) is here."""
    return "lirpa" in BackendRegistry.from_entry_points().available_names()


def _expected(bench: str) -> dict[tuple[str, str], str]:
    with (BENCH / bench / "expected.csv").open() as fh:
        return {(Path(r["onnx"]).stem, Path(r["vnnlib"]).stem): r["expected"]
                for r in csv.DictReader(fh)}


def _independent_check(onnx: Path, vnnlib: Path, x: np.ndarray, y: np.ndarray) -> None:
    """The competition's check, with a fresh onnxruntime session."""
    session = ort.InferenceSession(str(onnx))
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    y_ort = session.run(None, {inp.name: x.astype(np.float32).reshape(shape)})[0].ravel()
    np.testing.assert_allclose(y, y_ort, rtol=1e-6, atol=1e-7)
    spec = read_vnnlib(vnnlib)
    assert any(np.all(x >= c.lower - 1e-4) and np.all(x <= c.upper + 1e-4)
               and c.prop.violated(y_ort.astype(np.float64)) for c in spec.cases)


@needs_bench
@pytest.mark.parametrize(("bench", "onnx", "vnnlib"), SUBSET)
def test_known_answers(bench, onnx, vnnlib):
    folder = BENCH / bench
    onnx_path = folder / "onnx" / f"{onnx}.onnx"
    vnnlib_path = folder / "vnnlib" / f"{vnnlib}.vnnlib"
    want = _expected(bench)[(onnx, vnnlib)]
    answer = run_instance(onnx_path, vnnlib_path, RunOptions(timeout=90))
    got = answer.result.value
    assert not (got == "unsat" and want == "sat"), answer.trace
    assert not (got == "sat" and want == "unsat"), answer.trace
    if want == "sat" or _can_verify():
        assert got == want, (answer.message, answer.trace)  # these are within reach
    if got == "sat":
        _independent_check(onnx_path, vnnlib_path, answer.counterexample.x,
                           answer.counterexample.y)


@needs_bench
def test_too_little_time_is_a_timeout_not_an_answer():
    folder = BENCH / "mnist_fc_2022"
    answer = run_instance(folder / "onnx" / "mnist-net_256x4.onnx",
                          folder / "vnnlib" / "prop_0_0.03.vnnlib", RunOptions(timeout=0.3))
    assert answer.result in (VnncompResult.TIMEOUT, VnncompResult.UNKNOWN)
    assert answer.seconds < 15  # parsing and opening the network, nothing more


@needs_bench
def test_a_backend_past_the_deadline_is_stopped():
    folder = BENCH / "mnist_fc_2022"
    spec = read_vnnlib(folder / "vnnlib" / "prop_0_0.03.vnnlib")
    pool = WorkerBackends(BackendOptions(str(folder / "onnx" / "mnist-net_256x2.onnx"),
                                         spec.num_inputs, spec.num_outputs, ("attack",)))
    try:
        assert [s.name for s in pool.wait_ready(time.monotonic() + 120)] == ["attack"]
        start = time.monotonic()
        cert, _ = pool.certify("attack", spec.cases[0], time.monotonic() + 1.0,
                               falsifier_round(5))  # far more work than one second
        assert cert.status.value in ("timeout", "unknown")
        assert time.monotonic() - start < 4
    finally:
        pool.close()
    assert not pool.proc.is_alive()


@needs_bench
def test_no_input_in_the_box_is_unsat(tmp_path):
    spec = tmp_path / "empty.vnnlib"
    spec.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
                    "(assert (>= X_0 1))\n(assert (<= X_0 0))\n(assert (<= Y_0 0))\n")
    answer = run_instance(BENCH / "test_2021" / "onnx" / "test_nano.onnx", spec,
                          RunOptions(timeout=10))
    assert answer.result == VnncompResult.UNSAT


def _two_boxes(tmp_path: Path, threshold: float) -> Path:
    """test_nano computes y = relu(x / 2): box 2 reaches y = 1.5 at x = 3, box 1 never y <= -1."""
    spec = tmp_path / f"boxes_{threshold}.vnnlib"
    spec.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (or\n"
                    "  (and (>= X_0 -1) (<= X_0 1) (<= Y_0 -1))\n"
                    f"  (and (>= X_0 2) (<= X_0 3) (>= Y_0 {threshold}))))\n")
    return spec


@needs_bench
@pytest.mark.parametrize(("threshold", "want"), [(1.4, "sat"), (1.6, "unsat")])
def test_input_disjunction_is_sat_if_any_box_is(tmp_path, threshold, want):
    onnx = BENCH / "test_2021" / "onnx" / "test_nano.onnx"
    answer = run_instance(onnx, _two_boxes(tmp_path, threshold), RunOptions(timeout=60))
    assert answer.result.value in (want, "unknown", "timeout")
    if want == "sat" or _can_verify():
        assert answer.result.value == want, answer.trace
    if want == "sat":
        assert answer.counterexample.x[0] >= 2.8 - 1e-6 and answer.counterexample.y[0] >= 1.4


def _fixed_input_check(onnx: Path, x: np.ndarray, y: np.ndarray) -> None:
    """The competition's check of a counterexample of the fixed-input instance."""
    assert abs(Fraction(float(x[0])) - Fraction(FIXED)) <= Fraction(ACCEPT_TOLERANCE)
    assert -1 <= x[1] <= 1
    session = ort.InferenceSession(str(onnx))
    y_ort = session.run(None, {"x": x.astype(np.float32).reshape(1, 2)})[0].ravel()
    np.testing.assert_array_equal(y, y_ort)
    assert y_ort[0] < 0


def test_input_fixed_where_float32_has_no_value_is_sat(fixed_input_instance):
    # Issue 15, item 4: X_0 = 0.1 exactly; the backends saw the box rounded to the nearest
    # float32 (0.1 + 1.5e-9), where the property holds, and answered unsat. The violation is at
    # the float32 neighbour below (and at the real 0.1), which the falsifier may now use.
    onnx, vnnlib = fixed_input_instance
    answer = run_instance(onnx, vnnlib, RunOptions(timeout=30))
    assert answer.result == VnncompResult.SAT, answer.trace
    assert answer.counterexample.x[0] == FIXED_BELOW
    _fixed_input_check(onnx, answer.counterexample.x, answer.counterexample.y)


@pytest.mark.parametrize("backend", ["local", "lirpa", "alpha-crown", "spectral"])
def test_verifiers_alone_never_prove_the_fixed_input_instance(fixed_input_instance, backend):
    # Without the falsifier nothing can answer sat, and no sound backend may prove the box:
    # `local` did, on the float32-rounded box, before the box was rounded outward.
    if backend not in BackendRegistry.from_entry_points().available_names():
        pytest.skip(f"{backend} is not available")
    onnx, vnnlib = fixed_input_instance
    answer = run_instance(onnx, vnnlib, RunOptions(timeout=30, backends=(backend,)))
    assert answer.result in (VnncompResult.UNKNOWN, VnncompResult.TIMEOUT), answer.trace


def _leaky_onnx(path: Path, slope: float) -> Path:
    """y = LeakyRelu(x) with negative_slope `slope` (one input, one output)."""
    from onnx import TensorProto, helper

    node = helper.make_node("LeakyRelu", ["x"], ["y"], alpha=slope)
    graph = helper.make_graph([node], "leaky",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("backend", ["lirpa", "alpha-crown", "local"])
def test_concave_leaky_relu_is_never_unsat(tmp_path, backend):
    # Issue 15, item 3: LeakyReLU with slope 2 on x in [-1, 1] reaches y = -2, so `Y_0 <= -1.5`
    # is satisfiable; auto_LiRPA's convex relaxation gives y >= x >= -1 and answered unsat.
    if backend not in BackendRegistry.from_entry_points().available_names():
        pytest.skip(f"{backend} is not available")
    onnx = _leaky_onnx(tmp_path / "leaky.onnx", 2.0)
    spec = tmp_path / "leaky.vnnlib"
    spec.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
                    "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (<= Y_0 -1.5))\n")
    alone = run_instance(onnx, spec, RunOptions(timeout=30, backends=(backend,)))
    assert alone.result in (VnncompResult.UNKNOWN, VnncompResult.TIMEOUT), alone.trace
    full = run_instance(onnx, spec, RunOptions(timeout=30))
    assert full.result == VnncompResult.SAT, full.trace
    assert full.counterexample.y[0] <= -1.5
