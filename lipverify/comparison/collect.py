"""Run every usable backend on the same inputs and collect what each proves.

The numbers behind `lipverify compare`: per backend the global (and pairwise, where the backend
offers it) Lipschitz bounds, each input's certified radius, and the time; next to empirical lower
bounds on the Lipschitz constant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lipverify.backends.base import Verifier
from lipverify.network.network import Network
from lipverify.orchestrator import Mode, run_cascade
from lipverify.types import Norm, Perturbation, Problem, Status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendResult:
    """One backend's numbers on the compared inputs."""

    name: str
    radii: np.ndarray
    seconds: float
    global_bound: float | None = None
    global_seconds: float | None = None
    pairwise_max: float | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class Comparison:
    """Everything a comparison report shows."""

    norm: Norm
    eps_grid: tuple[float, ...]
    labels: np.ndarray
    predicted: np.ndarray
    backends: tuple[BackendResult, ...]
    best_radii: np.ndarray
    lower_bound: float
    lower_method: str
    pairwise_lower_max: float | None = None
    bilipschitz_lower: float | None = None
    details: dict = field(default_factory=dict)

    def certified_fraction(self, radii: np.ndarray, eps: float) -> float:
        """Share of inputs, correctly classified, with certified radius >= eps."""
        ok = (self.predicted == self.labels) & (radii >= eps)
        return float(np.mean(ok)) if len(ok) else 0.0


def _global(backend: Verifier, network: Network, norm: Norm) -> tuple[float | None, float | None]:
    if not hasattr(backend, "lipschitz"):
        return None, None
    try:
        bound = backend.lipschitz(network, norm)
    except Exception as exc:  # noqa: BLE001 - a backend that cannot bound this net is skipped
        log.info("%s: no global bound: %s", backend.name, exc)
        return None, None
    return float(bound.value), float(bound.seconds)


def _pairwise(backend: Verifier, network: Network, norm: Norm) -> float | None:
    fn = getattr(backend, "pairwise_lipschitz", None)
    if fn is None:
        return None
    try:
        matrix = np.asarray(fn(network, norm), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001
        log.info("%s: no pairwise bounds: %s", backend.name, exc)
        return None
    off = matrix[~np.eye(len(matrix), dtype=bool)]
    return float(np.max(off)) if off.size else None


def collect(network: Network, inputs: np.ndarray, labels: np.ndarray,
            backends: Sequence[Verifier], norm: Norm, eps_grid: Sequence[float],
            seed: int = 0) -> Comparison:
    """Run each backend in radius mode on all inputs and gather bounds and lower bounds."""
    from lipverify.lower_bounds import (
        bilipschitz_lower_estimate,
        jacobian_lower_bound,
        pairwise_lower_bound,
    )

    eps_grid = tuple(sorted(float(e) for e in eps_grid))
    problem = Problem.robustness(inputs, labels, network.num_outputs,
                                 Perturbation.ball(norm, eps_grid[0]), want_radius=True)
    results = []
    best = np.zeros(len(inputs))
    for backend in backends:
        if backend.name == "attack":
            continue
        start = time.perf_counter()
        outcome = run_cascade(network, problem, [backend], Mode.RADIUS)
        seconds = time.perf_counter() - start
        certs = outcome.per_backend.get(backend.name, ())
        radii = np.array([c.radius if c is not None and c.status != Status.FALSIFIED else 0.0
                          for c in certs] or [0.0] * len(inputs))
        best = np.maximum(best, radii)
        g, gs = _global(backend, network, norm)
        results.append(BackendResult(backend.name, radii, seconds, g, gs,
                                     _pairwise(backend, network, norm),
                                     outcome.skipped.get(backend.name)))
    lower = jacobian_lower_bound(network, inputs, norm=norm, seed=seed)
    pair_lower = None
    try:
        pl = np.asarray(pairwise_lower_bound(network, inputs, norm=norm, seed=seed).values)
        pair_lower = float(np.max(pl[~np.eye(len(pl), dtype=bool)]))
    except Exception as exc:  # noqa: BLE001 - optional column
        log.info("no pairwise lower bound: %s", exc)
    bi = bilipschitz_lower_estimate(network, inputs, norm=norm, seed=seed)
    predicted = network.forward(inputs).argmax(1)
    return Comparison(norm, eps_grid, np.asarray(labels), predicted, tuple(results), best,
                      float(lower.value), str(lower.method), pair_lower, float(bi.value),
                      {"bilipschitz_method": bi.method})
