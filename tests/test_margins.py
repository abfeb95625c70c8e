import math

import numpy as np

from lipverify.margins import property_radius, robust_radii
from lipverify.network.rounding import SoundOutputs
from lipverify.types import Property


def test_robust_radii_formula_and_rounding():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(50, 5)) * 3
    labels = out.argmax(1)
    lip = rng.uniform(0.5, 2, size=(5, 5))
    lip = (lip + lip.T) / 2
    err = rng.uniform(0, 1e-3, size=out.shape)
    radii = robust_radii(SoundOutputs(out, err), labels, lip)
    for i in range(50):
        y = labels[i]
        exact = min((out[i, y] - out[i, j] - err[i, y] - err[i, j]) / lip[y, j]
                    for j in range(5) if j != y)
        assert radii[i] <= max(exact, 0.0)
        assert radii[i] >= max(exact, 0.0) * (1 - 1e-8)


def test_misclassified_gets_zero_radius():
    out = np.array([[0.0, 1.0]])
    assert robust_radii(SoundOutputs(out, np.zeros_like(out)), np.array([0]),
                        np.ones((2, 2)))[0] == 0.0


def test_property_radius_general_matches_robust():
    out = np.array([3.0, 1.0, 2.5])
    prop = Property.robust(0, 3)
    r, worst = property_radius(prop, out, lambda c: 2.0 * float(np.linalg.norm(c)), 0.0)
    expected = min((3 - 1) / (2 * math.sqrt(2)), (3 - 2.5) / (2 * math.sqrt(2)))
    assert r <= expected and r > expected * (1 - 1e-8)
    assert math.isclose(worst, 0.5)


def test_property_radius_conjunction_uses_best_row():
    # violation when y0 <= 0 AND y1 <= 0: safe if either row stays positive
    prop = Property.linear([(np.eye(2), np.zeros(2))], 2)
    r, _ = property_radius(prop, np.array([1.0, 4.0]), lambda c: 1.0, 0.0)
    assert math.isclose(r, 4.0, rel_tol=1e-8)
