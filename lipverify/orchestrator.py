"""The orchestrator: backends cheapest first, per-input early exit, the tightest certificate kept.

Pure: no file I/O, printing or device choice here. In `budget` mode an input leaves the cascade
once verified or falsified at the problem's eps; in `radius` mode every backend runs on every
still-unfalsified input and the largest certified radius wins.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator, Sequence
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


class Cascade:
    """One cascade run, stepped backend by backend so callers can stream inputs as they settle.

    `stages()` runs the backends (cheapest first) and yields, after each one, the indices it
    settled (budget mode: verified or falsified; radius mode: falsified); `outcome()` then gives
    every input's best certificate. `problem.deadline` bounds the whole cascade and
    `backend_timeout` each backend (both cooperative: backends read `Problem.deadline`). Inputs
    left unresolved when the overall deadline has passed end as `timeout`. `stage(name,
    inputs)` is called as each backend starts, `progress(name, inputs)` as it ends.
    """

    def __init__(self, network: Network, problem: Problem, backends: Sequence[Verifier],
                 mode: Mode = Mode.BUDGET,
                 progress: Callable[[str, int], None] | None = None,
                 backend_timeout: float | None = None,
                 stage: Callable[[str, int], None] | None = None) -> None:
        self.network, self.problem, self.mode = network, problem, mode
        self.backends = sorted(backends, key=lambda b: b.cost)
        self.progress, self.stage, self.backend_timeout = progress, stage, backend_timeout
        self.best: list[Certificate | None] = [None] * len(problem)
        self.per_backend: dict[str, list[Certificate | None]] = {}
        self.skipped: dict[str, str] = {}

    def _open(self, i: int) -> bool:
        best = self.best[i]
        if self.mode == Mode.BUDGET:
            return best is None or not best.status.resolved
        return best is None or best.status != Status.FALSIFIED

    def stages(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Run each backend on the inputs still open; yield its name and the inputs it settled."""
        n = len(self.problem)
        for backend in self.backends:
            todo = [i for i in range(n) if self._open(i)]
            self.per_backend[backend.name] = [None] * n
            if not todo:
                continue
            certs = self._run(backend, todo)
            if certs is None:
                continue
            for i, cert in zip(todo, certs, strict=True):
                self.per_backend[backend.name][i] = cert
                for other in self.per_backend.values():
                    if other[i] is not None:
                        _check_conflict(i, cert, other[i])
                if _better(cert, self.best[i]):
                    self.best[i] = cert
            if self.progress is not None:
                self.progress(backend.name, len(todo))
            yield backend.name, tuple(i for i in todo if not self._open(i))

    def _run(self, backend: Verifier, todo: list[int]) -> list[Certificate] | None:
        """`backend`'s certificates of `todo`, or None (skipped, with the reason recorded)."""
        problem = self.problem
        if problem.expired():
            self.skipped[backend.name] = "out of time"
            return None
        sub = problem.subset(todo) if len(todo) < len(problem) else problem
        if self.backend_timeout is not None:
            own = time.monotonic() + self.backend_timeout
            sub = sub.with_deadline(own if sub.deadline is None else min(own, sub.deadline))
        why = backend.supports(self.network, sub)
        if why is not None:
            self.skipped[backend.name] = why
            log.info("skipping %s: %s", backend.name, why)
            return None
        why = _too_slow(backend, self.network, sub)
        if why is not None:
            self.skipped[backend.name] = why
            log.info("skipping %s: %s", backend.name, why)
            return None
        if self.stage is not None:
            self.stage(backend.name, len(todo))
        start = time.perf_counter()
        certs = backend.certify(self.network, sub)
        log.info("%s: %d inputs in %.3fs", backend.name, len(todo), time.perf_counter() - start)
        if len(certs) != len(todo):
            raise SoundnessError(f"{backend.name} returned {len(certs)} certificates for "
                                 f"{len(todo)} inputs")
        return certs

    def outcome(self) -> Outcome:
        """The best certificate per input (unresolved ones `timeout` past the deadline)."""
        fallback = Status.TIMEOUT if self.problem.expired() else Status.UNKNOWN
        final = tuple(c if c is not None and (c.status.resolved or fallback != Status.TIMEOUT)
                      else Certificate(fallback, c.backend if c is not None else "none",
                                       c.radius if c is not None else 0.0)
                      for c in self.best)
        return Outcome(final, {k: tuple(v) for k, v in self.per_backend.items()},
                       dict(self.skipped))


def _too_slow(backend: Verifier, network: Network, problem: Problem) -> str | None:
    """Why `backend` cannot settle any input before the deadline, by its own estimate.

    Backends may offer `estimate_seconds(network, problem)`: the seconds until they could
    settle their first input (None: no estimate). Without a deadline nothing is skipped.
    """
    estimate = getattr(backend, "estimate_seconds", None)
    if estimate is None or problem.deadline is None:
        return None
    seconds = estimate(network, problem)
    left = problem.deadline - time.monotonic()
    if seconds is None or seconds <= left:
        return None
    return f"estimated {seconds:.0f} s before its first certificate > {max(left, 0):.0f} s left"


def run_cascade(network: Network, problem: Problem, backends: Sequence[Verifier],
                mode: Mode = Mode.BUDGET,
                progress: Callable[[str, int], None] | None = None,
                backend_timeout: float | None = None,
                stage: Callable[[str, int], None] | None = None) -> Outcome:
    """Run `backends` (cheapest first) and keep the best certificate per input (see `Cascade`)."""
    cascade = Cascade(network, problem, backends, mode, progress, backend_timeout, stage)
    for _ in cascade.stages():
        pass
    return cascade.outcome()


def counts(outcome: Outcome) -> dict[str, int]:
    """Verified count per backend and for `best`."""
    out = {name: int(sum(c is not None and c.status == Status.VERIFIED for c in certs))
           for name, certs in outcome.per_backend.items()}
    out["best"] = int(sum(c.status == Status.VERIFIED for c in outcome.best))
    return out


def radii(outcome: Outcome) -> np.ndarray:
    """Best certified radius per input."""
    return np.array([c.radius for c in outcome.best])
