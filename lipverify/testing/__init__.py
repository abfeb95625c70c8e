"""The public conformance kit every backend runs: `check_backend(backend)`.

It runs a backend on small networks (tiny 2-input ReLU nets, a linear net, MLPs, tanh, a
normalised convolutional net, a residual net, GroupSort, an unsupported layer) and problems (L2,
L-infinity and box robustness, a general linear property), and checks against independent
references (exact enumeration, sampled Jacobians, a PGD attack written here):

- `protocol`: capabilities declared as data with the right types.
- `supports_honest`: `certify` answers, without raising or an error status, on every problem
  `supports()` accepts (`supports()` must say why it declines the others).
- `counterexamples`: every falsified answer carries a counterexample inside the region that a
  forward pass confirms.
- `sound_vs_attack`: the attack finds nothing inside a verified region, and no counterexample
  closer than a certified radius.
- `batch_invariance`: the same answer for an input alone, in a reversed batch and in the batch.
- `determinism`: a fresh instance with the same options (seed) gives the same answers.
- `lipschitz_exact`, `lipschitz_sampled`: `lipschitz(network, norm)` (same norm on inputs and
  outputs) is at least the exact constant of the tiny nets and every sampled Jacobian norm.
  Not applicable for backends without `lipschitz()` or that give estimates (`sound=False`).

The references are public too (`exact_lipschitz_2d`, `jacobian_lower_bound`, `pgd`,
`nearest_counterexamples`, `make_network`) for a backend's own tests.

Example:
    >>> from lipverify.testing import check_backend
    >>> report = check_backend(MyBackend(), raise_on_failure=True)  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from lipverify.errors import InputError
from lipverify.testing._attack import Regions, nearest_counterexamples, pgd
from lipverify.testing._checks import CHECKS, Session
from lipverify.testing._exact import (
    affine_lipschitz,
    exact_lipschitz_2d,
    jacobian_lower_bound,
    linear_region_jacobians,
    operator_norm,
)
from lipverify.testing._report import BackendReport, CheckResult, ConformanceError, Outcome
from lipverify.testing._zoo import CASE_NAMES, Case, ConformanceZoo, ProblemCase, make_network

__all__ = ["CASE_NAMES", "CHECKS", "BackendReport", "Case", "CheckResult", "ConformanceError",
           "ConformanceZoo", "Outcome", "ProblemCase", "Regions", "affine_lipschitz",
           "check_backend", "exact_lipschitz_2d", "jacobian_lower_bound",
           "linear_region_jacobians", "make_network", "nearest_counterexamples", "one_torch_thread",
           "operator_norm", "pgd"]


def _factory(backend: object) -> tuple[object, Callable[[], object]]:
    """The instance under test and a way to make a fresh one with the same options."""
    if isinstance(backend, type):
        cls, options = backend, None
    else:
        cls, options = type(backend), getattr(backend, "options", None)

    def make() -> object:
        return cls(options) if options is not None else cls()

    return (make() if isinstance(backend, type) else backend), make


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, restoring the setting after.

    The kit's networks are tiny: on a busy machine, intra-op threads only add contention (a
    100x slowdown of the attack was measured with other jobs running).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_backend(backend: object, *, raise_on_failure: bool = False,
                  zoo: ConformanceZoo | None = None,
                  checks: Iterable[str] | None = None) -> BackendReport:
    """Run the conformance checks on a backend.

    Args:
        backend: A backend instance, or its class (instantiated without arguments).
        raise_on_failure: Raise `ConformanceError` (an `AssertionError` showing the whole
            report) when a check fails, instead of returning the report.
        zoo: The networks and references to use; pass one zoo to several calls to compute the
            references (attacks, exact constants) once. Default: a new `ConformanceZoo()`.
        checks: Names from `CHECKS` to run (default: all, in order).

    Torch runs on one thread during the checks (see `one_torch_thread`).

    Returns:
        The report: one `CheckResult` per check (passed, failed or not applicable).
    """
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise InputError(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    results = []
    with one_torch_thread():
        instance, make = _factory(backend)
        session = Session(instance, make, zoo if zoo is not None else ConformanceZoo())
        for name in names:
            start = time.perf_counter()
            try:
                outcome, message = CHECKS[name](session)
            except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check
                outcome, message = (Outcome.FAILED,
                                    f"the check crashed: {type(exc).__name__}: {exc}")
            results.append(CheckResult(name, outcome, message, time.perf_counter() - start))
    report = BackendReport(session.name, tuple(results))
    if raise_on_failure:
        report.raise_for_failures()
    return report
