"""What the backends of one instance receive: the box rounded outward, never inward."""

from __future__ import annotations

import time
from fractions import Fraction
from typing import ClassVar

import numpy as np
from fixed_input import FIXED

from lipverify.types import Certificate, Norm, Problem, Status
from lipverify.vnncomp.vnnlib import read_vnnlib
from lipverify.vnncomp.worker import BackendOptions, LocalBackends, backend_problem


class _Recorder:
    """A backend that keeps the problems it is given and verifies nothing."""

    name: ClassVar[str] = "recorder"
    cost: ClassVar[int] = 0
    sound: ClassVar[bool] = True
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2})

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def supports(self, network: object, problem: Problem) -> str | None:
        return None

    def certify(self, network: object, problem: Problem) -> list[Certificate]:
        self.problems.append(problem)
        return [Certificate(Status.UNKNOWN, self.name) for _ in range(len(problem))]


def _encloses(lower: np.ndarray, upper: np.ndarray, exact_lower: list[Fraction],
              exact_upper: list[Fraction]) -> bool:
    return all(Fraction(float(lo)) <= el and Fraction(float(hi)) >= eu
               for lo, hi, el, eu in zip(lower, upper, exact_lower, exact_upper, strict=True))


def test_backends_receive_a_float32_box_containing_the_decimal_box(fixed_input_instance):
    onnx, vnnlib = fixed_input_instance
    spec = read_vnnlib(vnnlib)
    local = LocalBackends(BackendOptions(str(onnx), spec.num_inputs, spec.num_outputs),
                          create=False)
    recorder = _Recorder()
    local.backends = {recorder.name: recorder}
    cert, skipped = local.certify(recorder.name, spec.cases[0], time.monotonic() + 60)
    assert cert.status == Status.UNKNOWN and skipped is None
    (problem,) = recorder.problems
    pert = problem.perturbation
    lower, upper = pert.lower.reshape(-1), pert.upper.reshape(-1)
    exact_lower, exact_upper = [Fraction(FIXED), Fraction(-1)], [Fraction(FIXED), Fraction(1)]
    assert _encloses(lower, upper, exact_lower, exact_upper)
    # float32 values: the float32 tensors of auto_LiRPA and the falsifier hold the same box
    for bound in (lower, upper):
        as32 = bound.astype(np.float32)
        np.testing.assert_array_equal(as32.astype(np.float64), bound)
    assert _encloses(lower.astype(np.float32), upper.astype(np.float32), exact_lower,
                     exact_upper)
    # and not wider than needed: the two float32 neighbours of 0.1
    assert lower[0] == float(np.nextafter(np.float32(0.1), np.float32(0)))
    assert upper[0] == float(np.float32(0.1))
    np.testing.assert_array_equal(problem.inputs.reshape(-1), (lower + upper) / 2)
    assert pert.eps == float(np.max(upper - lower) / 2)


def test_backend_problem_of_an_exact_box_is_unchanged(fixed_input_instance):
    _, vnnlib = fixed_input_instance
    text = vnnlib.read_text().replace(f"X_0 {FIXED}", "X_0 0.25")
    vnnlib.write_text(text)
    (case,) = read_vnnlib(vnnlib).cases
    problem = backend_problem(case, (2,), deadline=None)
    np.testing.assert_array_equal(problem.perturbation.lower.reshape(-1), [0.25, -1])
    np.testing.assert_array_equal(problem.perturbation.upper.reshape(-1), [0.25, 1])
    assert problem.perturbation.lower.shape == (1, 2)
