"""Exact smallest margin of a piecewise-linear network over an L-infinity box, by MILP.

Independent of lipverify's code: the network is given as a list of stages, each an affine map
(a dense matrix and offset, taken from the torch module in float64 by evaluating it on the unit
vectors) followed by a LeakyReLU of some slope (0 is ReLU, any slope >= 0 or < 0, above 1
included, i.e. convex or concave), or by nothing for the last stage. Each unstable neuron
z in [l, u] is split as z = p + n with p in [0, u d], n in [l (1 - d), 0] and a binary d, and its
output is p + slope * n: exact for every slope. scipy's HiGHS solves the MILP; the argmin it
returns is then checked by a float64 forward pass of the torch module, so only a confirmed
point is ever used as evidence (the solver's tolerances never decide a test).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix
from torch import nn


@dataclass(frozen=True)
class Stage:
    """y = act(A x + c), act a LeakyReLU of `slope` (None: no activation)."""

    a: np.ndarray
    c: np.ndarray
    slope: float | None


def stages_of(blocks: list[tuple[nn.Module, float | None]], shape: tuple[int, ...]) -> list[Stage]:
    """Stages of a net given as (affine block, slope after it) pairs on inputs of `shape`.

    Each block's (A, c) comes from a float64 copy (the caller's modules are left as they are)
    evaluated at 0 and at the unit vectors.
    """
    stages = []
    for block, slope in blocks:
        block = copy.deepcopy(block).double().eval()
        n = int(np.prod(shape))
        with torch.no_grad():
            basis = torch.cat([torch.zeros(1, n), torch.eye(n)]).double().reshape(n + 1, *shape)
            out = block(basis)
        shape = tuple(out.shape[1:])
        out = out.reshape(n + 1, -1).numpy()
        stages.append(Stage((out[1:] - out[0]).T.copy(), out[0].copy(), slope))
    return stages


def _interval(stages: list[Stage], lo: np.ndarray, hi: np.ndarray):
    """Pre-activation intervals of every hidden stage (interval arithmetic, widened a little)."""
    out = []
    for s in stages[:-1]:
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        zm, zr = s.a @ mid + s.c, np.abs(s.a) @ rad
        zl, zu = zm - zr, zm + zr
        pad = 1e-9 * (1 + np.abs(zl) + np.abs(zu))
        zl, zu = zl - pad, zu + pad
        out.append((zl, zu))
        fl, fu = np.where(zl >= 0, zl, s.slope * zl), np.where(zu >= 0, zu, s.slope * zu)
        lo, hi = np.minimum(fl, fu), np.maximum(fl, fu)
        # Between l < 0 < u the output reaches 0, and for a slope < 0 its max is at an end.
        lo = np.where((zl < 0) & (zu > 0), np.minimum(lo, 0.0), lo)
    return out


def min_margin(stages: list[Stage], lower: np.ndarray, upper: np.ndarray,
               label: int, other: int) -> np.ndarray | None:
    """The point of the box [lower, upper] HiGHS finds minimising out[label] - out[other]."""
    bounds = _interval(stages, lower, upper)
    # Variables: x, then per hidden stage: z, p, n, d (each of the stage's width).
    widths = [len(s.c) for s in stages[:-1]]
    n_in = len(lower)
    total = n_in + 4 * sum(widths)
    lb, ub = np.full(total, -np.inf), np.full(total, np.inf)
    integrality = np.zeros(total)
    lb[:n_in], ub[:n_in] = lower, upper
    rows = 4 * sum(widths)
    mat = lil_matrix((rows, total))
    rlo, rhi = np.zeros(rows), np.zeros(rows)
    r = 0
    # Per neuron of the previous stage: its output as a list of (variable, coefficient).
    prev_out = [[(j, 1.0)] for j in range(n_in)]
    start = n_in
    for s, (zl, zu), m in zip(stages[:-1], bounds, widths):
        z, p, q, d = (start + k * m + np.arange(m) for k in range(4))
        start += 4 * m
        lb[z], ub[z] = zl, zu
        lb[p], ub[p] = 0.0, np.maximum(zu, 0.0)
        lb[q], ub[q] = np.minimum(zl, 0.0), 0.0
        lb[d], ub[d] = 0.0, 1.0
        integrality[d] = 1
        for i in range(m):
            # z_i = A_i . input + c_i
            mat[r, z[i]] = 1.0
            for j, v in enumerate(s.a[i]):
                if v:
                    for var, coef in prev_out[j]:
                        mat[r, var] -= v * coef
            rlo[r] = rhi[r] = s.c[i]
            r += 1
            # z = p + q
            mat[r, z[i]], mat[r, p[i]], mat[r, q[i]] = 1.0, -1.0, -1.0
            rlo[r] = rhi[r] = 0.0
            r += 1
            # p <= u d ; q >= l (1 - d)  <=>  q + l d >= l
            mat[r, p[i]], mat[r, d[i]] = 1.0, -max(zu[i], 0.0)
            rlo[r], rhi[r] = -np.inf, 0.0
            r += 1
            mat[r, q[i]], mat[r, d[i]] = 1.0, min(zl[i], 0.0)
            rlo[r], rhi[r] = min(zl[i], 0.0), np.inf
            r += 1
        prev_out = [[(p[i], 1.0), (q[i], s.slope)] for i in range(m)]
    last = stages[-1]
    row = last.a[label] - last.a[other]
    cost = np.zeros(total)
    for i, terms in enumerate(prev_out):
        for var, coef in terms:
            cost[var] += row[i] * coef
    result = milp(cost, integrality=integrality, bounds=Bounds(lb, ub),
                  constraints=LinearConstraint(mat.tocsr(), rlo, rhi),
                  options={"time_limit": 20.0, "mip_rel_gap": 1e-9})
    if result.x is None:
        return None
    return np.clip(result.x[:n_in], lower, upper)

