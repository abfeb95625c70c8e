"""The backends: the conformance kit, registration through entry points, the shipped models."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import tomllib
from lipverify.backends.registry import BackendRegistry
from lipverify.data import digits_split
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.testing import ConformanceZoo, check_backend, jacobian_lower_bound, make_network
from lipverify.types import Norm, Perturbation, Problem, Status

from lipverify_eclipse import EclipseBackend, EclipseFastBackend, EclipseOptions

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def zoo():
    return ConformanceZoo()


@pytest.mark.parametrize("backend", [EclipseFastBackend, EclipseBackend])
def test_conformance(zoo, backend):
    report = check_backend(backend, zoo=zoo, raise_on_failure=True)
    assert report.passed


def test_entry_points_register_both_backends(monkeypatch):
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"]["lipverify.backends"]
    eps = [importlib.metadata.EntryPoint(n, v, "lipverify.backends") for n, v in declared.items()]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [e for e in eps if e.group == group])
    reg = BackendRegistry.from_entry_points()
    assert reg.names == ["eclipse", "eclipse-fast"]
    assert reg.create("eclipse").cost > reg.create("eclipse-fast").cost
    assert all(why is None for _, _, why in reg.status())


@pytest.fixture(scope="module")
def digits():
    net = make_network(load_shipped("digits_mlp"), INPUT_SHAPE, "digits_mlp")
    _, _, x, y = digits_split()
    return net, x[:20], y[:20]


def test_shipped_mlp_bounds(digits):
    net, _, _ = digits
    fast = EclipseFastBackend().lipschitz(net, Norm.L2)
    lower = jacobian_lower_bound(net.module, net.input_shape, Norm.L2, samples=256)
    assert fast.sound and fast.value >= lower
    inf = EclipseFastBackend().lipschitz(net, Norm.LINF)
    assert inf.value >= fast.value * np.sqrt(64)


def test_certificates_on_digits(digits):
    net, x, y = digits
    backend = EclipseFastBackend()
    problem = Problem.robustness(x, y, 10, Perturbation.ball("2", 0.05), want_radius=True)
    certs = backend.certify(net, problem)
    outputs = net.forward(x)
    for cert, out, label in zip(certs, outputs, y, strict=True):
        assert cert.status in (Status.VERIFIED, Status.UNKNOWN)
        if cert.radius > 0:  # radius * L_pair <= margin for the runner-up class
            j = int(np.argsort(out)[-2]) if out.argmax() == label else int(out.argmax())
            row = np.zeros(10)
            row[label], row[j] = 1.0, -1.0
            assert cert.radius * backend.row_bound(net, row) <= out[label] - out[j]
    assert sum(c.status == Status.VERIFIED for c in certs) > 0


def test_global_pairwise_option_is_looser(digits):
    net, x, y = digits
    problem = Problem.robustness(x, y, 10, Perturbation.ball("2", 0.05), want_radius=True)
    tight = EclipseFastBackend().certify(net, problem)
    loose = EclipseFastBackend(EclipseOptions(pairwise=False)).certify(net, problem)
    assert all(a.radius >= b.radius for a, b in zip(tight, loose, strict=True))


def test_unsupported_networks_say_why(zoo):
    by_name = {c.name: c.network for c in zoo.cases}
    backend = EclipseFastBackend()
    assert "residual" in backend.network_reason(by_name["residual"])
    assert "no layer view" in backend.network_reason(by_name["maxpool"])
