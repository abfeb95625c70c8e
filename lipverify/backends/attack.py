"""PGD falsifier: projected gradient descent on the property margin, with random restarts.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards deep learning models resistant to adversarial
attacks", ICLR 2018 (https://arxiv.org/abs/1706.06083).

Searches each input's region (an L2 or L-infinity ball, or a box) for a point where the property
is violated, minimising the property margin (per term: the largest row of `C y - d`; overall:
the smallest term). Restart 0 starts at the centre and attacks the overall margin; the others
start at random points, moved along a random direction of the outputs first (output-diversified
initialisation: Tashiro, Song, Ermon, NeurIPS 2020, https://arxiv.org/abs/2003.06878, which
escapes the flat regions around some centres), and attack one term each, the terms closest to
violation first. A counterexample is reported only after it is rounded to float32 inside the region and a float32
and a float64 forward pass of the original module both confirm the violation; otherwise the
answer is `unknown`. It never verifies anything.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from lipverify.backends.base import BackendBase, BackendOptions
from lipverify.network.network import Network
from lipverify.types import Certificate, Norm, Problem, Property, Status

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50
DEFAULT_RESTARTS = 10  # the centre, then one random start per term of a 10-class robustness
DEFAULT_STEP_SIZE = 0.25
DEFAULT_BATCH = 128
DEFAULT_ODS_STEPS = 5
# The step size decays (cosine) from step_size to this fraction of it.
FINAL_STEP_FRACTION = 0.05
# Tries at pulling a float32-rounded point back inside an L2 ball.
ROUNDING_TRIES = 8


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class AttackOptions(BackendOptions):
    """Options of the `attack` backend.

    Attributes:
        steps: Gradient steps per restart.
        restarts: Starts per input (the first at the centre, the others random).
        step_size: First step as a fraction of the radius (box: of each half-width).
        batch_size: Inputs attacked together (times `restarts` forward passes per step).
        ods_steps: Steps that move each random start along a random direction of the outputs
            before the descent (output-diversified initialisation, Tashiro et al., NeurIPS 2020).

    """

    steps: int = _help(DEFAULT_STEPS, "Gradient steps per restart.")
    restarts: int = _help(DEFAULT_RESTARTS, "Starts per input (the first at the centre).")
    step_size: float = _help(DEFAULT_STEP_SIZE, "First step as a fraction of the radius.")
    batch_size: int = _help(DEFAULT_BATCH, "Inputs attacked together.")
    ods_steps: int = _help(DEFAULT_ODS_STEPS, "Output-diversification steps of random starts.")


@dataclass(frozen=True, eq=False)
class Regions:
    """The regions of a chunk of inputs, flattened, float64 on the CPU."""

    centre: np.ndarray          # (n, d)
    norm: Norm
    eps: float
    lower: np.ndarray | None    # (n, d) for boxes and L-infinity balls
    upper: np.ndarray | None

    def half_width(self) -> np.ndarray:
        """Per-coordinate half-width (boxes, L-infinity) or the radius (L2)."""
        if self.lower is None:
            return np.full(self.centre.shape, self.eps)
        return (self.upper - self.lower) / 2

    def distance(self, x: np.ndarray, i: int) -> float:
        """Distance of `x` from centre `i` in the region's norm."""
        return float(np.linalg.norm(x - self.centre[i], 2 if self.norm == Norm.L2 else math.inf))

    def contains(self, x: np.ndarray, i: int) -> bool:
        """Exact membership (float64 arithmetic on the float32 point)."""
        if self.lower is not None:
            return bool(np.all(x >= self.lower[i]) and np.all(x <= self.upper[i]))
        return float(np.linalg.norm(x - self.centre[i])) <= self.eps

    def to_float32(self, x: np.ndarray, i: int) -> np.ndarray | None:
        """A float32 point of region `i` near `x`, or None when rounding cannot stay inside."""
        if self.lower is not None:
            lo, hi = self.lower[i], self.upper[i]
            p = np.clip(x, lo, hi).astype(np.float32)
            p = np.where(p < lo, np.nextafter(p, np.float32(np.inf)), p)
            p = np.where(p > hi, np.nextafter(p, np.float32(-np.inf)), p).astype(np.float32)
            return p if self.contains(p.astype(np.float64), i) else None
        delta = x - self.centre[i]
        length = float(np.linalg.norm(delta))
        if length > self.eps:
            delta = delta * (self.eps / length)
        for _ in range(ROUNDING_TRIES):
            p = (self.centre[i] + delta).astype(np.float32)
            if self.contains(p.astype(np.float64), i):
                return p
            delta = delta * (1 - 1e-6)
        return None


def regions_of(problem: Problem, index: np.ndarray, inputs: np.ndarray) -> Regions:
    """The regions of inputs `index` (`inputs`: their flattened centres)."""
    pert = problem.perturbation
    if pert.is_box:
        lo = pert.lower[index].reshape(len(index), -1).astype(np.float64)
        hi = pert.upper[index].reshape(len(index), -1).astype(np.float64)
        return Regions((lo + hi) / 2, Norm.LINF, pert.eps, lo, hi)
    centre = inputs.astype(np.float64)
    if pert.norm == Norm.LINF:
        return Regions(centre, Norm.LINF, pert.eps, centre - pert.eps, centre + pert.eps)
    return Regions(centre, Norm.L2, pert.eps, None, None)


def _padded_terms(props: list[Property], k: int) -> tuple[np.ndarray, np.ndarray]:
    """`C` (n, T, R, K) and `d` (n, T, R), padded with copies (which leave min/max unchanged).

    A property without terms gets `0 y <= -1`, which never holds.
    """
    t_max = max([1] + [len(p.terms) for p in props])
    r_max = max([1] + [c.shape[0] for p in props for c, _ in p.terms])
    cs = np.zeros((len(props), t_max, r_max, k))
    ds = np.full((len(props), t_max, r_max), -1.0)
    for i, prop in enumerate(props):
        for t in range(t_max if prop.terms else 0):
            c, d = prop.terms[t] if t < len(prop.terms) else prop.terms[0]
            rows = np.arange(r_max) % c.shape[0]  # repeat rows cyclically
            cs[i, t], ds[i, t] = c[rows], d[rows]
    return cs, ds


def _term_margins(y: torch.Tensor, cs: torch.Tensor,
                  ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and term: the largest row of `C y - d` (violated when <= 0), and what to descend.

    The descent minimises that plus the positive parts of all rows, so every row still above
    zero pulls (the largest row alone zig-zags between rows at a conjunction's corner).
    """
    m, t, r, k = cs.shape
    rows = torch.bmm(cs.reshape(m, t * r, k), y[:, :, None]).reshape(m, t, r) - ds
    hard = rows.amax(dim=2)
    return hard, hard + torch.relu(rows).sum(dim=2) if r > 1 else hard


class AttackBackend(BackendBase):
    """Projected gradient descent with random restarts, for any linear property.

    Madry et al., ICLR 2018 (https://arxiv.org/abs/1706.06083). Proves nothing: it answers
    `falsified` with a counterexample confirmed by float32 and float64 forward passes of the
    original module (and inside the region after rounding to float32), else `unknown`. Cost: a
    few hundred forward and backward passes per input. Seeded and deterministic.

    Args:
        options: `AttackOptions`.

    Example:
        >>> from lipverify.models import INPUT_SHAPE, load_shipped
        >>> from lipverify.network.load import load_network
        >>> from lipverify.types import Perturbation, Problem
        >>> from lipverify.data import digits_split
        >>> net = load_network(load_shipped("digits_mlp"), INPUT_SHAPE)
        >>> _, _, x, y = digits_split()
        >>> problem = Problem.robustness(x[:4], y[:4], 10, Perturbation.ball("inf", 0.5))
        >>> [c.status.value for c in AttackBackend().certify(net, problem)]
        ['falsified', 'falsified', 'falsified', 'falsified']

    """

    name: ClassVar[str] = "attack"
    cost: ClassVar[int] = 0
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    sound: ClassVar[bool] = True
    Options: ClassVar[type] = AttackOptions

    def __init__(self, options: AttackOptions | None = None) -> None:
        super().__init__(options)

    def supports(self, network: Network, problem: Problem) -> str | None:
        """None, or why not: the norm, or properties over another number of outputs."""
        why = super().supports(network, problem)
        if why:
            return why
        sizes = {p.num_outputs for p in problem.properties}
        if sizes - {network.num_outputs}:
            return f"properties over {sorted(sizes)} outputs, network has {network.num_outputs}"
        return None

    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """One certificate per input: falsified (checked counterexample) or unknown."""
        opts: AttackOptions = self.options
        start = time.perf_counter()
        stop_at = math.inf if opts.timeout is None else start + opts.timeout
        try:
            double = copy.deepcopy(network.module).double().eval()
        except Exception as exc:  # noqa: BLE001 - a module that cannot run in float64
            log.warning("attack: no float64 copy of the module (%s)", exc)
            double = None
        flat = np.asarray(problem.inputs, np.float64).reshape(len(problem), -1)
        certs: list[Certificate] = []
        for lo in range(0, len(problem), max(1, opts.batch_size)):
            index = np.arange(lo, min(lo + opts.batch_size, len(problem)))
            if problem.expired() or time.perf_counter() > stop_at:
                certs.extend(Certificate(Status.TIMEOUT, self.name, details={
                    "reason": "deadline before the attack started"}) for _ in index)
                continue
            chunk_start = time.perf_counter()
            regions = regions_of(problem, index, flat[index])
            found = self._attack_chunk(network, problem, index, regions, stop_at)
            seconds = (time.perf_counter() - chunk_start) / len(index)
            for j, i in enumerate(index):
                x, best = found[j]
                certs.append(self._answer(network, double, problem.properties[i], regions, j,
                                          x, best, seconds))
        return certs

    # -- the search ----------------------------------------------------------------------------
    def _starts(self, regions: Regions, restarts: int,
                outputs: int) -> tuple[np.ndarray, np.ndarray]:
        """Starting points (n, restarts, d) and output weights (n, restarts, K).

        The centre, then seeded random points; the weights (zero for the centre) are the random
        output directions of the diversification.
        """
        n, d = regions.centre.shape
        out = np.repeat(regions.centre[:, None, :], restarts, axis=1)
        weights = np.zeros((n, restarts, outputs))
        for i in range(n):  # seeded per input content: independent of batch composition
            key = zlib.crc32(np.ascontiguousarray(regions.centre[i]).tobytes())
            rng = np.random.default_rng([self.options.seed, key])
            if regions.lower is not None:
                out[i, 1:] = rng.uniform(regions.lower[i], regions.upper[i],
                                         size=(restarts - 1, d))
            else:
                g = rng.standard_normal((restarts - 1, d))
                g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
                r = regions.eps * rng.random((restarts - 1, 1)) ** (1.0 / d)
                out[i, 1:] = regions.centre[i] + g * r
            weights[i, 1:] = rng.uniform(-1, 1, size=(restarts - 1, outputs))
        return out, weights

    def _attack_chunk(self, network: Network, problem: Problem, index: np.ndarray,
                      regions: Regions, stop_at: float) -> list[tuple[np.ndarray, float]]:
        """Per input the lowest-margin point found (float64 array) and its float32 margin."""
        opts: AttackOptions = self.options
        dev = network.device
        props = [problem.properties[i] for i in index]
        n, d = regions.centre.shape
        restarts = max(1, opts.restarts)
        cs_np, ds_np = _padded_terms(props, network.num_outputs)
        m = n * restarts
        owner = np.repeat(np.arange(n), restarts)
        cs = torch.as_tensor(cs_np[owner], dtype=torch.float32, device=dev)
        ds = torch.as_tensor(ds_np[owner], dtype=torch.float32, device=dev)
        centre = torch.as_tensor(regions.centre[owner], dtype=torch.float32, device=dev)
        half = torch.as_tensor(regions.half_width()[owner], dtype=torch.float32, device=dev)
        lower = upper = None
        if regions.lower is not None:
            lower = torch.as_tensor(regions.lower[owner], dtype=torch.float32, device=dev)
            upper = torch.as_tensor(regions.upper[owner], dtype=torch.float32, device=dev)
        starts, weights = self._starts(regions, restarts, network.num_outputs)
        x = torch.as_tensor(starts.reshape(m, d), dtype=torch.float32, device=dev)
        weights = torch.as_tensor(weights.reshape(m, -1), dtype=torch.float32, device=dev)

        def project(z: torch.Tensor) -> torch.Tensor:
            if lower is not None:
                return torch.maximum(torch.minimum(z, upper), lower)
            delta = z - centre
            length = delta.norm(dim=1, keepdim=True).clamp_min(1e-30)
            return centre + delta * torch.clamp(regions.eps / length, max=1.0)

        def margins(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = network.module(z.reshape((m, *network.input_shape))).reshape(m, -1)
            return _term_margins(y, cs, ds)

        rank = torch.as_tensor((np.arange(m) % restarts) - 1, device=dev)  # -1: the centre
        t_count = cs.shape[1]
        # L-infinity steps: the sign of the gradient, or (every other round of random restarts
        # over the terms) the gradient scaled to unit largest entry, which can stop inside the
        # box where sign steps only zig-zag (an optimum on a face, as linear programs have).
        scaled = ((rank >= 0) & ((rank // t_count) % 2 == 1))[:, None]

        def step_direction(grad: torch.Tensor, sign_only: bool = False) -> torch.Tensor:
            if regions.norm == Norm.L2:
                return grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            if sign_only:
                return grad.sign()
            top = grad.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            return torch.where(scaled, grad / top, grad.sign())

        with torch.no_grad():  # which term each restart attacks: the closest ones first
            order = torch.argsort(margins(x)[0][::restarts], dim=1)  # at the centres
        target = order[torch.as_tensor(owner, device=dev), rank.clamp_min(0) % t_count]
        for _ in range(opts.ods_steps if restarts > 1 else 0):
            # output-diversified starts: ascend a random direction of the outputs
            z = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = network.module(z.reshape((m, *network.input_shape))).reshape(m, -1)
                grad = torch.autograd.grad((y * weights).sum(), z)[0]
            x = project(z.detach() + half * step_direction(grad, sign_only=True))
        overall = rank < 0
        best_x = x.detach().clone()
        best = torch.full((m,), math.inf, device=dev)
        steps = 0 if float(regions.half_width().max(initial=0.0)) == 0 else max(0, opts.steps)
        for step in range(steps + 1):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                terms, smooth = margins(x)
                total = terms.amin(dim=1)
                objective = torch.where(overall, smooth.amin(dim=1),
                                        smooth.gather(1, target[:, None])[:, 0])
                grad = torch.autograd.grad(objective.sum(), x)[0] if step < steps else None
            better = total.detach() < best
            best = torch.where(better, total.detach(), best)
            best_x[better] = x.detach()[better]
            per_input = best.reshape(n, restarts).amin(dim=1)
            if step == steps or bool((per_input <= 0).all()):
                break
            if problem.expired() or time.perf_counter() > stop_at:
                log.info("attack stopped by the deadline after %d steps", step)
                break
            decay = FINAL_STEP_FRACTION + (1 - FINAL_STEP_FRACTION) * 0.5 * (
                1 + math.cos(math.pi * step / max(steps, 1)))
            alpha = opts.step_size * decay * half
            x = project(x.detach() - alpha * step_direction(grad))
        best = best.reshape(n, restarts)
        pick = best.argmin(dim=1)
        rows = torch.arange(n, device=dev) * restarts + pick
        points = best_x[rows].double().cpu().numpy()
        values = best.gather(1, pick[:, None])[:, 0].cpu().numpy()
        return [(points[j], float(values[j])) for j in range(n)]

    # -- the answer ----------------------------------------------------------------------------
    def _answer(self, network: Network, double: torch.nn.Module | None, prop: Property,
                regions: Regions, j: int, x: np.ndarray, best: float,
                seconds: float) -> Certificate:
        return confirm_counterexample(self.name, network, double, prop, regions, j, x, best,
                                      seconds)


def confirm_counterexample(name: str, network: Network, double: torch.nn.Module | None,
                           prop: Property, regions: Regions, j: int, x: np.ndarray, best: float,
                           seconds: float) -> Certificate:
    """`falsified` by `name` when `x` (found with margin `best`) is a counterexample of input
    `j`'s region, else `unknown`: rounded to a float32 point inside the region, it must violate
    `prop` under both the module's float32 and a float64 (`double`) forward pass.
    """
    details: dict[str, Any] = {"best_margin": best}
    if not best <= 0:
        return Certificate(Status.UNKNOWN, name, seconds=seconds, details=details)
    point = regions.to_float32(x, j)
    if point is None:
        details["rejected"] = "no float32 point inside the region"
        return Certificate(Status.UNKNOWN, name, seconds=seconds, details=details)
    if double is None:
        details["rejected"] = "no float64 forward pass of the module"
        return Certificate(Status.UNKNOWN, name, seconds=seconds, details=details)
    shape = (1, *network.input_shape)
    with torch.no_grad():
        x32 = torch.as_tensor(point, device=network.device).reshape(shape)
        y32 = network.module(x32).reshape(-1).double().cpu().numpy()
        y64 = double(x32.double()).reshape(-1).cpu().numpy()
    m32, m64 = prop.margin(y32), prop.margin(y64)
    details.update(margin_float32=m32, margin_float64=m64)
    if not (m32 <= 0 and m64 <= 0):
        details["rejected"] = "the forward passes do not both confirm the violation"
        return Certificate(Status.UNKNOWN, name, seconds=seconds, details=details)
    details["distance"] = regions.distance(point.astype(np.float64), j)
    return Certificate(Status.FALSIFIED, name, 0.0, seconds=seconds,
                       counterexample=tuple(float(v) for v in point), details=details)
