"""The orchestrator: backends cheapest first, per-input early exit, the tightest certificate kept.

Pure: no file I/O, printing or device choice here. In `budget` mode an input leaves the cascade
once verified or falsified at the problem's eps; in `radius` mode every backend runs on every
still-unfalsified input and the largest certified radius wins.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lipverify.backends.base import Verifier
from lipverify.errors import SoundnessError
from lipverify.network.network import Network
from lipverify.types import Certificate, Problem, Status

log = logging.getLogger(__name__)


class Mode(enum.Enum):
    """How far each input goes through the cascade."""

    BUDGET = "budget"
    RADIUS = "radius"


@dataclass(frozen=True)
class Outcome:
    """The cascade's result: the best certificate per input and what every backend said."""

    best: tuple[Certificate, ...]
    per_backend: dict[str, tuple[Certificate | None, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _better(new: Certificate, old: Certificate | None) -> bool:
    if old is None:
        return True
    if new.status == Status.FALSIFIED or old.status == Status.FALSIFIED:
        return new.status == Status.FALSIFIED and old.status != Status.FALSIFIED
    if new.status == Status.VERIFIED and old.status != Status.VERIFIED:
        return True
    if old.status == Status.VERIFIED and new.status != Status.VERIFIED:
        return False
    return new.radius > old.radius


def _check_conflict(index: int, a: Certificate, b: Certificate) -> None:
    statuses = {a.status, b.status}
    if statuses == {Status.VERIFIED, Status.FALSIFIED}:
        raise SoundnessError(f"input {index}: {a.backend} says {a.status.value} and "
                             f"{b.backend} says {b.status.value}")


def _falsified_radius_conflict(index: int, falsified: Certificate, other: Certificate,
                               distance: float | None) -> None:
    if distance is not None and other.radius > distance * (1 + 1e-9) and other.radius > 0:
        raise SoundnessError(f"input {index}: {other.backend} certifies radius {other.radius} "
                             f"but {falsified.backend} found a counterexample at distance "
                             f"{distance}")


def run_cascade(network: Network, problem: Problem, backends: Sequence[Verifier],
                mode: Mode = Mode.BUDGET,
                progress: Callable[[str, int], None] | None = None,
                backend_timeout: float | None = None,
                stage: Callable[[str, int], None] | None = None) -> Outcome:
    """Run `backends` (cheapest first) and keep the best certificate per input.

    `problem.deadline` bounds the whole cascade and `backend_timeout` each backend (both
    cooperative: backends read `Problem.deadline`). Inputs left unresolved when the overall
    deadline has passed end as `timeout`. `stage(name, inputs)` is called as each backend
    starts, `progress(name, inputs)` as it ends.
    """
    n = len(problem)
    best: list[Certificate | None] = [None] * n
    per_backend: dict[str, list[Certificate | None]] = {}
    skipped: dict[str, str] = {}
    for backend in sorted(backends, key=lambda b: b.cost):
        if mode == Mode.BUDGET:
            todo = [i for i in range(n) if best[i] is None or not best[i].status.resolved]
        else:
            todo = [i for i in range(n) if best[i] is None or best[i].status != Status.FALSIFIED]
        per_backend[backend.name] = [None] * n
        if not todo:
            continue
        if problem.expired():
            skipped[backend.name] = "out of time"
            continue
        sub = problem.subset(todo) if len(todo) < n else problem
        if backend_timeout is not None:
            own = time.monotonic() + backend_timeout
            sub = sub.with_deadline(own if sub.deadline is None else min(own, sub.deadline))
        why = backend.supports(network, sub)
        if why is not None:
            skipped[backend.name] = why
            log.info("skipping %s: %s", backend.name, why)
            continue
        if stage is not None:
            stage(backend.name, len(todo))
        start = time.perf_counter()
        certs = backend.certify(network, sub)
        log.info("%s: %d inputs in %.3fs", backend.name, len(todo), time.perf_counter() - start)
        if len(certs) != len(todo):
            raise SoundnessError(f"{backend.name} returned {len(certs)} certificates for "
                                 f"{len(todo)} inputs")
        for i, cert in zip(todo, certs, strict=True):
            per_backend[backend.name][i] = cert
            for other in per_backend.values():
                if other[i] is not None:
                    _check_conflict(i, cert, other[i])
            if _better(cert, best[i]):
                best[i] = cert
        if progress is not None:
            progress(backend.name, len(todo))
    fallback = Status.TIMEOUT if problem.expired() else Status.UNKNOWN
    final = tuple(c if c is not None and (c.status.resolved or fallback != Status.TIMEOUT)
                  else Certificate(fallback, c.backend if c is not None else "none",
                                   c.radius if c is not None else 0.0)
                  for c in best)
    return Outcome(final, {k: tuple(v) for k, v in per_backend.items()}, skipped)


def counts(outcome: Outcome) -> dict[str, int]:
    """Verified count per backend and for `best`."""
    out = {name: int(sum(c is not None and c.status == Status.VERIFIED for c in certs))
           for name, certs in outcome.per_backend.items()}
    out["best"] = int(sum(c.status == Status.VERIFIED for c in outcome.best))
    return out


def radii(outcome: Outcome) -> np.ndarray:
    """Best certified radius per input."""
    return np.array([c.radius for c in outcome.best])
