"""The spectral backend: capabilities, caching, radii against the global bound, and PGD attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from lipverify.backends.spectral import SpectralBackend, SpectralOptions
from lipverify.data import load_data
from lipverify.network.rounding import sound_outputs
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.load import build_network
from lipverify.testing import CHECKS, check_backend
from lipverify.types import Norm, Perturbation, Problem, Property, Scope, Status

N_INPUTS = 60
PGD_STEPS = 40
PGD_RESTARTS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch/BLAS thread: spinning threads collapse when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    x, y = load_data("digits", limit=N_INPUTS)
    return x, y


@pytest.fixture(scope="module", params=["digits_mlp", "digits_cnn"])
def shipped(request):
    return build_network(load_shipped(request.param), INPUT_SHAPE, name=request.param)


@pytest.fixture(scope="module")
def backend():
    return SpectralBackend()


def _pgd_worst_margin(network, x, y, radius, norm, seed=0):
    """Smallest `f_y - max_j f_j` PGD finds inside the ball (float32, like the certified model)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(x, dtype=torch.float32)
    labels = torch.as_tensor(y)
    worst = torch.full((len(x0),), math.inf)
    r = torch.as_tensor(radius, dtype=torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    step = 2.5 * r / PGD_STEPS
    for _ in range(PGD_RESTARTS):
        delta = (torch.rand(x0.shape, generator=gen) * 2 - 1) * r / math.sqrt(x0[0].numel())
        for _ in range(PGD_STEPS):
            delta.requires_grad_(True)
            out = network.module(x0 + delta)
            true = out.gather(1, labels[:, None])[:, 0]
            other = out.clone()
            other.scatter_(1, labels[:, None], -math.inf)
            margin = true - other.max(dim=1).values
            worst = torch.minimum(worst, margin.detach())
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                if norm == Norm.L2:
                    g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(r)
                    delta = delta - step * g
                    scale = (r / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(r))
                    delta = delta * scale.clamp(max=1.0)
                else:
                    delta = (delta - step * grad.sign()).clamp(-r, r)
        with torch.no_grad():
            out = network.module(x0 + delta)
            true = out.gather(1, labels[:, None])[:, 0]
            other = out.clone()
            other.scatter_(1, labels[:, None], -math.inf)
            worst = torch.minimum(worst, true - other.max(dim=1).values)
    return worst.numpy()


def test_capabilities():
    assert SpectralBackend.name == "spectral"
    assert SpectralBackend.cost == 10
    assert SpectralBackend.norms == frozenset({Norm.L2, Norm.LINF})
    assert SpectralBackend.scopes == frozenset({Scope.GLOBAL, Scope.PAIRWISE})
    assert SpectralBackend.sound


def test_supports_says_why_not(data):
    x, y = data
    problem = Problem.robustness(x[:2], y[:2], 10, Perturbation.ball(2, 0.1))
    pooled = build_network(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 10)),
                           INPUT_SHAPE)
    why = SpectralBackend().supports(pooled, problem)
    assert why is not None and "MaxPool2d" in why
    mlp = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    assert SpectralBackend().supports(mlp, problem) is None
    wrong = Problem.robustness(x[:2], y[:2], 12, Perturbation.ball(2, 0.1))
    assert "outputs" in SpectralBackend().supports(mlp, wrong)


def test_lipschitz_is_sound_cached_and_explained(shipped, backend):
    first = backend.lipschitz(shipped, Norm.L2)
    assert first.sound and first.scope == Scope.GLOBAL and first.backend == "spectral"
    factors = first.details["factors"]
    assert len(factors) == len(shipped.layers) == len(first.details["methods"])
    assert math.prod(factors) == pytest.approx(first.value, rel=1e-12)
    cached = backend.bounds(shipped, Norm.L2)[0]
    assert backend.bounds(shipped, Norm.L2)[0] is cached  # computed once per network
    linf = backend.lipschitz(shipped, Norm.LINF)
    assert linf.value <= math.sqrt(shipped.input_size) * first.value * (1 + 1e-9)


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
def test_radii_are_never_looser_than_the_global_bound(shipped, backend, data, norm):
    x, y = data
    problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, 0.0), want_radius=True)
    certs = backend.certify(shipped, problem)
    radii = np.array([c.radius for c in certs])
    sound = sound_outputs(shipped, x)
    out, err = sound.values, sound.error
    gaps = out[np.arange(len(y)), y][:, None] - out - err[np.arange(len(y)), y][:, None] - err
    gaps[np.arange(len(y)), y] = np.inf
    lip = backend.lipschitz(shipped, norm).value
    factor = math.sqrt(2) if norm == Norm.L2 else 2.0
    floor = np.maximum(gaps.min(axis=1), 0) / (factor * lip)
    assert np.all(radii >= floor * (1 - 1e-9))
    assert np.any(radii > floor * 1.001)  # the pairwise constants do help somewhere
    assert all(c.details["binding_class"] != t for c, t in zip(certs, y, strict=True))


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
def test_pgd_breaks_no_certified_radius(shipped, backend, data, norm):
    x, y = data
    problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, 0.0), want_radius=True)
    radii = np.array([c.radius for c in backend.certify(shipped, problem)])
    certified = radii > 0
    assert certified.sum() >= len(y) // 2
    worst = _pgd_worst_margin(shipped, x[certified], y[certified], radii[certified], norm)
    assert np.all(worst > 0)
    # The attack is real: at 20 times the radius it breaks some inputs.
    broken = _pgd_worst_margin(shipped, x[certified], y[certified], 20 * radii[certified], norm)
    assert np.any(broken <= 0)


def test_budget_mode_status_follows_the_radius(backend, data):
    x, y = data
    net = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    eps = 0.3
    certs = backend.certify(net, Problem.robustness(x, y, 10, Perturbation.ball(2, eps)))
    for c in certs:
        assert c.radius >= 0 and math.isfinite(c.radius)
        assert (c.status == Status.VERIFIED) == (c.radius >= eps)
    assert {c.status for c in certs} == {Status.VERIFIED, Status.UNKNOWN}


def test_box_uses_the_centre_and_each_inputs_own_enclosing_radius(backend, data):
    x, y = data
    net = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    eps = 0.02
    lower, upper = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    box = Problem.robustness(x, y, 10, Perturbation.box(lower, upper))
    certs = backend.certify(net, box)
    centres = (lower.astype(np.float64) + upper) / 2  # exact: the certificate's own centre
    half = np.maximum(upper - centres, centres - lower).reshape(len(x), -1).max(axis=1)
    ball = backend.certify(net, Problem.robustness(centres, y, 10,
                                                   Perturbation.ball(np.inf, 0.0)))
    for c, b, h in zip(certs, ball, half, strict=True):
        assert c.radius == pytest.approx(b.radius, rel=1e-12, abs=1e-15)
        assert (c.status == Status.VERIFIED) == (c.radius >= h)
    verified = np.array([c.status == Status.VERIFIED for c in certs])
    assert verified.any()
    worst = _pgd_worst_margin(net, centres[verified], y[verified], half[verified], Norm.LINF)
    assert np.all(worst > 0)


def test_general_properties_agree_with_the_robust_path(backend, data):
    x, y = data
    x, y = x[:15], y[:15]
    net = build_network(load_shipped("digits_cnn"), INPUT_SHAPE)
    for norm in Norm:
        robust = Problem.robustness(x, y, 10, Perturbation.ball(norm, 0.05))
        linear = Problem(x, tuple(Property.linear(p.terms, 10) for p in robust.properties),
                         robust.perturbation)
        a = backend.certify(net, robust)
        b = backend.certify(net, linear)
        for ca, cb in zip(a, b, strict=True):
            assert cb.radius <= ca.radius * (1 + 1e-9)
            assert cb.radius >= ca.radius * (1 - 1e-6)


def test_float64_inputs_off_the_float32_grid_are_certified_where_they_are(backend, data):
    x, y = data
    net = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    nudged = x.astype(np.float64) + 1e-3 * np.random.default_rng(0).uniform(0, 1e-4, x.shape)
    back = nudged.astype(np.float32).astype(np.float64)
    dist = np.linalg.norm((nudged - back).reshape(len(x), -1), axis=1)
    assert np.all(dist > 0)
    exact = backend.certify(net, Problem.robustness(back, y, 10, Perturbation.ball(2, 0.0)))
    moved = backend.certify(net, Problem.robustness(nudged, y, 10, Perturbation.ball(2, 0.0)))
    # the centre margin is the float64 one at the float64 point, not at its float32 rounding
    out = net.layer_forward(torch.as_tensor(nudged)).numpy()
    for i, (c, m, d) in enumerate(zip(exact, moved, dist, strict=True)):
        j = m.details["binding_class"]
        assert m.details["centre_margin"] == pytest.approx(out[i, y[i]] - out[i, j], abs=1e-12)
        # radius = min margin / L moves by at most the distance the centre moved
        assert abs(m.radius - c.radius) <= d * (1 + 1e-6) + 1e-12


def test_pairwise_lipschitz_is_exposed_and_cached(backend):
    net = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    p = backend.pairwise_lipschitz(net, Norm.L2)
    assert p.shape == (10, 10) and np.all(np.diag(p) == 0)
    assert np.all(p[~np.eye(10, dtype=bool)] > 0)
    p[0, 1] = -1.0  # a copy: the cache is not touched
    assert backend.pairwise_lipschitz(net, "2")[0, 1] > 0


def test_options_are_honoured(data):
    x, y = data
    net = build_network(load_shipped("digits_cnn"), INPUT_SHAPE)
    plain = SpectralBackend(SpectralOptions(twist_candidates=1, explicit_max_entries=0))
    full = SpectralBackend()
    a = plain.lipschitz(net, Norm.L2)
    b = full.lipschitz(net, Norm.L2)
    assert "explicit_svd" not in a.details["methods"]
    assert b.value <= a.value


def test_conformance_kit():
    report = check_backend(SpectralBackend(), raise_on_failure=True)
    assert {r.name for r in report.checks} == set(CHECKS)
