"""Exact references for tiny ReLU networks, by enumerating activation patterns.

Independent of lipverify's code: the network is a list of (W, b) pairs with ReLU between them.
For each activation pattern the network is affine on a polyhedron; an LP checks the polyhedron
has an interior, and a QP gives the distance from x0 to the points of the region where a margin
is <= 0. Used to test that bounds are >= the exact Lipschitz constant and certified radii are
<= the exact robust radius.
"""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np


def _pattern_affine(layers, pattern):
    """Constraints (G x <= h) of the region and the affine map (A, c) of the output on it."""
    n_in = layers[0][0].shape[1]
    a, c = np.eye(n_in), np.zeros(n_in)
    rows, rhs = [], []
    offset = 0
    for w, b in layers[:-1]:
        za, zc = w @ a, w @ c + b
        m = len(b)
        p = np.array(pattern[offset:offset + m], dtype=bool)
        offset += m
        # active: z >= 0  ->  -z <= 0 ; inactive: z <= 0
        sign = np.where(p, -1.0, 1.0)
        rows.append(sign[:, None] * za)
        rhs.append(-sign * zc)
        a, c = za * p[:, None], zc * p
    w, b = layers[-1]
    return np.vstack(rows), np.concatenate(rhs), w @ a, w @ c + b


class _Solvers:
    """Parametrised LP and QP (cvxpy DPP), canonicalised once per network shape."""

    def __init__(self, rows: int, n_in: int) -> None:
        self.g, self.h = cp.Parameter((rows, n_in)), cp.Parameter(rows)
        self.norms = cp.Parameter(rows, nonneg=True)
        x, t = cp.Variable(n_in), cp.Variable()
        self.lp_t = t
        self.lp = cp.Problem(cp.Maximize(t), [self.g @ x + cp.multiply(self.norms, t) <= self.h,
                                              t <= 1, cp.norm(x, "inf") <= 1e3])
        self.x0, self.row, self.off = cp.Parameter(n_in), cp.Parameter(n_in), cp.Parameter()
        y = cp.Variable(n_in)
        self.qp = cp.Problem(cp.Minimize(cp.sum_squares(y - self.x0)),
                             [self.g @ y <= self.h, self.row @ y + self.off <= 0])

    def interior(self, g, h) -> bool:
        self.g.value, self.h.value = g, h
        self.norms.value = np.linalg.norm(g, axis=1) + 1e-12
        self.lp.solve(solver=cp.CLARABEL)
        return self.lp.status == cp.OPTIMAL and self.lp_t.value > 1e-7

    def distance(self, g, h, x0, row, off) -> float:
        self.g.value, self.h.value = g, h
        self.x0.value, self.row.value, self.off.value = x0, row, off
        self.qp.solve(solver=cp.CLARABEL)
        if self.qp.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            return float(np.sqrt(max(self.qp.value, 0.0)))
        return np.inf


def regions(layers):
    """(G, h, A, c) for each activation pattern whose region has an interior."""
    hidden = sum(len(b) for _, b in layers[:-1])
    n_in = layers[0][0].shape[1]
    solvers = _Solvers(hidden, n_in)
    out = []
    for pattern in itertools.product([False, True], repeat=hidden):
        g, h, a, c = _pattern_affine(layers, pattern)
        if solvers.interior(g, h):
            out.append((g, h, a, c, solvers))
    return out


def exact_lipschitz(layers, margin_row=None, cells=None):
    """Exact global L2 Lipschitz constant (of `margin_row @ f` when given)."""
    best = 0.0
    for _, _, a, _, _ in cells if cells is not None else regions(layers):
        m = a if margin_row is None else margin_row[None, :] @ a
        best = max(best, float(np.linalg.norm(m, 2)))
    return best


def exact_robust_radius(layers, x0, label, cells=None):
    """Exact L2 distance from x0 to the nearest input whose label is not strictly the max."""
    best = np.inf
    n_out = layers[-1][0].shape[0]
    for g, h, a, c, solvers in cells if cells is not None else regions(layers):
        for j in range(n_out):
            if j == label:
                continue
            best = min(best, solvers.distance(g, h, x0, a[label] - a[j], c[label] - c[j]))
    return best
