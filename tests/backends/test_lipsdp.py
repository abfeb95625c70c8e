"""The lipsdp backend: supports(), sound pair bounds, caching, certificates, cascade gain."""

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.backends.lipsdp import LipSDPBackend, LipSDPOptions
from lipverify.data import digits_split
from lipverify.margins import robust_radii
from lipverify.network.rounding import sound_outputs
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.modules import GroupSort, ResidualBlock
from lipverify.network.network import Network
from lipverify.orchestrator import run_cascade
from lipverify.sdp import chain_from_layers
from lipverify.types import Norm, Perturbation, Problem, Property, Scope, Status


def make_network(module, shape, outputs):
    module = module.eval()
    return Network(module, tuple(shape), outputs, extract_layers(module, tuple(shape)))


@pytest.fixture(scope="module")
def mlp():
    return make_network(load_shipped("digits_mlp"), INPUT_SHAPE, 10)


@pytest.fixture(scope="module")
def mlp_backend(mlp, tmp_path_factory):
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path_factory.mktemp("cache"))))
    backend.pair_bounds(mlp)  # 45 SDPs, shared by the tests below
    return backend


@pytest.fixture(scope="module")
def digits():
    _, _, x, y = digits_split()
    return x[:150], y[:150]


def small_net(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    return make_network(nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 6), act(),
                                      nn.Linear(6, 3)), (5,), 3)


def robust_problem(x, y, eps, norm=Norm.L2):
    return Problem.robustness(x, y, 10, Perturbation.ball(norm, eps))


def test_supports_says_why_not(tmp_path):
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path)))
    problem = Problem.robustness(np.zeros((1, 4), np.float32), [0], 2, Perturbation.ball(2, 0.1))
    res = make_network(nn.Sequential(nn.Linear(4, 4), ResidualBlock(nn.Linear(4, 4), nn.ReLU()),
                                     nn.Linear(4, 2)), (4,), 2)
    assert "residual" in backend.supports(res, problem)
    gs = make_network(nn.Sequential(nn.Linear(4, 4), GroupSort(2), nn.Linear(4, 2)), (4,), 2)
    assert "groupsort" in backend.supports(gs, problem)
    ok = make_network(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), (4,), 2)
    assert backend.supports(ok, problem) is None
    tiny = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path), memory_budget_gb=1e-6))
    assert "GiB" in tiny.supports(ok, problem)


def test_supports_small_cnn_through_conv_matrices(tmp_path):
    cnn = make_network(load_shipped("digits_cnn"), INPUT_SHAPE, 10)
    problem = robust_problem(np.zeros((1, *INPUT_SHAPE), np.float32), [0], 0.1)
    assert LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path))).supports(cnn, problem) is None
    small = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path), memory_budget_gb=0.05))
    assert "GiB" in small.supports(cnn, problem)
    capped = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path), max_size=100))
    assert "exceeds max_size 100" in capped.supports(cnn, problem)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_global_bound_between_sampled_gradients_and_product(tmp_path, act):
    net = small_net(1, act)
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path)))
    bound = backend.lipschitz(net, Norm.L2)
    assert bound.sound and bound.scope == Scope.GLOBAL
    x = torch.randn(400, 5, requires_grad=True) * 2
    jac = torch.func.vmap(torch.func.jacrev(net.module))(x)
    sampled = float(torch.linalg.matrix_norm(jac, ord=2).max())
    weights = [m.weight.detach().double() for m in net.module if isinstance(m, nn.Linear)]
    product = float(np.prod([torch.linalg.matrix_norm(w, ord=2).item() for w in weights]))
    assert sampled <= bound.value <= product * (1 + 1e-9)
    linf = backend.lipschitz(net, Norm.LINF)
    assert linf.value >= bound.value * math.sqrt(5)


def test_pair_bounds_hold_on_sampled_pairs_and_are_cached(mlp, mlp_backend, digits, tmp_path):
    pairs = mlp_backend.pair_bounds(mlp)
    assert np.allclose(pairs, pairs.T) and np.all(np.diag(pairs) == 0)
    assert np.all(pairs[~np.eye(10, dtype=bool)] > 0)
    x, _ = digits
    rng = np.random.default_rng(0)
    x0 = x[:50].reshape(50, -1).astype(np.float64)
    x1 = x0 + rng.normal(size=x0.shape) * rng.uniform(0.01, 1.0, size=(50, 1))
    f0, f1 = mlp.forward(x0.astype(np.float32)), mlp.forward(x1.astype(np.float32))
    dist = np.linalg.norm(x1 - x0, axis=1)
    for y in range(10):
        for j in range(10):
            change = np.abs((f1[:, y] - f1[:, j]) - (f0[:, y] - f0[:, j]))
            assert np.all(change <= pairs[y, j] * dist + 1e-4)
    # a fresh backend on the same cache directory reads the JSON file instead of solving
    fresh = LipSDPBackend(LipSDPOptions(cache_dir=str(mlp_backend.options.cache_dir)))
    np.testing.assert_array_equal(fresh.pair_bounds(mlp), pairs)


def test_certify_uses_pairwise_radii(mlp, mlp_backend, digits):
    x, y = digits
    problem = robust_problem(x, y, 0.3)
    certs = mlp_backend.certify(mlp, problem)
    expected = robust_radii(sound_outputs(mlp, x), y, mlp_backend.pair_bounds(mlp))
    np.testing.assert_allclose([c.radius for c in certs], expected, rtol=1e-12)
    assert all((c.status == Status.VERIFIED) == (c.radius >= 0.3) for c in certs)
    # L-inf: the same pair bounds times sqrt(64) on the input side
    linf = mlp_backend.certify(mlp, robust_problem(x, y, 0.3 / 8, Norm.LINF))
    for a, b in zip(certs, linf, strict=True):
        assert b.radius <= a.radius / 8 * (1 + 1e-9)
        assert b.radius >= a.radius / 8 * (1 - 1e-6)


def test_general_properties_use_row_bounds(tmp_path):
    net = small_net(2)
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path)))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    labels = np.argmax(net.forward(x), axis=1)
    robust = Problem.robustness(x, labels, 3, Perturbation.ball(2, 0.01))
    general = Problem(robust.inputs, tuple(type(p).linear(p.terms, 3) for p in
                                           robust.properties), robust.perturbation)
    a = backend.certify(net, robust)
    b = backend.certify(net, general)
    for ca, cb in zip(a, b, strict=True):
        assert cb.radius == pytest.approx(ca.radius, rel=1e-6)


def pair_product_bounds(network):
    """Per-pair spectral product ||(e_y - e_j) W_L|| prod ||W_l||, computed here directly."""
    weights = [m.weight.detach().double() for m in network.module if isinstance(m, nn.Linear)]
    inner = np.prod([torch.linalg.matrix_norm(w, ord=2).item() for w in weights[:-1]])
    last = weights[-1].numpy()
    k = last.shape[0]
    return np.array([[np.linalg.norm(last[y] - last[j]) * inner for j in range(k)]
                     for y in range(k)]) * (1 + 1e-6)


def test_lipsdp_certifies_more_than_the_spectral_product(mlp, mlp_backend, digits):
    x, y = digits
    outputs = sound_outputs(mlp, x)
    spectral = robust_radii(outputs, y, pair_product_bounds(mlp))
    lipsdp = robust_radii(outputs, y, mlp_backend.pair_bounds(mlp))
    assert np.all(lipsdp >= spectral * (1 - 1e-9))
    eps = float(np.median(lipsdp[lipsdp > 0]))
    assert np.sum(lipsdp >= eps) > np.sum(spectral >= eps)


def test_cascade_with_spectral_certifies_more(mlp, mlp_backend, digits):
    spectral_mod = pytest.importorskip("lipverify.backends.spectral")
    x, y = digits
    spectral = spectral_mod.SpectralBackend()
    problem = robust_problem(x, y, 0.25)
    alone = run_cascade(mlp, problem, [spectral])
    both = run_cascade(mlp, problem, [spectral, mlp_backend])
    n_alone = sum(c.status == Status.VERIFIED for c in alone.best)
    n_both = sum(c.status == Status.VERIFIED for c in both.best)
    assert n_both > n_alone


@pytest.mark.parametrize("zeroed", [0, 2, 4])
def test_an_all_zero_weight_matrix_gives_bound_zero(tmp_path, zeroed):
    # Issue 15, item 5: an all-zero last layer made the interior-point solver raise
    # `LinAlgError: Internal Error`. Such a network is constant: its exact bound is 0.
    net = small_net(2)
    with torch.no_grad():
        net.module[zeroed].weight.zero_()
    net = make_network(net.module, (5,), 3)
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path)))
    assert backend.lipschitz(net, Norm.L2).value == 0.0
    x = torch.randn(64, 5)
    with torch.no_grad():
        out = net.module(x)
    assert torch.all(out == out[0])  # constant indeed
    pairs = backend.pair_bounds(net)
    assert np.all(pairs == 0.0)
    xs = x[:4].numpy()
    labels = out[:4].argmax(1).numpy()
    certs = backend.certify(net, Problem.robustness(xs, labels, 3, Perturbation.ball(2, 0.5)))
    margin_positive = np.sort(out[0].numpy())[-1] > np.sort(out[0].numpy())[-2]
    assert all(c.status == (Status.VERIFIED if margin_positive else Status.UNKNOWN)
               for c in certs)


def test_lipschitz_api_reports_lipsdp_skipped_and_keeps_spectral():
    # Issue 15, item 5: `lipverify.lipschitz(net, ["spectral", "lipsdp"])` raised on nets
    # LipSDP cannot take, losing the spectral bound.
    import lipverify

    nets = {"groupsort": nn.Sequential(nn.Linear(4, 6), GroupSort(2), nn.Linear(6, 3)),
            "residual": nn.Sequential(nn.Linear(4, 6), ResidualBlock(nn.Linear(6, 6), nn.ReLU()),
                                      nn.Linear(6, 3))}
    for kind, module in nets.items():
        report = lipverify.lipschitz(module.eval(), ["spectral", "lipsdp"], input_shape=(4,))
        assert [b.backend for b in report.bounds] == ["spectral"]
        assert kind in report.skipped["lipsdp"]
        assert report.bounds[0].value >= report.lower_bound > 0
        with pytest.raises(lipverify.errors.InputError, match=kind):
            lipverify.lipschitz(module.eval(), ["lipsdp"], input_shape=(4,))


def _solved_pairs(backend, network):
    cache = backend._cache(network)
    k = network.num_outputs
    return {f"pair:{a}-{b}" for a in range(k) for b in range(a + 1, k)
            if cache.get(f"pair:{a}-{b}") is not None}


def test_pruning_solves_fewer_pairs_and_loses_no_certificate(mlp, mlp_backend, digits, tmp_path):
    """At eps 0.6 most digits cannot be verified by any Lipschitz bound: their margin over a
    checked gradient norm is already below eps. Pruned, LipSDP solves only the pairs of the
    others, and verifies exactly what the unpruned run (every pair, from the shared cache)
    verifies."""
    x, y = digits
    x, y = x[:60], y[:60]
    problem = robust_problem(x, y, 0.6)
    full = mlp_backend.certify(mlp, problem)  # every pair cached: no pruning needed
    assert all("pruned" not in c.details for c in full)
    pruned = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path)))
    certs = pruned.certify(mlp, problem)
    assert [c.status for c in certs] == [c.status for c in full]
    assert any(c.status == Status.VERIFIED for c in certs)
    skipped = [c for c in certs if "pruned" in c.details]
    assert skipped and all(c.status == Status.UNKNOWN for c in skipped)
    needed = {int(t) for t, c in zip(y, certs, strict=True) if "pruned" not in c.details}
    solved = _solved_pairs(pruned, mlp)
    assert solved == {f"pair:{min(t, j)}-{max(t, j)}" for t in needed for j in range(10)
                      if j != t}
    assert len(solved) < 45


def test_property_rows_that_cannot_reach_eps_are_not_solved(mlp, mlp_backend, digits):
    """General properties (no labels, as VNN-LIB gives them) at L2 eps 0.6: rows whose slack
    over a checked gradient norm is below eps get no SDP, and the certificates are those of
    the run that bounds every row."""
    x, y = digits
    x, y = x[:30], y[:30]
    props = tuple(Property(Property.robust(int(t), 10).terms, 10) for t in y)
    problem = Problem(x, props, Perturbation.ball(2, 0.6))
    assert problem.labels is None
    calls = []

    def counting(backend):
        real = backend.row_bound

        def row_bound(network, row, deadline=None):
            calls.append(row.tobytes())
            return real(network, row, deadline)

        backend.row_bound = row_bound
        return backend

    full = counting(LipSDPBackend(dataclasses.replace(mlp_backend.options, prune=False)))
    everything = full.certify(mlp, problem)
    every_row = set(calls)
    calls.clear()
    pruned = counting(LipSDPBackend(mlp_backend.options)).certify(mlp, problem)
    assert [c.status for c in pruned] == [c.status for c in everything]
    assert any(c.status == Status.VERIFIED for c in pruned)
    assert 0 < len(set(calls)) < len(every_row)


def test_pruning_looks_beyond_the_centre_where_the_gradient_vanishes(tmp_path):
    """At an input where every ReLU is off the gradient is zero, so a lower bound from the
    centre alone proves nothing and LipSDP used to solve every pair (mnist-net_256x2: 155 s on
    one image it could not verify). Random points around the input find the large gradients:
    no SDP is solved, and the unpruned run verifies nothing either."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        module[0].weight.copy_(10 * torch.randn(8, 2))
        module[0].bias.fill_(-5.0)  # all off at the origin, on within a unit step of it
        module[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    network = Network(module, (2,), 3, extract_layers(module, (2,)))
    x, y = np.zeros((1, 2)), np.array([0])
    assert network.forward(x).argmax() == 0
    problem = Problem.robustness(x, y, 3, Perturbation.ball(2, 0.5))
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path / "pruned")))
    [cert] = backend.certify(network, problem)
    assert cert.status == Status.UNKNOWN and "pruned" in cert.details
    assert not _solved_pairs(backend, network)
    unpruned = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path / "all"), prune=False))
    [full] = unpruned.certify(network, problem)
    assert full.status == Status.UNKNOWN and full.radius < 0.5


def test_estimate_is_the_unsolved_pairs_of_the_cheapest_label_times_an_sdp(mlp, digits,
                                                                            tmp_path):
    """Before any solve the estimate is a label's 9 pairs times the modelled SDP; once those
    are solved it is 0 for that label and, for another label, its 8 missing pairs times the
    measured mean solve time. The cascade skips LipSDP, solving nothing, when the estimate
    exceeds the time left."""
    x, y = digits
    first, second = (np.flatnonzero(y == t)[:3] for t in (0, 1))
    one = robust_problem(x[first], y[first], 0.01)
    fresh = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path / "estimate")))
    before = fresh.estimate_seconds(mlp, one)
    chain = chain_from_layers(mlp.layers)
    assert before == pytest.approx(9 * fresh._sdp_seconds(mlp, chain)) and before > 0

    hurried = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path / "hurried")))
    late = one.with_deadline(time.monotonic() + before / 4)
    outcome = run_cascade(mlp, late, [hurried])
    assert outcome.skipped["lipsdp"].startswith("estimated")
    assert not _solved_pairs(hurried, mlp)

    fresh.certify(mlp, one)
    assert len(_solved_pairs(fresh, mlp)) == 9
    assert fresh.estimate_seconds(mlp, one) == 0.0
    two = robust_problem(x[second], y[second], 0.01)
    measured = fresh._cache(mlp).solve_seconds()
    assert measured > 0
    assert fresh.estimate_seconds(mlp, two) == pytest.approx(8 * measured)
