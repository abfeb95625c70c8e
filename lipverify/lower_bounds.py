"""Empirical lower bounds on Lipschitz constants, and an estimate of the lower (bi-)Lipschitz one.

Upper bounds from the backends are only meaningful next to a lower bound: the ratio says how
loose they are. Every bound returned here is checked by a difference quotient of the network itself,
`||f(x + h v) - f(x - h v)|| / ||2 h v||` in float64, taken along the direction where the
Jacobian is largest at the best point found: the smaller of the two, lowered by a relative
`ROUNDING_SLACK`, is a true lower bound on the Lipschitz constant even where the Jacobian is not
defined (a ReLU kink). Points searched: the
data, random points around and between the data, and an ascent on the Jacobian norm (its gradient
through a double backward pass, plus random proposals, which is what moves on ReLU networks where
that gradient vanishes).

Norms: in L2, the operator norm is the spectral norm of the Jacobian and a margin's constant the
L2 norm of its gradient; in L-infinity, the operator norm is the largest row L1 norm of the
Jacobian and a margin's constant the L1 norm of its gradient.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lipverify.errors import InputError
from lipverify.network.network import Network
from lipverify.types import Norm

log = logging.getLogger(__name__)

# Half-step of the difference quotients, relative to max(1, |x|).
QUOTIENT_STEP = 1e-6
# Reported bounds are min(Jacobian norm, difference quotient) lowered by this relative slack,
# which covers the float64 rounding of both.
ROUNDING_SLACK = 1e-9
# Local probes of the lower Lipschitz constant: steps relative to max(1, |x|).
INVERSE_SCALES = (1e-4, 1e-2, 1e-1)


@dataclass(frozen=True)
class LowerBoundOptions:
    """How hard to search.

    Attributes:
        max_points: Data points used (the first ones).
        random_points: Random points added (around the data, or standard normal without data).
        ascent_starts: Best points the ascent starts from.
        ascent_steps: Ascent (or descent, for the inverse estimate) steps.
        step_size: Ascent step relative to the data's spread.
        batch_size: Points per Jacobian batch.

    """

    max_points: int = 256
    random_points: int = 64
    ascent_starts: int = 8
    ascent_steps: int = 30
    step_size: float = 0.05
    batch_size: int = 64


@dataclass(frozen=True)
class LipschitzLowerBound:
    """A lower bound on the global Lipschitz constant in `norm`, and how it was found."""

    value: float
    norm: Norm
    method: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairwiseLowerBound:
    """`values[y, j]`: a lower bound on the Lipschitz constant of `f_y - f_j` (zero diagonal)."""

    values: np.ndarray
    norm: Norm
    method: str


@dataclass(frozen=True)
class InverseLipschitzEstimate:
    """The smallest `||f(x) - f(x')|| / ||x - x'||` found (a lower bi-Lipschitz estimate).

    An estimate from above of the lower Lipschitz constant (the true one can only be smaller),
    not a bound on it from below.
    """

    value: float
    norm: Norm
    method: str
    label: str = "lower bi-Lipschitz estimate (an upper bound on the true constant)"


def _ord(norm: Norm) -> float:
    return 2.0 if norm == Norm.L2 else math.inf


class _Function:
    """The network as a float64 function of flat inputs, with Jacobians."""

    def __init__(self, network: Network) -> None:
        self.shape = tuple(network.input_shape)
        self.device = network.device
        try:
            self.module = copy.deepcopy(network.module).double().eval()
            self.dtype = torch.float64
        except Exception as exc:  # noqa: BLE001 - modules that only run in float32
            log.warning("lower bounds in float32: %s", exc)
            self.module, self.dtype = network.module, torch.float32

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, np.float64), dtype=self.dtype, device=self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.reshape((x.shape[0], *self.shape))).reshape(x.shape[0], -1)

    def jacobian(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """(B, K, n) Jacobians at flat points `x` (B, n)."""
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = self(x)
            rows = [torch.autograd.grad(y[:, k].sum(), x, retain_graph=True,
                                        create_graph=create_graph)[0] for k in range(y.shape[1])]
        return torch.stack(rows, dim=1)

    def batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                size: int) -> torch.Tensor:
        return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), max(1, size))])


def _operator_norm(jac: torch.Tensor, norm: Norm) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """Per point: the Jacobian's operator norm, and `u`, `v` with `u J v` equal to it."""
    if norm == Norm.L2:
        u, s, vh = torch.linalg.svd(jac, full_matrices=False)
        return s[:, 0], u[:, :, 0], vh[:, 0, :]
    rows = jac.abs().sum(dim=2)
    value, k = rows.max(dim=1)
    u = torch.nn.functional.one_hot(k, jac.shape[1]).to(jac.dtype)
    v = torch.sign(jac[torch.arange(len(k)), k])
    return value, u, v


def _quotients(f: _Function, x: torch.Tensor, v: torch.Tensor, norm: Norm,
               coeffs: torch.Tensor | None = None) -> torch.Tensor:
    """`||g(x + h v) - g(x - h v)|| / ||2 h v||` with g = f, or g = coeffs . f (per point)."""
    p = _ord(norm)
    h = QUOTIENT_STEP * torch.clamp(torch.linalg.vector_norm(x, ord=p, dim=1), min=1.0)
    step = h[:, None] * v
    with torch.no_grad():
        out = f(torch.cat([x + step, x - step]))
    diff = out[:len(x)] - out[len(x):]
    if coeffs is not None:
        top = (diff * coeffs).sum(dim=1).abs()
    else:
        top = torch.linalg.vector_norm(diff, ord=p, dim=1)
    bottom = torch.linalg.vector_norm(2 * step, ord=p, dim=1)
    return torch.where(bottom > 0, top / bottom.clamp_min(1e-300), torch.zeros_like(top))


def _checked_gradient_norms(f: _Function, points: torch.Tensor, grad: torch.Tensor, norm: Norm,
                            coeffs: torch.Tensor) -> torch.Tensor:
    """Per point the dual norm of `grad` (the gradient of `coeffs . f` there), capped by a
    difference quotient along its steepest direction and shaded for rounding: a lower bound
    on the Lipschitz constant of `coeffs . f`."""
    if norm == Norm.L2:
        v = grad / torch.linalg.vector_norm(grad, dim=1, keepdim=True).clamp_min(1e-300)
    else:
        v = torch.sign(grad)
    q = _quotients(f, points, v, norm, coeffs)
    dual = 2.0 if norm == Norm.L2 else 1.0
    return torch.minimum(q, torch.linalg.vector_norm(grad, ord=dual, dim=1)) * (1 - ROUNDING_SLACK)


def _points(f: _Function, data: np.ndarray | None, opts: LowerBoundOptions,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Flat data points, random points, and the data's spread (a length scale)."""
    n = math.prod(f.shape)
    if data is not None:
        flat = np.asarray(data, np.float64).reshape(len(data), -1)
        if flat.shape[1] != n:
            raise InputError(f"data of {flat.shape[1]} values per sample, network takes {n}")
        flat = flat[:opts.max_points]
    else:
        flat = np.zeros((0, n))
    if len(flat):
        spread = float(np.std(flat)) or 1.0
        lo, hi = flat.min(axis=0), flat.max(axis=0)
        half = opts.random_points // 2
        around = flat[rng.integers(0, len(flat), half)] + spread * rng.standard_normal((half, n))
        between = lo + (hi - lo + 1e-12) * rng.random((opts.random_points - half, n))
        rand = np.concatenate([around, between])
    else:
        spread = 1.0
        rand = rng.standard_normal((max(opts.random_points, 1), n))
    return flat, rand, spread


def _ascent(f: _Function, starts: torch.Tensor, norm: Norm, opts: LowerBoundOptions,
            spread: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise the Jacobian norm from `starts` (gradient steps and random proposals, the best kept).

    Returns the points and their Jacobian norms.
    """
    x = starts.clone()
    best, _, _ = _operator_norm(f.jacobian(x).detach(), norm)
    sigma = torch.full((len(x), 1), opts.step_size * spread, dtype=x.dtype, device=x.device)
    for _ in range(opts.ascent_steps):
        xg = x.detach().requires_grad_(True)
        jac = f.jacobian(xg, create_graph=True)
        _, u, v = _operator_norm(jac.detach(), norm)
        objective = torch.einsum("bk,bkn,bn->b", u, jac, v).sum()
        grad = torch.autograd.grad(objective, xg, allow_unused=True)[0] if \
            objective.requires_grad else None
        noise = torch.as_tensor(rng.standard_normal(x.shape), dtype=x.dtype, device=x.device)
        proposals = [x + sigma * noise]
        if grad is not None and bool(torch.any(grad != 0)):
            unit = grad / torch.linalg.vector_norm(grad, dim=1, keepdim=True).clamp_min(1e-300)
            proposals.append(x + sigma * unit)
        for cand in proposals:
            value, _, _ = _operator_norm(f.jacobian(cand).detach(), norm)
            better = value > best
            x = torch.where(better[:, None], cand.detach(), x)
            best = torch.where(better, value, best)
            sigma = torch.where(better[:, None], sigma * 1.5, sigma * 0.8)
    return x.detach(), best


def jacobian_lower_bound(network: Network, data: np.ndarray | None = None, *,
                         norm: Norm | str = Norm.L2, seed: int = 0,
                         options: LowerBoundOptions | None = None) -> LipschitzLowerBound:
    """A lower bound on the global Lipschitz constant in `norm`.

    The largest Jacobian operator norm found (data, random points, ascent), checked by a
    difference quotient.
    """
    norm, opts = Norm.parse(norm), options or LowerBoundOptions()
    rng = np.random.default_rng(seed)
    f = _Function(network)
    flat, rand, spread = _points(f, data, opts, rng)
    sources = {"data": flat, "random": rand}
    best_x, best_v, best_src = [], [], []
    norms = []
    for label, pts in sources.items():
        if not len(pts):
            continue
        x = f.tensor(pts)
        jac = f.batched(lambda z: f.jacobian(z).detach(), x, opts.batch_size)
        value, _, v = _operator_norm(jac, norm)
        norms.append(value)
        best_x.append(x)
        best_v.append(v)
        best_src += [label] * len(x)
    x_all, v_all, n_all = torch.cat(best_x), torch.cat(best_v), torch.cat(norms)
    top = torch.argsort(n_all, descending=True)[:max(1, opts.ascent_starts)]
    if opts.ascent_steps > 0:
        asc_x, asc_n = _ascent(f, x_all[top], norm, opts, spread, rng)
        _, _, asc_v = _operator_norm(f.jacobian(asc_x).detach(), norm)
        improved = asc_n > n_all[top]
        x_all = torch.cat([x_all, asc_x[improved]])
        v_all = torch.cat([v_all, asc_v[improved]])
        n_all = torch.cat([n_all, asc_n[improved]])
        best_src += ["ascent"] * int(improved.sum())
    candidates = torch.argsort(n_all, descending=True)[:max(1, opts.ascent_starts)]
    q = _quotients(f, x_all[candidates], v_all[candidates], norm)
    checked = torch.minimum(q, n_all[candidates]) * (1 - ROUNDING_SLACK)
    k = int(torch.argmax(checked))
    i = int(candidates[k])
    return LipschitzLowerBound(float(checked[k]), norm, best_src[i], {
        "jacobian_norm": float(n_all[i]), "quotient": float(q[k]), "points": len(n_all)})


def pairwise_lower_bound(network: Network, data: np.ndarray | None = None, *,
                         norm: Norm | str = Norm.L2, seed: int = 0,
                         options: LowerBoundOptions | None = None) -> PairwiseLowerBound:
    """Per class pair, a lower bound on the Lipschitz constant of `f_y - f_j`.

    The largest gradient norm over data and random points (L2 norm of the gradient for L2, L1
    norm for L-infinity), checked by difference quotients.
    """
    norm, opts = Norm.parse(norm), options or LowerBoundOptions()
    rng = np.random.default_rng(seed)
    f = _Function(network)
    flat, rand, _ = _points(f, data, opts, rng)
    x = f.tensor(np.concatenate([flat, rand]))
    dual = 2.0 if norm == Norm.L2 else 1.0
    k = network.num_outputs
    method = "data+random" if len(flat) else "random"
    if k < 2:
        return PairwiseLowerBound(np.zeros((k, k)), norm, method)
    best = torch.full((k, k), -1.0, dtype=x.dtype, device=x.device)
    where = torch.zeros((k, k), dtype=torch.long, device=x.device)
    size = max(1, opts.batch_size * 10 // (k * k))  # (size, K, K, n) gradient differences
    for lo in range(0, len(x), size):
        chunk = x[lo:lo + size]
        jac = f.jacobian(chunk).detach()
        grads = jac[:, :, None, :] - jac[:, None, :, :]
        values = torch.linalg.vector_norm(grads, ord=dual, dim=3)
        top, arg = values.max(dim=0)
        better = top > best
        best = torch.where(better, top, best)
        where = torch.where(better, arg + lo, where)
    # check each pair by a difference quotient of f_y - f_j at its best point
    pairs = [(a, b) for a in range(k) for b in range(k) if a != b]
    points = x[torch.tensor([int(where[a, b]) for a, b in pairs], device=x.device)]
    jac = f.jacobian(points).detach()
    rows = torch.arange(len(pairs), device=x.device)
    ya = torch.tensor([a for a, _ in pairs], device=x.device)
    yb = torch.tensor([b for _, b in pairs], device=x.device)
    grad = jac[rows, ya] - jac[rows, yb]
    coeffs = torch.zeros((len(pairs), k), dtype=x.dtype, device=x.device)
    coeffs[rows, ya], coeffs[rows, yb] = 1.0, -1.0
    q = _checked_gradient_norms(f, points, grad, norm, coeffs)
    values = np.zeros((k, k))
    for (a, b), value in zip(pairs, q.cpu().numpy(), strict=True):
        values[a, b] = value
    return PairwiseLowerBound(values, norm, method)


def row_lower_bounds(network: Network, points: np.ndarray, rows: np.ndarray, *,
                     norm: Norm | str = Norm.L2, random_points: int = 0,
                     seed: int = 0) -> np.ndarray:
    """Per row `c` of `rows` (`(r, K)`), a lower bound on the Lipschitz constant of `c . f`.

    The largest gradient norm of `c . f` over `points` and `random_points` random points
    around and between them (L2 norm for L2, L1 for L-infinity), each checked by a difference
    quotient. Cheap (one Jacobian per point): it tells which rows an upper bound cannot prove
    at a radius, before that bound is paid for. Random points matter: a ReLU net's gradient at
    a data point can be far below its gradients elsewhere.
    """
    norm = Norm.parse(norm)
    f = _Function(network)
    opts = LowerBoundOptions(max_points=len(points), random_points=random_points)
    flat, rand, _ = _points(f, points, opts, np.random.default_rng(seed))
    x = f.tensor(np.concatenate([flat, rand[:random_points]]))
    jac = f.jacobian(x).detach()  # (P, K, n)
    coeffs = torch.as_tensor(np.asarray(rows, np.float64), dtype=jac.dtype, device=jac.device)
    grads = torch.einsum("rk,pkn->prn", coeffs, jac)
    dual = 2.0 if norm == Norm.L2 else 1.0
    values = torch.linalg.vector_norm(grads, ord=dual, dim=2)  # (P, r)
    best = values.argmax(dim=0)
    index = torch.arange(len(coeffs), device=jac.device)
    return _checked_gradient_norms(f, x[best], grads[best, index], norm, coeffs).cpu().numpy()


def bilipschitz_lower_estimate(network: Network, data: np.ndarray | None = None, *,
                               norm: Norm | str = Norm.L2, seed: int = 0,
                               options: LowerBoundOptions | None = None
                               ) -> InverseLipschitzEstimate:
    """The smallest `||f(x) - f(x')|| / ||x - x'||` found: a lower bi-Lipschitz estimate.

    Searches data pairs, steps along the Jacobian's least-stretched direction, and descent on the
    ratio (counterexamples to distance preservation); the pair itself comes from
    `lipverify.lower_lipschitz_search.search_lower_counterexample`.
    """
    from lipverify.lower_lipschitz_search import search_lower_counterexample

    found = search_lower_counterexample(network, data=data, norm=norm, seed=seed, options=options)
    return InverseLipschitzEstimate(found.ratio, found.norm, found.method)
