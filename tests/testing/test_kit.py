"""The conformance kit itself: it passes a correct backend and catches each kind of broken one.

The references are checked against independent computations: region enumeration against an LP
enumeration of activation patterns, the attack against the closed-form distance to a linear
classifier's decision boundary.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from lipverify.backends.base import BackendBase
from lipverify.errors import InputError
from lipverify.margins import margin_certificates
from lipverify.network.rounding import sound_outputs
from lipverify.network.layers import Activation, Conv, Dense, Residual
from lipverify.testing import (
    CHECKS,
    ConformanceError,
    ConformanceZoo,
    Outcome,
    check_backend,
    one_torch_thread,
)
from lipverify.testing._attack import Regions, nearest_counterexamples, pgd
from lipverify.testing._exact import (
    exact_lipschitz_2d,
    jacobian_lower_bound,
    linear_region_jacobians,
    operator_norm,
)
from lipverify.testing._zoo import make_network
from lipverify.types import Certificate, LipschitzBound, Norm, Perturbation, Problem, Scope, Status

# Small backends: one correct (the product of layer norms), and one broken way per check.

def _op_norm(mat: np.ndarray, norm: Norm) -> float:
    if norm == Norm.L2:
        return float(np.linalg.norm(mat, 2))
    return float(np.max(np.sum(np.abs(mat), axis=1)))


def product_bound(layers, norm: Norm) -> float:
    """Product of per-layer operator norms (residual blocks: 1 + body)."""
    total = 1.0
    for layer in layers:
        if isinstance(layer, Dense):
            total *= _op_norm(layer.weight.numpy(), norm)
        elif isinstance(layer, Conv):
            total *= _op_norm(layer.matrix().numpy(), norm)
        elif isinstance(layer, Activation):
            total *= layer.lipschitz
        elif isinstance(layer, Residual):
            total *= 1.0 + product_bound(layer.body, norm)
    return total * (1 + 1e-9)


class ProductBackend(BackendBase):
    """A correct, loose backend: the product of layer norms, same norm in and out."""

    name = "product"
    cost = 1

    def supports(self, network, problem):
        if network.layers is None:
            return f"no layer view: {network.unsupported}"
        return super().supports(network, problem)

    def lipschitz(self, network, norm):
        start = time.perf_counter()
        value = product_bound(network.require_layers(), norm)
        return LipschitzBound(self.scale() * value, norm, Scope.GLOBAL, self.name,
                              time.perf_counter() - start, self.sound)

    def scale(self) -> float:
        return 1.0

    def certify(self, network, problem):
        start = time.perf_counter()
        lip = self.lipschitz(network, problem.perturbation.norm).value
        dual = 2 if problem.perturbation.norm == Norm.L2 else 1
        outputs = sound_outputs(network, problem.perturbation.centres(problem.inputs))
        return margin_certificates(problem, outputs,
                                   lambda row: float(np.linalg.norm(row, dual)) * lip,
                                   self.name, time.perf_counter() - start)


class UnsoundBackend(ProductBackend):
    """Claims a tenth of a valid bound."""

    name = "unsound"

    def scale(self) -> float:
        return 0.1


class CrashingBackend(ProductBackend):
    """Accepts everything, then fails on convolutions."""

    name = "crashing"

    def supports(self, network, problem):
        return None

    def certify(self, network, problem):
        if any(isinstance(layer, Conv) for layer in network.require_layers()):
            raise RuntimeError("convolutions are not implemented")
        return super().certify(network, problem)


class OrderDependentBackend(ProductBackend):
    """Certifies later inputs of a batch with a looser radius."""

    name = "orderdependent"

    def certify(self, network, problem):
        certs = super().certify(network, problem)
        return [Certificate(c.status, c.backend, c.radius / (1 + i), c.margin_lower)
                for i, c in enumerate(certs)]


class RandomBackend(ProductBackend):
    """Shrinks radii by an unseeded random factor."""

    name = "random"

    def certify(self, network, problem):
        rng = np.random.default_rng()
        certs = super().certify(network, problem)
        return [Certificate(c.status, c.backend, c.radius * rng.uniform(0.5, 1.0))
                for c in certs]


class LyingFalsifier(BackendBase):
    """Says falsified with the centre as the counterexample."""

    name = "liar"
    cost = 0

    def certify(self, network, problem):
        return [Certificate(Status.FALSIFIED, self.name,
                            counterexample=tuple(float(v) for v in np.ravel(x)))
                for x in problem.inputs]


class HonestNothing(BackendBase):
    """Always unknown, no lipschitz()."""

    name = "nothing"
    cost = 0

    def certify(self, network, problem):
        return [Certificate(Status.UNKNOWN, self.name) for _ in range(len(problem))]



@pytest.fixture(scope="module")
def zoo():
    return ConformanceZoo()


def test_a_correct_backend_passes(zoo):
    report = check_backend(ProductBackend(), zoo=zoo, raise_on_failure=True)
    assert report.passed
    assert [c.name for c in report.checks] == list(CHECKS)
    for name in ("protocol", "supports_honest", "sound_vs_attack", "batch_invariance",
                 "determinism", "lipschitz_exact", "lipschitz_sampled"):
        assert report.outcome(name) == Outcome.PASSED, report
    assert "linear/2 1x" in next(c.message for c in report.checks if c.name == "lipschitz_exact")


@pytest.mark.parametrize(("backend", "failing"), [
    (UnsoundBackend, {"sound_vs_attack", "lipschitz_exact", "lipschitz_sampled"}),
    (CrashingBackend, {"supports_honest"}),
    (OrderDependentBackend, {"batch_invariance"}),
    (RandomBackend, {"batch_invariance", "determinism"}),
    (LyingFalsifier, {"counterexamples"}),
])
def test_each_broken_backend_is_caught(zoo, backend, failing):
    report = check_backend(backend, zoo=zoo)
    assert {c.name for c in report.failures} == failing, str(report)
    with pytest.raises(ConformanceError) as info:
        report.raise_for_failures()
    assert isinstance(info.value, AssertionError)
    assert f"backend {backend.name!r} failed" in str(info.value)


def test_not_applicable_checks_and_raise_on_failure(zoo):
    report = check_backend(HonestNothing, zoo=zoo, raise_on_failure=True)
    assert report.outcome("lipschitz_exact") == Outcome.NOT_APPLICABLE
    assert "no lipschitz() method" in str(report)
    with pytest.raises(AssertionError, match="supports_honest"):
        check_backend(CrashingBackend(), zoo=zoo, raise_on_failure=True,
                      checks=["supports_honest"])


def test_unknown_check_name():
    with pytest.raises(InputError, match="unknown check"):
        check_backend(HonestNothing, checks=["nope"])


def test_one_torch_thread_restores():
    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def _lp_enumeration(w1, b1, w2, radius):
    """Max Jacobian norm over the feasible activation patterns of a one-hidden-layer net."""
    best = {Norm.L2: 0.0, Norm.LINF: 0.0}
    for signs in itertools.product((1.0, -1.0), repeat=len(b1)):
        s = np.array(signs)
        # maximise t s.t. s_j (w_j x + b_j) >= t, |x| <= radius: a full-dimensional cell iff t > 0
        res = linprog([0, 0, -1], A_ub=np.c_[-s[:, None] * w1, np.ones(len(b1))],
                      b_ub=s * b1, bounds=[(-radius, radius)] * 2 + [(None, 1.0)])
        if res.status == 0 and -res.fun > 1e-9:
            jac = w2 @ (np.where(s > 0, 1.0, 0.0)[:, None] * w1)
            for norm in best:
                best[norm] = max(best[norm], operator_norm(jac, norm))
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_region_enumeration_matches_lp_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    module = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    w1, b1 = module[0].weight.detach().numpy(), module[0].bias.detach().numpy()
    w2 = module[2].weight.detach().numpy()
    lp = _lp_enumeration(w1, b1, w2, 20.0)
    for norm in Norm:
        assert exact_lipschitz_2d(module, norm, radius=20.0) == pytest.approx(lp[norm], rel=1e-12)
        # every sampled Jacobian norm is below the exact value
        assert jacobian_lower_bound(module, (2,), norm, samples=500) <= lp[norm] * (1 + 1e-12)


def test_region_enumeration_of_a_linear_map_is_its_norm():
    module = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 3)).double()
    mat = (module[1].weight @ module[0].weight).detach().numpy()
    assert len(linear_region_jacobians(module)) == 1
    assert exact_lipschitz_2d(module, Norm.L2) == pytest.approx(np.linalg.norm(mat, 2), rel=1e-12)


def test_attack_finds_the_distance_to_a_linear_decision_boundary():
    gen = torch.Generator().manual_seed(3)
    module = nn.Sequential(nn.Linear(5, 3))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    net = make_network(module, (5,), "lin")
    x = np.random.default_rng(0).uniform(0, 1, size=(6, 5)).astype(np.float32)
    y = net.forward(x)
    labels = y.argmax(axis=1)
    w = module[0].weight.detach().double().numpy()
    problem = Problem.robustness(x, labels, 3, Perturbation.ball("2", 0.01))
    with one_torch_thread():
        found = nearest_counterexamples(net, problem.properties,
                                        Regions.of(problem.perturbation, x))
        inside = pgd(net, problem.properties, Regions.of(Perturbation.ball("2", 1e-3), x))
    assert inside == [None] * 6
    for i in range(6):
        exact = min((y[i, labels[i]] - y[i, j]) / np.linalg.norm(w[labels[i]] - w[j])
                    for j in range(3) if j != labels[i])
        dist = np.linalg.norm(found[i] - x[i])
        assert exact * (1 - 1e-4) <= dist <= exact * 1.02 + 1e-6
