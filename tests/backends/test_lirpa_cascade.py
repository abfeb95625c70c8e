"""The bound backends inside the orchestrator's cascade: the best certificate per input is at
least as good as every single backend's, and the costs order CROWN after spectral."""

import pytest
import torch

from lipverify.backends.lirpa import AlphaCrownBackend, LirpaBackend, LirpaOptions
from lipverify.backends.local_lipschitz import LocalLipschitzBackend
from lipverify.backends.registry import BackendRegistry
from lipverify.data import load_data
from lipverify.errors import BackendUnavailable
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.load import build_network
from lipverify.orchestrator import Mode, counts, run_cascade
from lipverify.types import Norm, Perturbation, Problem, Status


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _registered(name):
    try:
        return BackendRegistry.from_entry_points().create(name)
    except BackendUnavailable:
        return None


def test_costs_order_crown_after_spectral():
    registry = BackendRegistry.from_entry_points()
    costs = {name: registry.entry(name).load().cost for name in
             ("lirpa", "local", "alpha-crown")}
    assert costs == {"lirpa": 30, "local": 35, "alpha-crown": 45}
    spectral = _registered("spectral")
    if spectral is not None:
        assert spectral.cost < costs["lirpa"]


@pytest.mark.parametrize("norm,eps", [(Norm.L2, 0.3), (Norm.LINF, 0.02)])
def test_best_is_at_least_every_single_backend(norm, eps):
    x, y = load_data("digits", limit=24)
    network = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, eps), want_radius=True)
    backends = [LirpaBackend(), LocalLipschitzBackend(),
                AlphaCrownBackend(LirpaOptions(alpha_iterations=5))]
    spectral = _registered("spectral")
    if spectral is not None:
        backends.append(spectral)
    outcome = run_cascade(network, problem, backends, Mode.RADIUS)
    found = counts(outcome)
    singles = {k: v for k, v in found.items() if k != "best"}
    assert set(singles) >= {"lirpa", "local", "alpha-crown"}
    assert found["best"] >= max(singles.values()) > 0
    for i, best in enumerate(outcome.best):
        for certs in outcome.per_backend.values():
            cert = certs[i]
            if cert is not None and best.status != Status.FALSIFIED:
                assert best.radius >= cert.radius
    # alpha-CROWN starts from CROWN's radius: never smaller
    pairs = [(c, a) for c, a in zip(outcome.per_backend["lirpa"],
                                     outcome.per_backend["alpha-crown"], strict=True)
             if c is not None and a is not None]
    assert pairs and all(a.radius >= c.radius for c, a in pairs)
