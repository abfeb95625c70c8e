"""Explicit-matrix bounds: every bound >= the exact value, and tight where it should be."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lipverify.norms.dense import (
    abs_sum_upper,
    dense_inf_norm_bound,
    dense_inf_to_two_bound,
    gram_bound,
    matrix_norm_bound,
    sumsq_upper,
    svd_bound,
)

# The float64 reference (LAPACK through torch) is itself off by a few ulps.
REFERENCE_RTOL = 1e-13


def _exact_sumsq(values: np.ndarray) -> Fraction:
    return sum((Fraction(float(v)) ** 2 for v in values.ravel()), Fraction(0))


@pytest.mark.parametrize("seed", range(5))
def test_sumsq_and_abs_sum_are_upper_bounds_of_exact_sums(seed):
    rng = np.random.default_rng(seed)
    # Mixed magnitudes make the float sum round (and tiny squares underflow).
    x = rng.standard_normal(997) * 10.0 ** rng.integers(-170, 20, 997)
    assert Fraction(float(sumsq_upper(x))) >= _exact_sumsq(x)
    exact_abs = sum((abs(Fraction(float(v))) for v in x), Fraction(0))
    assert Fraction(float(abs_sum_upper(x))) >= exact_abs


def test_rank_one_integer_matrix_has_a_known_norm():
    u = np.arange(1, 8, dtype=np.float64)
    v = np.array([3.0, -4.0, 12.0])  # ||v|| = 13
    a = np.outer(u, v)
    exact = math.sqrt(float(u @ u)) * 13.0
    for value in (svd_bound(a), float(gram_bound(a[None]).bounds[0]), matrix_norm_bound(a).value):
        assert value >= exact
        assert value <= exact * (1 + 1e-9)


@pytest.mark.parametrize("shape", [(10, 32), (64, 64), (33, 7), (200, 150), (1, 5)])
def test_matrix_norm_bound_is_sound_and_tight(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal(shape)
    exact = float(torch.linalg.matrix_norm(torch.from_numpy(a), ord=2))
    result = matrix_norm_bound(a)
    for name, value in result.candidates.items():
        assert value >= exact * (1 - REFERENCE_RTOL), name
    assert result.value <= exact * (1 + 1e-6)
    assert result.value == min(result.candidates.values())


def test_gram_bound_batch_of_complex_matrices():
    rng = np.random.default_rng(1)
    mats = rng.standard_normal((300, 6, 9)) + 1j * rng.standard_normal((300, 6, 9))
    exact = np.linalg.svd(mats, compute_uv=False)[:, 0]
    unpruned = gram_bound(mats, prune_below=None).bounds
    assert np.all(unpruned >= exact * (1 - REFERENCE_RTOL))
    assert np.max(unpruned / exact) < 1 + 1e-4
    pruned = gram_bound(mats).bounds  # only the batch maximum needs to be tight
    assert np.all(pruned >= exact * (1 - REFERENCE_RTOL))
    assert np.max(pruned) <= np.max(exact) * (1 + 1e-4)


@pytest.mark.parametrize("scale", [1e-200, 1e-30, 1.0, 1e30, 1e150])
def test_gram_bound_survives_extreme_scales(scale):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((12, 12)) * scale
    exact = np.linalg.svd(a, compute_uv=False)[0]
    value = float(gram_bound(a[None]).bounds[0])
    assert math.isfinite(value)
    assert exact * (1 - REFERENCE_RTOL) <= value <= exact * (1 + 1e-4)


def test_gram_bound_of_zero_and_nearly_equal_singular_values():
    assert gram_bound(np.zeros((1, 4, 4))).bounds[0] == 0.0
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((40, 40)))
    # An orthogonal matrix: every singular value 1, the slowest case for Gram iteration.
    value = float(gram_bound(q[None]).bounds[0])
    assert 1.0 <= value <= 1.0 + 5e-5  # 1.4e-5 above after Gram iteration's capped steps
    assert 1.0 <= svd_bound(q) <= 1.0 + 1e-9


def test_inf_norms_against_enumerated_vertices():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 10))
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=10)))  # the inf-ball's vertices
    images = signs @ w.T
    # Both induced norms are convex in x, so their maxima over the ball are at vertices.
    assert dense_inf_norm_bound(w) >= np.max(np.abs(images)) * (1 - REFERENCE_RTOL)
    assert dense_inf_to_two_bound(w) >= np.max(np.linalg.norm(images, axis=1)) * (
        1 - REFERENCE_RTOL)
    assert dense_inf_norm_bound(w) <= np.max(np.abs(images)) * (1 + 1e-12)


def test_svd_bound_of_a_batch_is_each_matrix_bound():
    rng = np.random.default_rng(7)
    batch = rng.standard_normal((5, 6, 4))
    got = svd_bound(batch)
    assert got.shape == (5,)
    for b, m in zip(got, batch, strict=True):
        assert b == svd_bound(m)
        assert b >= float(np.linalg.norm(m, 2)) * (1 - REFERENCE_RTOL)
