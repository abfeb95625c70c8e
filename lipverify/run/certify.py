"""Certify a data set: batches through the orchestrator, one record per (input, eps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lipverify.backends.base import Verifier
from lipverify.network.network import Network
from lipverify.orchestrator import Cascade, Mode, Outcome
from lipverify.run.records import eps_key, finite
from lipverify.types import Certificate, Norm, Perturbation, Problem

DEFAULT_BATCH = 256
# The first batch is small so the first records (and the progress bar) come within seconds;
# later batches double up to the batch size (bigger batches amortise global bounds).
FIRST_BATCH = 16


def batch_sizes(total: int, most: int, first: int = FIRST_BATCH) -> Iterator[int]:
    """Sizes of consecutive batches covering `total` inputs: `first`, doubling up to `most`."""
    size = max(1, min(first, most))
    while total > 0:
        yield min(size, total)
        total -= size
        size = min(2 * size, most)


@dataclass(frozen=True)
class CertifyJob:
    """What to certify: inputs, labels, radii, norm, the cascade and its mode."""

    inputs: np.ndarray
    labels: np.ndarray
    eps_values: tuple[float, ...]
    norm: Norm
    backends: tuple[Verifier, ...]
    mode: Mode = Mode.BUDGET
    batch_size: int = DEFAULT_BATCH
    done: frozenset[tuple[int, str]] = field(default_factory=frozenset)
    time_per_input: float | None = None
    time_total: float | None = None
    first_batch: int = FIRST_BATCH


class TimeBudget:
    """Deadlines of consecutive batches from a per-input and a total budget (seconds).

    Per-input time is pooled: a batch may use what earlier batches left unused, so the
    deadline of the batch ending at input n is `start + n * per_input` (capped by the total).
    """

    def __init__(self, per_input: float | None, total: float | None) -> None:
        self.start = time.monotonic()
        self.per_input = per_input
        self.total = total
        self.inputs = 0

    def next_deadline(self, inputs: int) -> float | None:
        """The deadline of the next batch of `inputs` inputs (None: no budget)."""
        self.inputs += inputs
        ends = []
        if self.per_input is not None:
            ends.append(self.start + self.per_input * self.inputs)
        if self.total is not None:
            ends.append(self.start + self.total)
        return min(ends) if ends else None


def _record(index: int, eps: float, label: int, predicted: int, best: Certificate,
            per_backend: dict[str, Certificate | None], skipped: dict[str, str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "index": int(index), "eps": float(eps), "eps_key": eps_key(eps), "label": int(label),
        "predicted": int(predicted), "status": best.status.value, "backend": best.backend,
        "radius": finite(best.radius), "seconds": best.seconds,
        "per_backend": {name: {"status": c.status.value, "radius": finite(c.radius),
                               "seconds": c.seconds}
                        for name, c in per_backend.items() if c is not None},
    }
    if skipped:
        record["skipped"] = dict(skipped)
    if best.counterexample is not None:
        record["counterexample_distance"] = best.details.get("distance")
    return record


def iter_records(network: Network, job: CertifyJob,
                 progress: Callable[[int], None] | None = None,
                 stage: Callable[[str, int], None] | None = None) -> Iterator[list[dict]]:
    """Run the cascade batch by batch; yield records as soon as their inputs settle.

    Within a batch, the inputs a backend settles (budget mode: verified or falsified; radius
    mode: falsified) are yielded right after that backend, the rest when the batch ends, so an
    interrupted run keeps every settled input. `progress(inputs)` follows the yielded records,
    `stage(backend, inputs)` each backend start.
    """
    predicted = np.argmax(network.forward(job.inputs), axis=1) if len(job.inputs) else []
    budget = TimeBudget(job.time_per_input, job.time_total)
    for eps in job.eps_values:
        key = eps_key(eps)
        todo = [i for i in range(len(job.inputs)) if (i, key) not in job.done]
        start = 0
        for size in batch_sizes(len(todo), job.batch_size, job.first_batch):
            index = np.array(todo[start:start + size])
            start += size
            problem = Problem.robustness(job.inputs[index], job.labels[index],
                                         network.num_outputs, Perturbation.ball(job.norm, eps),
                                         want_radius=job.mode == Mode.RADIUS)
            problem = problem.with_deadline(budget.next_deadline(len(index)))
            cascade = Cascade(network, problem, job.backends, job.mode, stage=stage)

            def records(ks: Sequence[int], best: Sequence[Certificate | None],
                        per_backend: dict[str, Sequence[Certificate | None]],
                        skipped: dict[str, str], eps: float = eps,
                        index: np.ndarray = index) -> list[dict]:
                return [_record(index[k], eps, job.labels[index[k]], predicted[index[k]],
                                best[k], {name: certs[k] for name, certs in per_backend.items()},
                                skipped) for k in ks]

            sent: set[int] = set()
            for _, settled in cascade.stages():
                if settled:
                    sent.update(settled)
                    yield records(settled, cascade.best, cascade.per_backend, cascade.skipped)
                    if progress is not None:
                        progress(len(settled))
            outcome: Outcome = cascade.outcome()
            rest = [k for k in range(len(index)) if k not in sent]
            if rest:
                yield records(rest, outcome.best, outcome.per_backend, outcome.skipped)
                if progress is not None:
                    progress(len(rest))
