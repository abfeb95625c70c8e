"""The cascade's bookkeeping, with small scripted backends (the real ones have their own tests)."""

import numpy as np
import pytest
from torch import nn

from lipverify.backends.base import BackendBase
from lipverify.errors import SoundnessError
from lipverify.network.extract import extract_layers
from lipverify.network.network import Network
from lipverify.orchestrator import Mode, counts, run_cascade
from lipverify.types import Certificate, Perturbation, Problem, Status


def _network():
    module = nn.Sequential(nn.Linear(2, 3)).eval()
    return Network(module, (2,), 3, extract_layers(module, (2,)))


def _scripted(name, cost, answers, calls):
    class Scripted(BackendBase):
        def certify(self, network, problem):
            calls.append((name, len(problem)))
            return [Certificate(answers[int(round(x[0]))], name, radius=float(x[1]))
                    for x in problem.inputs]
    Scripted.name, Scripted.cost = name, cost
    return Scripted()


def _problem(n=4):
    x = np.stack([np.arange(n), np.linspace(0.1, 0.4, n)], 1).astype(np.float32)
    return Problem.robustness(x, [0] * n, 3, Perturbation.ball(2, 0.1))


def test_budget_mode_skips_resolved_inputs_and_orders_by_cost():
    calls = []
    cheap = _scripted("cheap", 1, [Status.VERIFIED, Status.UNKNOWN, Status.UNKNOWN,
                                   Status.FALSIFIED], calls)
    dear = _scripted("dear", 9, [Status.VERIFIED] * 4, calls)
    out = run_cascade(_network(), _problem(), [dear, cheap], Mode.BUDGET)
    assert calls == [("cheap", 4), ("dear", 2)]
    assert [c.status for c in out.best] == [Status.VERIFIED, Status.VERIFIED, Status.VERIFIED,
                                             Status.FALSIFIED]
    assert [c.backend for c in out.best] == ["cheap", "dear", "dear", "cheap"]
    assert counts(out) == {"cheap": 1, "dear": 2, "best": 3}


def test_radius_mode_keeps_largest_radius():
    calls = []
    a = _scripted("a", 1, [Status.UNKNOWN] * 4, calls)
    b = _scripted("b", 2, [Status.UNKNOWN] * 4, calls)
    out = run_cascade(_network(), _problem(), [a, b], Mode.RADIUS)
    assert calls == [("a", 4), ("b", 4)]
    assert all(c.backend in ("a", "b") for c in out.best)


def test_verified_and_falsified_conflict_raises():
    calls = []
    a = _scripted("a", 1, [Status.VERIFIED] * 4, calls)
    b = _scripted("b", 2, [Status.FALSIFIED] * 4, calls)
    with pytest.raises(SoundnessError):
        run_cascade(_network(), _problem(), [a, b], Mode.RADIUS)


def test_best_count_at_least_each_backend():
    calls = []
    a = _scripted("a", 1, [Status.VERIFIED, Status.UNKNOWN, Status.UNKNOWN, Status.UNKNOWN], calls)
    b = _scripted("b", 2, [Status.UNKNOWN, Status.VERIFIED, Status.VERIFIED, Status.UNKNOWN], calls)
    out = run_cascade(_network(), _problem(), [a, b], Mode.RADIUS)
    c = counts(out)
    assert c["best"] >= max(c["a"], c["b"]) and c["best"] == 3


def test_expired_deadline_gives_timeout_not_a_wrong_status():
    import time

    calls = []
    a = _scripted("a", 1, [Status.VERIFIED] * 4, calls)
    problem = _problem().with_deadline(time.monotonic() - 1)
    out = run_cascade(_network(), problem, [a], Mode.BUDGET)
    assert calls == [] and out.skipped == {"a": "out of time"}
    assert all(c.status == Status.TIMEOUT for c in out.best)
