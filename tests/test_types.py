import math

import numpy as np
import pytest

from lipverify.errors import InputError
from lipverify.types import Certificate, Norm, Perturbation, Problem, Property, Status


def test_norm_parse():
    assert Norm.parse("2") is Norm.L2
    assert Norm.parse("L2") is Norm.L2
    assert Norm.parse("inf") is Norm.LINF
    assert Norm.parse("Linf") is Norm.LINF
    with pytest.raises(InputError):
        Norm.parse("1")


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_bad_eps_rejected(eps):
    with pytest.raises(InputError):
        Perturbation.ball(2, eps)


def test_box_radius_and_centre():
    lo = np.array([[0.0, 1.0], [2.0, 2.0]])
    hi = np.array([[1.0, 1.5], [2.0, 4.0]])
    box = Perturbation.box(lo, hi)
    assert box.is_box and box.eps == 1.0
    assert np.allclose(box.centres(None), [[0.5, 1.25], [2.0, 3.0]])
    assert box.enclosing_radius(Norm.LINF) == 1.0
    assert math.isclose(box.enclosing_radius(Norm.L2), math.sqrt(0.5**2 + 0.25**2) if False
                        else max(math.hypot(0.5, 0.25), 1.0))
    with pytest.raises(InputError):
        Perturbation.box(hi, lo)


def test_robust_property_margin_matches_definition():
    prop = Property.robust(2, 4)
    y = np.array([0.5, 1.0, 3.0, 2.5])
    assert math.isclose(prop.margin(y), 0.5)  # f_2 - max_j f_j
    assert not prop.violated(y)
    assert prop.violated(np.array([0.0, 3.0, 3.0, 1.0]))  # a tie counts as violation


def test_linear_property_disjunction_of_conjunctions():
    # violation: (y0 <= 0 and y1 <= 0) or (y0 - y1 <= -5)
    prop = Property.linear([(np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros(2)),
                            (np.array([[1.0, -1.0]]), np.array([-5.0]))], 2)
    assert prop.violated(np.array([-1.0, -1.0]))
    assert not prop.violated(np.array([-1.0, 1.0]))
    assert prop.violated(np.array([0.0, 6.0]))


def test_problem_checks_labels_and_inputs():
    x = np.zeros((3, 2), np.float32)
    pert = Perturbation.ball("2", 0.1)
    with pytest.raises(InputError):
        Problem.robustness(x, [0, 1, 5], 3, pert)
    with pytest.raises(InputError):
        Problem.robustness(x, [0.0, 1.0, 1.0], 3, pert)
    with pytest.raises(InputError):
        Problem.robustness(np.full((3, 2), np.nan, np.float32), [0, 1, 1], 3, pert)
    problem = Problem.robustness(x, [0, 1, 1], 3, pert)
    assert list(problem.labels) == [0, 1, 1]
    assert len(problem.subset([2])) == 1


def test_certificate_json_roundtrip():
    cert = Certificate(Status.FALSIFIED, "attack", 0.0, -1.5, 0.1, (1.0, 2.0), {"k": np.float64(2)})
    back = Certificate.from_json(cert.to_json())
    assert back.status is Status.FALSIFIED and back.counterexample == (1.0, 2.0)
    assert back.details["k"] == 2.0
