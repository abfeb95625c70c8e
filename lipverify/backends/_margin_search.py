"""Property rows as matrices, per-input regions, radius search and memory-aware batching.

Shared by the bound-propagation backends (`lirpa`, `alpha-crown`, `local`): each computes lower
bounds on the rows `C y - d` of every property term over a region, and these helpers turn them
into one margin per input and, by bisection on the radius, into certified radii.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lipverify.errors import InputError, ResourceError
from lipverify.margins import forward_error
from lipverify.network.rounding import SoundOutputs, gamma, sound_outputs
from lipverify.types import (
    Certificate,
    Norm,
    Perturbation,
    Problem,
    Property,
    Status,
    deadline_passed,
)

if TYPE_CHECKING:
    from lipverify.network.network import Network

# Radius search: how far the first probe may be halved or doubled before giving up.
MAX_HALVINGS = 20
MAX_DOUBLINGS = 16
# First probe when the problem's eps is 0 (pure radius search).
DEFAULT_FIRST_RADIUS = 0.05
# Bound propagation over a region does more arithmetic than one forward pass at its centre:
# its rounding allowance is this multiple of the centre outputs' proven error.
BOUND_ROUNDING_FACTOR = 1000.0
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")
log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Spec:
    """The property rows of a batch laid out for bound propagation.

    Row `t * rows + r` of input `b` is row `r` of term `t`: `c[b]` has shape `(B, T * R, K)` and
    `d` shape `(B, T * R)`. `fill` is NaN on real rows, -inf on padding rows of a real term (they
    never refute it) and +inf on rows of missing terms (nothing to refute).
    """

    c: np.ndarray
    d: np.ndarray
    fill: np.ndarray
    terms: int
    rows: int

    @classmethod
    def build(cls, properties: Sequence[Property], num_outputs: int) -> Spec:
        """Stack the properties of a batch (robustness properties take a vectorised path)."""
        n = len(properties)
        labels = [p.label for p in properties]
        if n and all(lab is not None for lab in labels) and all(
                len(p.terms) == num_outputs - 1 for p in properties):
            lab = np.asarray(labels)
            table = np.array([[j for j in range(num_outputs) if j != t]
                              for t in range(num_outputs)], dtype=np.int64)
            others = table[lab].reshape(n, num_outputs - 1)
            c = np.zeros((n, num_outputs - 1, num_outputs))
            c[np.arange(n)[:, None], np.arange(num_outputs - 1)[None, :], lab[:, None]] = 1.0
            np.put_along_axis(c, others[:, :, None], -1.0, axis=2)
            zeros = np.zeros((n, num_outputs - 1))
            return cls(c, zeros, np.full_like(zeros, np.nan), num_outputs - 1, 1)
        terms = max((len(p.terms) for p in properties), default=0)
        rows = max((len(cm) for p in properties for cm, _ in p.terms), default=0)
        c = np.zeros((n, terms * rows, num_outputs))
        d = np.zeros((n, terms * rows))
        fill = np.full((n, terms * rows), np.inf)
        for b, prop in enumerate(properties):
            if prop.num_outputs != num_outputs:
                raise InputError(f"property for {prop.num_outputs} outputs on a network with "
                                 f"{num_outputs}")
            for t, (cm, dv) in enumerate(prop.terms):
                base = t * rows
                fill[b, base:base + rows] = -np.inf
                c[b, base:base + len(cm)] = cm
                d[b, base:base + len(cm)] = dv
                fill[b, base:base + len(cm)] = np.nan
        return cls(c, d, fill, terms, rows)

    def __len__(self) -> int:
        return len(self.c)

    def subset(self, index: np.ndarray) -> Spec:
        """The rows of the inputs in `index`."""
        return Spec(self.c[index], self.d[index], self.fill[index], self.terms, self.rows)

    def combine(self, row_lower: np.ndarray) -> np.ndarray:
        """Per input, `min` over terms of `max` over rows of lower bounds of `C y - d`.

        `row_lower` (shape `(B, T * R)`) already has `d` subtracted. Positive means every term
        is refuted (the property holds).
        """
        if self.terms * self.rows == 0:
            return np.full(len(self), np.inf)
        vals = np.where(np.isnan(self.fill), row_lower, self.fill)
        return vals.reshape(len(self), self.terms, self.rows).max(axis=2).min(axis=1)

    def row_values(self, outputs: np.ndarray) -> np.ndarray:
        """`C y - d` of each row at outputs `y` (shape `(B, T * R)`)."""
        return np.einsum("bsk,bk->bs", self.c, outputs) - self.d

    def slack(self, outputs: SoundOutputs) -> np.ndarray:
        """Per input, an allowance for rounding in any row value near the centre outputs.

        It covers the proven error of the centre outputs (and of `C y - d` in float64), and for
        the bounds auto_LiRPA computes in float64 over the region, whose rounding grows with the
        same activation magnitudes, `BOUND_ROUNDING_FACTOR` times that error plus
        `forward_error`'s allowance relative to the outputs.
        """
        if not self.c.size:
            return np.zeros(len(self))
        values = outputs.values
        rounding = gamma(values.shape[1] + 1)
        centre = np.einsum("bsk,bk->bs", np.abs(self.c),
                           outputs.error + rounding * np.abs(values))
        centre = centre + rounding * np.abs(self.d)
        row_l1 = np.abs(self.c).sum(axis=2).max(axis=1)
        return BOUND_ROUNDING_FACTOR * centre.max(axis=1) + forward_error(values) * row_l1


def centre_violated(network: object, spec: Spec, centres: np.ndarray) -> np.ndarray:
    """Per input, whether the module's forward pass at the centre violates the property."""
    return spec.combine(spec.row_values(network.forward(centres))) < 0


@dataclass(frozen=True, eq=False)
class CentreFacts:
    """What a margin search knows before bounding: each input's region, the property's rows,
    their sound slack at the centre, the rows' computed values there (`values`, and the
    property's value `centre`), and whether the centre itself violates the property."""

    region: Region
    spec: Spec
    slack: np.ndarray
    values: np.ndarray
    centre: np.ndarray
    violated: np.ndarray

    @classmethod
    def of(cls, network: Network, problem: Problem) -> CentreFacts:
        region = Region.of(problem.perturbation, problem.inputs)
        outputs = sound_outputs(network, region.centres)
        spec = Spec.build(problem.properties, network.num_outputs)
        values = spec.row_values(outputs.values)
        return cls(region, spec, spec.slack(outputs), values, spec.combine(values),
                   centre_violated(network, spec, region.centres))


@dataclass(frozen=True, eq=False)
class Region:
    """Per-input perturbation regions: balls with per-input radii, or boxes.

    `centres` has the batch's shape; for balls `eps` has shape `(B,)`; for boxes `lower` and
    `upper` have the batch's shape and `eps` holds each box's largest half-width. `per_input`
    marks radii set one per input (a radius search): bound them the same way whatever the batch,
    even when they happen to be equal.
    """

    centres: np.ndarray
    norm: Norm
    eps: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    per_input: bool = False

    @classmethod
    def of(cls, perturbation: Perturbation, inputs: np.ndarray) -> Region:
        """The regions a problem's perturbation defines around its inputs."""
        inputs = np.asarray(inputs)
        if perturbation.is_box:
            lower = np.asarray(perturbation.lower, dtype=np.float64)
            upper = np.asarray(perturbation.upper, dtype=np.float64)
            half = ((upper - lower) / 2).reshape(len(lower), -1)
            eps = half.max(axis=1) if half.size else np.zeros(len(lower))
            return cls((lower + upper) / 2, Norm.LINF, eps, lower, upper)
        eps = np.full(len(inputs), float(perturbation.eps))
        return cls(inputs.astype(np.float64), perturbation.norm, eps)

    @property
    def is_box(self) -> bool:
        """True for boxes."""
        return self.lower is not None

    def __len__(self) -> int:
        return len(self.centres)

    def subset(self, index: np.ndarray) -> Region:
        """The regions of the inputs in `index`."""
        if self.is_box:
            return Region(self.centres[index], self.norm, self.eps[index], self.lower[index],
                          self.upper[index])
        return Region(self.centres[index], self.norm, self.eps[index], per_input=self.per_input)

    def with_eps(self, eps: np.ndarray) -> Region:
        """Balls of radii `eps` (one per input) around the same centres."""
        if self.is_box:
            raise InputError("a box has no radius to change")
        return Region(self.centres, self.norm, np.asarray(eps, dtype=np.float64), per_input=True)

    @property
    def uniform(self) -> bool:
        """True for balls of one radius not set per input."""
        return not self.is_box and not self.per_input and (
            len(self.eps) == 0 or bool(np.all(self.eps == self.eps[0])))


def bisect_radius(margins_at: Callable[[np.ndarray, np.ndarray], np.ndarray], first: np.ndarray,
                  rel_tol: float, known: np.ndarray | None = None,
                  deadline: float | None = None,
                  growth: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Largest radius each input is certified at, by a search run on all inputs at once.

    Each step calls `margins_at(index, radii)` once for every input still searching (lower
    bounds on the margin over the ball of radius `radii[i]` around input `index[i]`); positive
    means certified. The first probe of input `i` is `first[i]`; after it the radius grows by
    `1 + growth` (the growth doubling each time) while certified and halves while not, then
    bisects until `hi - lo <= rel_tol * hi`. The
    result is the largest probed radius that was certified, so it is sound whatever the shape of
    the margin as a function of the radius. Inputs with `first <= 0` are not searched.

    Args:
        margins_at: The bound computation.
        first: The first radius to probe, per input.
        rel_tol: Relative width of the final bracket.
        known: Radii already certified (by another bound), per input; the search starts there.
        deadline: A `time.monotonic()` instant after which the search stops early.
        growth: First relative step up from a certified radius (1: doubling); small when the
            radius is known to be close (starting from a looser method's radius).

    Returns:
        The certified radii and the margin bounds at the first probe (NaN where not probed).
    """
    if not rel_tol > 0:
        raise InputError(f"the radius tolerance must be positive, got {rel_tol}")
    n = len(first)
    first = np.asarray(first, dtype=np.float64)
    lo = np.zeros(n) if known is None else np.maximum(np.asarray(known, np.float64), 0.0)
    hi = np.full(n, np.inf)
    probed = first <= 0
    first_margin = np.full(n, np.nan)
    steps = np.full(n, float(growth))
    floor = first * 2.0 ** -MAX_HALVINGS
    cap = first * 2.0 ** MAX_DOUBLINGS
    for _ in range(MAX_HALVINGS + MAX_DOUBLINGS + 64):
        bracketed = (hi < np.inf) & (lo > 0) & (hi - lo <= rel_tol * hi)
        hopeless = (lo == 0) & (hi <= floor)
        unbounded = (hi == np.inf) & (lo >= cap)
        active = ~(bracketed | hopeless | unbounded) & (first > 0)
        if not active.any() or deadline_passed(deadline):
            break
        up = np.where(lo > 0, lo * (1 + steps), first)
        probe = np.where(hi == np.inf, up, np.where(lo == 0, hi / 2, (lo + hi) / 2))
        probe = np.where(probed, probe, first)
        index = np.flatnonzero(active)
        margins = np.asarray(margins_at(index, probe[index]), dtype=np.float64)
        fresh = ~probed[index]
        first_margin[index[fresh]] = margins[fresh]
        probed[index] = True
        ok = margins > 0
        rising = ok & (hi[index] == np.inf) & ~fresh
        steps[index[rising]] *= 2
        lo[index[ok]] = np.maximum(lo[index[ok]], probe[index[ok]])
        hi[index[~ok]] = np.minimum(hi[index[~ok]], probe[index[~ok]])
    return lo, first_margin


def deadline_of(problem: Problem, timeout: float | None) -> float | None:
    """The earlier of the problem's deadline and `timeout` seconds from now (`time.monotonic()`)."""
    ends = [d for d in (problem.deadline, time.monotonic() + timeout if timeout else None)
            if d is not None]
    return min(ends) if ends else None


def first_radius(eps: float, count: int) -> np.ndarray:
    """The first probe of a radius search: the problem's eps, or a default when it is 0."""
    value = eps if eps > 0 and math.isfinite(eps) else DEFAULT_FIRST_RADIUS
    return np.full(count, float(value))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def run_in_chunks(fn: Callable[[np.ndarray], np.ndarray], count: int, chunk: int,
                  device: torch.device | None = None) -> np.ndarray:
    """`fn` on consecutive index chunks of at most `chunk`, halving a chunk that runs out of memory.

    Raises:
        ResourceError: a single input does not fit.
    """
    parts = []
    start = 0
    chunk = max(1, int(chunk))
    while start < count:
        index = np.arange(start, min(start + chunk, count))
        try:
            parts.append(fn(index))
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            if device is not None and device.type == "cuda":
                torch.cuda.empty_cache()
            if chunk == 1:
                raise ResourceError(f"one input does not fit in memory: {exc}") from exc
            chunk = max(1, chunk // 2)
            log.info("out of memory: retrying with chunks of %d", chunk)
            continue
        start += len(index)
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(frozen=True, eq=False)
class Outcomes:
    """Per-input results of a bound backend, before they become certificates.

    `margin` is a lower bound on the margin at the problem's eps (NaN where not computed),
    `radius` the certified radius, `verified` the status at eps, and `timed_out` whether the
    deadline cut the search short. `confirmed` marks inputs whose centre the module's own
    (float32) forward pass shows violating the property (`centre_violated`); only those can be
    falsified.
    """

    centre: np.ndarray
    slack: np.ndarray
    margin: np.ndarray
    radius: np.ndarray
    verified: np.ndarray
    timed_out: bool = False
    confirmed: np.ndarray | None = None

    def certificates(self, backend: str, centres: np.ndarray, seconds: float,
                     details: dict | None = None) -> list[Certificate]:
        """Verified, unknown or timeout; falsified (the centre itself) when the centre violates
        the property beyond rounding and a forward pass of the module confirms it."""
        out = []
        for i in range(len(self.centre)):
            info = {**(details or {}), "centre_margin": float(self.centre[i])}
            if self.centre[i] < -self.slack[i] and self.confirmed is not None and \
                    self.confirmed[i]:
                point = tuple(float(v) for v in np.ravel(centres[i]))
                out.append(Certificate(Status.FALSIFIED, backend, 0.0, float(self.margin[i]),
                                       seconds, point,
                                       {**info, "reason": "the centre violates the property"}))
                continue
            status = Status.VERIFIED if self.verified[i] else \
                Status.TIMEOUT if self.timed_out else Status.UNKNOWN
            out.append(Certificate(status, backend, float(self.radius[i]), float(self.margin[i]),
                                   seconds, details=info))
        return out
