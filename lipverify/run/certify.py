"""Certify a data set: batches through the orchestrator, one record per (input, eps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lipverify.backends.base import Verifier
from lipverify.network.network import Network
from lipverify.orchestrator import Mode, Outcome, run_cascade
from lipverify.run.records import eps_key, finite
from lipverify.types import Certificate, Norm, Perturbation, Problem

DEFAULT_BATCH = 256


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
                 progress: Callable[[int], None] | None = None) -> Iterator[list[dict]]:
    """Run the cascade batch by batch; yield each batch's records as soon as it is done."""
    predicted = np.argmax(network.forward(job.inputs), axis=1) if len(job.inputs) else []
    for eps in job.eps_values:
        key = eps_key(eps)
        todo = [i for i in range(len(job.inputs)) if (i, key) not in job.done]
        for start in range(0, len(todo), job.batch_size):
            index = np.array(todo[start:start + job.batch_size])
            problem = Problem.robustness(job.inputs[index], job.labels[index],
                                         network.num_outputs, Perturbation.ball(job.norm, eps),
                                         want_radius=job.mode == Mode.RADIUS)
            outcome: Outcome = run_cascade(network, problem, job.backends, job.mode)
            batch = []
            for k, i in enumerate(index):
                per = {name: certs[k] for name, certs in outcome.per_backend.items()}
                batch.append(_record(i, eps, job.labels[i], predicted[i], outcome.best[k], per,
                                     outcome.skipped))
            yield batch
            if progress is not None:
                progress(len(index))
