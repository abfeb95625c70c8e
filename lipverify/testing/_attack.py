"""A small batched PGD falsifier, independent of lipverify's backends, for the conformance kit.

It searches regions (L2 or L-infinity balls, or boxes), one per input, for inputs that violate
each input's `Property`, minimising the property's margin (positive when safe) with projected
steps from several random starts, all inputs and starts in one batch. A point counts only once
the network's float32 forward pass confirms the violation, so everything returned is a real
counterexample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lipverify.network.network import Network
from lipverify.types import Norm, Perturbation, Property

PGD_STEPS = 20
PGD_RESTARTS = 3
PGD_STEP_FACTOR = 2.5  # total path length of the steps, in radii
# Search of the smallest radius with a counterexample: doubling, then shrinking rounds.
SEARCH_MAX_DOUBLINGS = 12
SEARCH_BISECTIONS = 5
LINE_POINTS = 64
MIN_SEARCH_EPS = 1e-3


@dataclass(frozen=True)
class Regions:
    """One region per input: a `norm` ball of radius `eps[i]` around `centres[i]`, or a box."""

    centres: np.ndarray
    norm: Norm
    eps: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None

    @classmethod
    def of(cls, perturbation: Perturbation, inputs: np.ndarray) -> Regions:
        """The regions of a problem's inputs."""
        n = len(inputs)
        if perturbation.is_box:
            lo = np.asarray(perturbation.lower, np.float64)
            hi = np.asarray(perturbation.upper, np.float64)
            half = (hi - lo).reshape(n, -1) / 2
            return cls((lo + hi) / 2, Norm.LINF, half.max(axis=1), lo, hi)
        return cls(np.asarray(inputs, np.float64), perturbation.norm,
                   np.full(n, float(perturbation.eps)))

    @property
    def is_box(self) -> bool:
        """True for boxes."""
        return self.lower is not None

    def subset(self, index: Sequence[int]) -> Regions:
        """The regions of some inputs."""
        idx = np.asarray(index, np.int64)
        if self.is_box:
            return Regions(self.centres[idx], self.norm, self.eps[idx], self.lower[idx],
                           self.upper[idx])
        return Regions(self.centres[idx], self.norm, self.eps[idx])

    def balls(self, eps: np.ndarray) -> Regions:
        """Balls around the same centres with radii `eps`."""
        return Regions(self.centres, self.norm, np.asarray(eps, np.float64))

    def _b(self, t: np.ndarray, dims: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return t.reshape(t.shape + (1,) * (dims - t.dim()))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The closest point of each region, for `x` shaped `(N, R, *input_shape)`."""
        c = torch.as_tensor(self.centres, dtype=torch.float64).unsqueeze(1)
        if self.is_box:
            lo = torch.as_tensor(self.lower, dtype=torch.float64).unsqueeze(1)
            hi = torch.as_tensor(self.upper, dtype=torch.float64).unsqueeze(1)
            return torch.maximum(torch.minimum(x, hi), lo)
        eps = self._b(self.eps, x.dim())
        d = x - c
        if self.norm == Norm.LINF:
            return c + torch.maximum(torch.minimum(d, eps), -eps)
        n = d.flatten(2).norm(dim=2).clamp_min(1e-30)
        factor = torch.clamp(eps.flatten(1) / n, max=1.0)
        return c + d * factor.reshape(factor.shape + (1,) * (x.dim() - 2))

    def sample(self, restarts: int, gen: torch.Generator) -> torch.Tensor:
        """`restarts` random points per region (the centre first), `(N, R, *input_shape)`."""
        shape = (len(self.centres), restarts, *self.centres.shape[1:])
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        c = torch.as_tensor(self.centres, dtype=torch.float64).unsqueeze(1)
        if self.is_box:
            lo = torch.as_tensor(self.lower, dtype=torch.float64).unsqueeze(1)
            hi = torch.as_tensor(self.upper, dtype=torch.float64).unsqueeze(1)
            pts = lo + (hi - lo) * u
        else:
            pts = c + self._b(self.eps, len(shape)) * (2 * u - 1)
        pts[:, 0] = c[:, 0]
        return self.project(pts)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Distance of `points[i]` from `centres[i]` in the region's norm."""
        d = (np.asarray(points, np.float64) - self.centres).reshape(len(self.centres), -1)
        return np.linalg.norm(d, 2 if self.norm == Norm.L2 else math.inf, axis=1)

    def contains(self, points: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
        """Whether `points[i]` lies in region `i`, up to a relative tolerance."""
        p = np.asarray(points, np.float64).reshape(self.centres.shape)
        n = len(p)
        slack = rtol * (1.0 + np.abs(self.centres).reshape(n, -1).max(axis=1))
        if self.is_box:
            lo = (p - self.lower).reshape(n, -1).min(axis=1)
            hi = (self.upper - p).reshape(n, -1).min(axis=1)
            return (lo >= -slack) & (hi >= -slack)
        return self.distance(p) <= self.eps * (1 + rtol) + slack


def torch_margins(prop: Property, y: torch.Tensor) -> torch.Tensor:
    """`Property.margin` of each row of `y` `(R, K)`, differentiable."""
    terms = []
    for c, d in prop.terms:
        ct = torch.as_tensor(c, dtype=y.dtype)
        dt = torch.as_tensor(d, dtype=y.dtype)
        terms.append((y @ ct.T - dt).max(dim=1).values)
    return torch.stack(terms, dim=1).min(dim=1).values


class _Margins:
    """Margins of each input's property for outputs `(N, R, K)`; vectorised for robustness."""

    def __init__(self, props: Sequence[Property]) -> None:
        self.props = props
        labels = [p.label for p in props]
        self.labels = None if any(t is None for t in labels) else torch.as_tensor(labels)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return torch.stack([torch_margins(p, out[i]) for i, p in enumerate(self.props)])
        idx = self.labels.view(-1, 1, 1).expand(out.shape[0], out.shape[1], 1)
        own = out.gather(2, idx).squeeze(2)
        others = out.scatter(2, idx, -torch.inf).max(dim=2).values
        return own - others

    def record(self, margins: np.ndarray, out: np.ndarray, points: np.ndarray,
               found: list) -> None:
        """Store in `found` the first point per input that a forward pass shows violating."""
        for i, r in zip(*np.nonzero(margins <= 0), strict=True):
            if found[i] is None and self.props[i].violated(out[i, r]):
                found[i] = points[i, r].copy()


def _forward(network: Network, x: torch.Tensor) -> torch.Tensor:
    """The float32 module on `(N, R, *shape)` points; outputs `(N, R, K)` in float64."""
    n, r = x.shape[:2]
    flat = x.reshape((n * r, *network.input_shape)).to(torch.float32).to(network.device)
    return network.module(flat).reshape(n, r, -1).double().cpu()


def pgd(network: Network, props: Sequence[Property], regions: Regions, seed: int = 0,
        steps: int = PGD_STEPS, restarts: int = PGD_RESTARTS) -> list[np.ndarray | None]:
    """Per input, a point of its region where the network violates its property, or None."""
    n = len(props)
    found: list[np.ndarray | None] = [None] * n
    if n == 0:
        return found
    margins = _Margins(props)
    gen = torch.Generator().manual_seed(seed)
    x = regions.sample(restarts, gen)
    if regions.is_box:
        step = torch.as_tensor((regions.upper - regions.lower) / 2).unsqueeze(1)
    else:
        step = regions._b(regions.eps, x.dim())
    step = step * PGD_STEP_FACTOR / steps
    for _ in range(steps + 1):
        # The float32 points the module sees are the candidates (checked by their own outputs).
        x = x.to(torch.float32).to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            out = _forward(network, x)
            m = margins(out)
            (grad,) = torch.autograd.grad(m.sum(), x)
        margins.record(m.detach().numpy(), out.detach().numpy(), x.detach().numpy(), found)
        if all(f is not None for f in found):
            break
        if regions.norm == Norm.LINF:
            direction = grad.sign()
        else:
            norms = grad.flatten(2).norm(dim=2).clamp_min(1e-30)
            direction = grad / norms.reshape(norms.shape + (1,) * (grad.dim() - 2))
        x = regions.project(x.detach() - step * direction)
    return found


def first_order_distance(network: Network, props: Sequence[Property],
                         centres: np.ndarray, norm: Norm) -> np.ndarray:
    """`margin / ||grad margin||_dual` at each centre: a first-order guess of the distance."""
    x = torch.as_tensor(np.asarray(centres, np.float64)).unsqueeze(1)
    x = x.to(torch.float32).to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        m = _Margins(props)(_forward(network, x))
        (grad,) = torch.autograd.grad(m.sum(), x)
    dual = grad.flatten(1).norm(p=2 if norm == Norm.L2 else 1, dim=1).clamp_min(1e-30)
    return (m.detach().flatten() / dual).clamp_min(0.0).numpy()


def _closest_on_segments(network: Network, props: Sequence[Property], regions: Regions,
                         points: list[np.ndarray]) -> list[np.ndarray]:
    """The violating point closest to the centre on each segment centre -> point."""
    t = torch.linspace(0.0, 1.0, LINE_POINTS + 1, dtype=torch.float64)[1:]
    c = torch.as_tensor(regions.centres).unsqueeze(1)
    p = torch.as_tensor(np.stack(points)).unsqueeze(1)
    tt = t.reshape((1, -1) + (1,) * (c.dim() - 2))
    line = (c + tt * (p - c)).to(torch.float32).to(torch.float64)
    with torch.no_grad():
        out = _forward(network, line).numpy()
    found: list[np.ndarray | None] = [None] * len(props)
    margins = _Margins(props)
    margins.record(margins(torch.as_tensor(out)).numpy(), out, line.numpy(), found)
    return [f if f is not None else q for f, q in zip(found, points, strict=True)]


def nearest_counterexamples(network: Network, props: Sequence[Property], regions: Regions,
                            seed: int = 0) -> list[np.ndarray | None]:
    """Per input, a counterexample close to its centre (any radius), or None.

    The attack runs on balls of doubling radii, from half the first-order distance (margin over
    the dual norm of its gradient at the centre), until it succeeds; then a
    bisection between the last radius without and the distance of the best counterexample with
    one, each counterexample pulled towards the centre along its segment.
    """
    n = len(props)
    best: list[np.ndarray | None] = [None] * n
    guess = first_order_distance(network, props, regions.centres, regions.norm)
    balls = regions.balls(np.maximum(guess / 2, MIN_SEARCH_EPS))
    eps = balls.eps.copy()
    lo = np.zeros(n)
    for _ in range(SEARCH_MAX_DOUBLINGS):
        todo = [i for i in range(n) if best[i] is None]
        if not todo:
            break
        got = pgd(network, [props[i] for i in todo], balls.subset(todo).balls(eps[todo]), seed)
        for i, g in zip(todo, got, strict=True):
            best[i] = g
            if g is None:
                lo[i] = eps[i]
        eps[todo] *= 2.0
    done = [i for i in range(n) if best[i] is not None]
    if not done:
        return best
    sub = balls.subset(done)
    dprops = [props[i] for i in done]
    points = _closest_on_segments(network, dprops, sub, [best[i] for i in done])
    hi = sub.distance(np.stack(points))
    low = np.minimum(lo[done], hi)
    for _ in range(SEARCH_BISECTIONS):
        mid = (low + hi) / 2
        got = pgd(network, dprops, sub.balls(mid), seed)
        for k, g in enumerate(got):
            if g is None:
                low[k] = mid[k]
                continue
            pulled = _closest_on_segments(network, [dprops[k]], sub.subset([k]), [g])[0]
            dist = sub.subset([k]).distance(pulled[None])[0]
            if dist < hi[k]:
                points[k], hi[k] = pulled, dist
    for k, i in enumerate(done):
        best[i] = points[k]
    return best
