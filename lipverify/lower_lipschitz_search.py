"""Counterexamples to distance preservation: pairs `x, x'` with a small `||f(x) - f(x')|| / ||x - x'||`.

Every pair's ratio is an upper bound on the true lower Lipschitz constant (the infimum of the
ratio), so the smallest ratio found is an *estimate from above* of it, the counterpart of the
certified bound from below in `lipverify.lower_lipschitz`. Given a claimed constant `c`, a pair
whose ratio is below `c` refutes the claim; with a layer view, the ratio is bounded above with the
float64 rounding error of both forward passes included (`lipverify.network.rounding`), so a
reported violation holds for the network's exact function.

Pairs searched (the constructive search of Behrmann et al., "Invertible residual networks",
ICML 2019, and of the bi-Lipschitz ResNet literature: local Jacobians first, then descent):

- all pairs of (up to 64) data points, and random pairs of data and random points;
- close pairs `x, x + s v` with `v` the Jacobian's least-stretched direction at `x` (its last right
  singular vector, or a null direction when the Jacobian is wider than tall);
- normalised gradient descent of the ratio over both points, from every point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lipverify.lower_bounds import INVERSE_SCALES, LowerBoundOptions, _Function, _points
from lipverify.network.network import Network
from lipverify.network.rounding import MODULE_REL_ERROR, forward_with_error
from lipverify.norms.dense import EPS64, down, gamma, up
from lipverify.types import Norm

# Data points of which every pair is tried.
DATA_PAIR_POINTS = 64
# Random pairs tried per search point.
RANDOM_PAIRS_PER_POINT = 4
# Descent step, relative to the current offset (and to the data spread for the base point).
DESCENT_RATE = 0.1


@dataclass(frozen=True)
class LowerLipschitzCounterexample:
    """The pair with the smallest ratio found, and whether it refutes a claimed constant.

    Attributes:
        x: One input (the network's input shape, float64).
        x_prime: The other input.
        ratio: `||f(x) - f(x')|| / ||x - x'||` in float64 (an upper bound on the true lower
            Lipschitz constant, up to rounding).
        ratio_upper: An upper bound on the exact ratio (rounding of both forward passes included
            when `proven`).
        method: Which search found the pair.
        norm: The norm of inputs and outputs.
        claim: The claimed lower constant, if any.
        proven: True when `ratio_upper` rests on a proven rounding-error bound (a layer view).

    """

    x: np.ndarray
    x_prime: np.ndarray
    ratio: float
    ratio_upper: float
    method: str
    norm: Norm
    claim: float | None = None
    proven: bool = True

    @property
    def violates(self) -> bool:
        """True when the pair shows `||f(x) - f(x')|| < claim ||x - x'||`."""
        return self.claim is not None and self.ratio_upper < self.claim

    @property
    def distance(self) -> float:
        """`||x - x'||` in the search norm."""
        return float(np.linalg.norm((self.x - self.x_prime).ravel(), ord=_ord(self.norm)))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (the pair as nested lists)."""
        return {"ratio": self.ratio, "ratio_upper": self.ratio_upper, "method": self.method,
                "norm": self.norm.value, "claim": self.claim, "violates": self.violates,
                "proven": self.proven, "distance": self.distance,
                "x": self.x.tolist(), "x_prime": self.x_prime.tolist()}


def _ord(norm: Norm) -> float:
    return 2.0 if norm == Norm.L2 else math.inf


class _Best:
    """The smallest-ratio pair seen so far."""

    def __init__(self) -> None:
        self.ratio = math.inf
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.method = "none"

    def offer(self, ratios: torch.Tensor, a: torch.Tensor, b: torch.Tensor, method: str) -> None:
        if not len(ratios):
            return
        k = int(torch.argmin(ratios))
        if float(ratios[k]) < self.ratio:
            self.ratio, self.pair, self.method = float(ratios[k]), (a[k], b[k]), method


def _ratio(f: _Function, a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    with torch.no_grad():
        out = f(torch.cat([a, b]))
    top = torch.linalg.vector_norm(out[:len(a)] - out[len(a):], ord=p, dim=1)
    bottom = torch.linalg.vector_norm(a - b, ord=p, dim=1)
    return torch.where(bottom > 0, top / bottom.clamp_min(1e-300), torch.full_like(top, math.inf))


def _least_stretched(f: _Function, pts: torch.Tensor, opts: LowerBoundOptions, norm: Norm,
                     rng: np.random.Generator) -> torch.Tensor:
    """Per point a unit direction the Jacobian stretches least."""
    jac = f.batched(lambda z: f.jacobian(z).detach(), pts, opts.batch_size)
    _, _, vh = torch.linalg.svd(jac, full_matrices=False)
    if jac.shape[2] > jac.shape[1]:  # wider than tall: a direction the Jacobian maps to zero
        r = torch.as_tensor(rng.standard_normal(pts.shape), dtype=pts.dtype, device=pts.device)
        least = r - torch.einsum("brn,br->bn", vh, torch.einsum("brn,bn->br", vh, r))
        least = least / torch.linalg.vector_norm(least, dim=1, keepdim=True).clamp_min(1e-300)
    else:
        least = vh[:, -1, :]
    if norm == Norm.LINF:
        least = least / least.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    return least


def _descent(f: _Function, pts: torch.Tensor, opts: LowerBoundOptions, spread: float, p: float,
             rng: np.random.Generator, best: _Best) -> None:
    """Normalised gradient steps lowering the ratio of `(x + d, x)` over both `x` and `d`.

    (torch.optim would import torch._dynamo: seconds of start-up for nothing.)
    """
    x = pts.clone()
    d = opts.step_size * spread * torch.as_tensor(rng.standard_normal(pts.shape), dtype=pts.dtype,
                                                  device=pts.device)
    steps = max(opts.ascent_steps, 0)
    for step in range(steps):
        xg, dg = x.detach().requires_grad_(True), d.detach().requires_grad_(True)
        with torch.enable_grad():
            out = f(torch.cat([xg + dg, xg]))
            top = torch.linalg.vector_norm(out[:len(x)] - out[len(x):], ord=p, dim=1)
            ratio = top / torch.linalg.vector_norm(dg, ord=p, dim=1).clamp_min(1e-12)
            gx, gd = torch.autograd.grad(ratio.sum(), (xg, dg))
        best.offer(_ratio(f, x + d, x, p), x + d, x, "descent")
        rate = DESCENT_RATE * (1 - step / steps)

        def unit(g: torch.Tensor) -> torch.Tensor:
            return g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)

        size = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        d = (d - rate * size * unit(gd)).detach()
        x = (x - rate * opts.step_size * spread * unit(gx)).detach()
    if steps:
        best.offer(_ratio(f, x + d, x, p), x + d, x, "descent")


def _norm_upper(v: np.ndarray, p: float) -> float:
    """An upper bound of the exact norm of the float64 vector `v`."""
    if p == math.inf:
        return float(np.max(np.abs(v))) if v.size else 0.0
    return float(up(np.linalg.norm(v) * up(1.0 + gamma(v.size + 2))))


def _ratio_upper(network: Network, a: np.ndarray, b: np.ndarray, norm: Norm,
                 ratio: float) -> tuple[float, bool]:
    """An upper bound on the exact `||f(a) - f(b)|| / ||a - b||`, and whether it is proven."""
    p = _ord(norm)
    if network.layers is None:
        return float(up(ratio * (1 + MODULE_REL_ERROR))), False
    x = torch.as_tensor(np.stack([a, b])).reshape((2, *network.input_shape))
    with torch.no_grad():
        y, err = forward_with_error(network.layers, x)
    y, err = y.reshape(2, -1).cpu().numpy(), err.reshape(2, -1).cpu().numpy()
    # the computed difference of outputs is within one rounding (relative u) of the exact one
    top = up(up(_norm_upper(y[0] - y[1], p) * up(1 + EPS64)) + _norm_upper(err[0], p))
    top = up(top + _norm_upper(err[1], p))
    diff = (a - b).ravel()
    n = diff.size
    shade = down(1.0 - gamma(n + 3)) if p == 2.0 else down(1.0 - EPS64)
    bottom = down(float(np.linalg.norm(diff, ord=p)) * shade)
    return (float(up(top / bottom)) if bottom > 0 else math.inf), True


def search_lower_counterexample(network: Network, claim: float | None = None,
                                data: np.ndarray | None = None, *, norm: Norm | str = Norm.L2,
                                seed: int = 0, options: LowerBoundOptions | None = None
                                ) -> LowerLipschitzCounterexample:
    """The pair of inputs with the smallest `||f(x) - f(x')|| / ||x - x'||` found.

    Args:
        network: The network (its module runs in float64).
        claim: A claimed lower Lipschitz constant to refute (optional).
        data: Points that seed the search (random normal points are added).
        norm: Input and output norm (L2, or L-infinity).
        seed: Random seed.
        options: Search sizes (`max_points`, `random_points`, `ascent_steps` as descent steps,
            `step_size`, `batch_size`).

    Returns:
        The best pair, its ratio and an upper bound on its exact ratio.

    """
    norm, opts = Norm.parse(norm), options or LowerBoundOptions()
    p = _ord(norm)
    rng = np.random.default_rng(seed)
    f = _Function(network)
    flat, rand, spread = _points(f, data, opts, rng)
    pts = f.tensor(np.concatenate([flat, rand]))
    best = _Best()
    if len(flat) >= 2:
        data_pts = f.tensor(flat[:DATA_PAIR_POINTS])
        i, j = torch.triu_indices(len(data_pts), len(data_pts), 1)
        best.offer(_ratio(f, data_pts[i], data_pts[j], p), data_pts[i], data_pts[j], "data pairs")
    if len(pts) >= 2:
        count = RANDOM_PAIRS_PER_POINT * len(pts)
        i, j = (torch.as_tensor(rng.integers(0, len(pts), count)) for _ in range(2))
        keep = i != j
        a, b = pts[i[keep]], pts[j[keep]]
        best.offer(_ratio(f, a, b, p), a, b, "random pairs")
    least = _least_stretched(f, pts, opts, norm, rng)
    scale = torch.clamp(torch.linalg.vector_norm(pts, ord=p, dim=1), min=1.0)[:, None]
    for s in INVERSE_SCALES:
        near = pts + s * scale * least
        best.offer(_ratio(f, near, pts, p), near, pts, "least-stretched direction")
    _descent(f, pts, opts, spread, p, rng, best)
    shape = tuple(network.input_shape)
    a, b = (t.detach().cpu().double().numpy().reshape(shape) for t in best.pair)
    upper, proven = _ratio_upper(network, a, b, norm, best.ratio)
    return LowerLipschitzCounterexample(a, b, best.ratio, upper, best.method, norm,
                                        None if claim is None else float(claim), proven)
