"""Exact bounds on a ReLU sub-domain whose every neuron is fixed: one LP per property row.

With every ReLU's phase fixed, a feed-forward network is affine on the sub-domain, and the
sub-domain is the region cut by one half-space per split neuron (`z_i >= 0` or `z_i <= 0`). The
smallest value of a property row there is a linear program, solved by scipy's HiGHS. Its answer
is not trusted as it is: the bound is recomputed from the LP's multipliers `lam >= 0` by weak
duality, `min g.x + g0 >= lam.h + g0 + min_region (g - G^T lam).x`, which holds for any
`lam >= 0` whatever the solver's tolerances, with an allowance for float64 rounding. An empty
sub-domain is shown empty the same way, from a phase-one LP's multipliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog

from lipverify.network.layers import Activation, Conv, Dense, Layer, Reshape, Shift
from lipverify.types import Norm

ROUNDING = 1e-9  # relative allowance for float64 rounding in the composed maps and the bound


@dataclass(frozen=True, eq=False)
class LeafRegion:
    """One input's region, flattened: a box `[lower, upper]`, or an L2 ball `(centre, eps)`
    (whose bounding box the LP runs on; the bound is then taken over the ball itself)."""

    lower: np.ndarray
    upper: np.ndarray
    centre: np.ndarray
    norm: Norm
    eps: float

    def support_min(self, r: np.ndarray) -> float:
        """`min r.x` over the region (exact up to rounding)."""
        if self.norm == Norm.L2:
            return float(r @ self.centre - self.eps * np.linalg.norm(r))
        return float(np.minimum(r * self.lower, r * self.upper).sum())

    @property
    def scale(self) -> float:
        """The largest |x| in the region (for rounding allowances)."""
        return float(np.abs(np.concatenate([self.lower, self.upper])).max(initial=0.0))


def relu_layers(layers: tuple[Layer, ...] | None) -> tuple[Layer, ...] | None:
    """The layers when they are affine maps, shifts and reshapes between ReLUs, else None."""
    if not layers:
        return None
    for layer in layers:
        if isinstance(layer, Activation):
            if layer.kind != "relu":
                return None
        elif not isinstance(layer, (Dense, Conv, Shift, Reshape)):
            return None
    return layers


def _compose(layer: Layer, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A', c')` of `layer(A x + c)` for an affine layer (`A` is `(n_in, n_cur)`, transposed)."""
    if isinstance(layer, Shift):
        return a, c + layer.shift.reshape(-1).to(c)
    if isinstance(layer, Reshape):
        return a, c
    a = layer.linear(a.reshape((a.shape[0], *layer.in_shape))).reshape(a.shape[0], -1)
    c = layer.forward(c.reshape((1, *layer.in_shape))).reshape(-1)
    return a, c


def leaf_lower_bounds(layers: tuple[Layer, ...], active: list[np.ndarray],
                      constrained: list[np.ndarray], region: LeafRegion, c: np.ndarray,
                      d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sound lower bounds of the rows `c y - d` over one fully fixed sub-domain.

    Args:
        layers: A `relu_layers` view; its k-th ReLU has `len(active[k])` inputs.
        active: Per ReLU, the phase of each neuron on the sub-domain (True: `z >= 0`).
        constrained: Per ReLU, the neurons whose phase is a constraint of the sub-domain (the
            others' phases hold on the whole region, so their half-spaces are left out).
        region: The input region.
        c, d: The rows, `(rows, outputs)` and `(rows,)`.

    Returns:
        Per row a lower bound (+inf when the sub-domain is shown empty), and the LP's point of
        the smallest row where it found one (for a counterexample check), else None.
    """
    n_in = len(region.centre)
    a = torch.eye(n_in, dtype=torch.float64)
    off = torch.zeros(n_in, dtype=torch.float64)
    g_rows, h_rows = [], []
    k = 0
    for layer in layers:
        if isinstance(layer, Activation):
            on = torch.as_tensor(active[k])
            keep = torch.as_tensor(constrained[k])
            sign = torch.where(on, 1.0, -1.0).to(torch.float64)
            g_rows.append((a[:, keep] * sign[keep]).T)  # sign * (A x + c) >= 0
            h_rows.append(-(off[keep] * sign[keep]))
            a = a * on.to(a.dtype)
            off = off * on.to(off.dtype)
            k += 1
        else:
            a, off = _compose(layer, a, off)
    g_mat = torch.cat(g_rows).numpy() if g_rows else np.zeros((0, n_in))
    h = torch.cat(h_rows).numpy() if h_rows else np.zeros(0)
    out_a, out_c = a.T.numpy(), off.numpy()
    if len(h) and _empty(g_mat, h, region):
        return np.full(len(c), np.inf), None
    bounds = np.empty(len(c))
    points = []
    for r in range(len(c)):
        g = c[r] @ out_a
        g0 = float(c[r] @ out_c - d[r])
        bounds[r], x = _row_bound(g, g0, g_mat, h, region)
        points.append(x)
    worst = int(np.argmin(bounds))
    return bounds, points[worst]


def _row_bound(g: np.ndarray, g0: float, g_mat: np.ndarray, h: np.ndarray,
               region: LeafRegion) -> tuple[float, np.ndarray | None]:
    """A weak-duality lower bound of `g.x + g0` on `{x in region, G x >= h}`, and the LP's point."""
    lam = np.zeros(len(h))
    point = None
    if len(h):
        res = linprog(g, A_ub=-g_mat, b_ub=-h, bounds=list(zip(region.lower, region.upper)),
                      method="highs")
        if res.status == 0:
            lam = np.maximum(-res.ineqlin.marginals, 0.0)
            point = res.x
    r = g - g_mat.T @ lam
    value = float(lam @ h) + g0 + region.support_min(r)
    scale = region.scale
    size = (float(np.abs(lam) @ (np.abs(h) + np.abs(g_mat).sum(axis=1) * scale))
            + float(np.abs(g).sum()) * scale + abs(g0) + 1.0)
    return value - ROUNDING * size, point


def _empty(g_mat: np.ndarray, h: np.ndarray, region: LeafRegion) -> bool:
    """True when `{x in region, G x >= h}` is provably empty.

    Phase one: `min t` subject to `G x + t >= h`; multipliers `lam >= 0` summing to 1 prove
    every point of the set would satisfy `0 >= lam.h + min_region(-G^T lam).x`, so a positive
    right-hand side (beyond rounding) proves the set empty.
    """
    m, n = g_mat.shape
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    a_ub = -np.hstack([g_mat, np.ones((m, 1))])
    bounds = [*zip(region.lower, region.upper), (None, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=-h, bounds=bounds, method="highs")
    if res.status != 0 or res.fun <= 0:
        return False
    lam = np.maximum(-res.ineqlin.marginals, 0.0)
    total = lam.sum()
    if total <= 0:
        return False
    lam = lam / total
    value = float(lam @ h) + region.support_min(-g_mat.T @ lam)
    size = float(lam @ (np.abs(h) + np.abs(g_mat).sum(axis=1) * region.scale)) + 1.0
    return value > ROUNDING * size
