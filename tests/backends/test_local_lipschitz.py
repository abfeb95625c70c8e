"""The `local` backend: slope intervals, masked norms and local Lipschitz bounds checked against
enumerated and sampled Jacobians, PGD, and CROWN under L2."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.backends._local_jacobian import LocalJacobian, slope_interval
from lipverify.backends._margin_search import Region, Spec
from lipverify.backends.lirpa import LirpaBackend
from lipverify.backends.local_lipschitz import LocalLipschitzBackend, LocalOptions
from lipverify.data import load_data
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.layers import Activation
from lipverify.network.load import build_network
from lipverify.network.modules import ResidualBlock
from lipverify.types import Norm, Perturbation, Problem, Status

N_INPUTS = 30
EPS = {Norm.LINF: 0.02, Norm.L2: 0.3}


@pytest.fixture(scope="module")
def data():
    return load_data("digits", limit=N_INPUTS)


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 16),
                         nn.Sigmoid(), nn.Linear(16, 10)).eval()
    return {"digits_mlp": build_network(load_shipped("digits_mlp"), INPUT_SHAPE),
            "digits_cnn": build_network(load_shipped("digits_cnn"), INPUT_SHAPE),
            "tanh": build_network(tanh, INPUT_SHAPE)}


@pytest.mark.parametrize("kind,param", [("relu", 0.0), ("leaky_relu", 0.1), ("tanh", 0.0),
                                        ("sigmoid", 0.0)])
def test_slope_interval_contains_every_difference_quotient(kind, param):
    act = Activation(kind, (50,), param)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen, dtype=torch.float64) * 3, \
        torch.randn(50, generator=gen, dtype=torch.float64) * 3
    lower, upper = torch.minimum(a, b), torch.maximum(a, b)
    lower[:5], upper[:5] = torch.rand(5, dtype=torch.float64) * 2, 2.5  # stably positive
    lower[5:10], upper[5:10] = -3.0, -torch.rand(5, dtype=torch.float64)  # stably negative
    lo, hi = slope_interval(act, lower[None], upper[None])
    t = torch.rand((400, 2, 50), generator=gen, dtype=torch.float64)
    z = lower + t * (upper - lower)
    f = act.forward(z.reshape(-1, 50)).reshape(z.shape)
    dz = z[:, 0] - z[:, 1]
    q = (f[:, 0] - f[:, 1]) / dz
    tol = 1e-14 * z.abs().max() / dz.abs()  # rounding of the quotient itself
    assert torch.all(q >= lo - tol) and torch.all(q <= hi + tol)
    if kind == "relu":
        assert torch.all(lo[0, :5] == 1) and torch.all(hi[0, 5:10] == 0)


def _tiny(seed, widths=(3, 6, 6, 2)):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).double().eval()


def test_masked_bounds_cover_every_slope_pattern():
    # W2 D W1 with D in [0, 1]: D = I gives 0, D = diag(1, 0) gives 1.
    lin1, lin2 = nn.Linear(1, 2), nn.Linear(2, 1)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0], [1.0]]))
        lin2.weight.copy_(torch.tensor([[1.0, -1.0]]))
    layers = extract_layers(nn.Sequential(lin1, nn.ReLU(), lin2), (1,))
    unstable = [(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))]
    rows = torch.ones((1, 1, 1), dtype=torch.float64)
    jac = LocalJacobian(layers)
    assert jac.interval_magnitude(unstable, rows).sum() >= 1.0
    assert jac.norm_product(unstable, rows).item() >= 1.0
    for seed in range(5):
        module = _tiny(seed)
        layers = extract_layers(module, (3,))
        rng = np.random.default_rng(seed)
        widths = [6, 6]
        slopes, patterns = [], []
        for w in widths:  # each neuron: inactive, active or unstable
            state = rng.integers(0, 3, size=w)
            lo = torch.tensor(np.where(state == 1, 1.0, 0.0))[None]
            hi = torch.tensor(np.where(state == 0, 0.0, 1.0))[None]
            slopes.append((lo, hi))
            patterns.append([(0.0,) if s == 0 else (1.0,) if s == 1 else (0.0, 1.0)
                             for s in state])
        rows = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
        jac = LocalJacobian(layers)
        mag = jac.interval_magnitude(slopes, rows)[0, 0]
        prod = jac.norm_product(slopes, rows)[0, 0].item()
        w1, w2, w3 = (m.weight.detach() for m in module if isinstance(m, nn.Linear))
        worst2 = worst1 = 0.0
        for d1 in itertools.product(*patterns[0]):
            for d2 in itertools.product(*patterns[1]):
                j = rows[0] @ w3 @ torch.diag(torch.tensor(d2, dtype=torch.float64)) @ w2 @ \
                    torch.diag(torch.tensor(d1, dtype=torch.float64)) @ w1
                assert torch.all(j.abs()[0] <= mag + 1e-12)
                worst2 = max(worst2, j.norm().item())
                worst1 = max(worst1, j.abs().sum().item())
        assert mag.norm().item() >= worst2 - 1e-12 and prod >= worst2 - 1e-12
        assert mag.sum().item() >= worst1 - 1e-12


def _sample_ball(x, norm, eps, count, gen):
    shape = (count, *x.shape)
    if norm == Norm.LINF:
        u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        corner = torch.sign(torch.randn(shape, generator=gen, dtype=torch.float64))
        pick = torch.rand((count,) + (1,) * x.dim(), generator=gen) < 0.5
        return x + eps * torch.where(pick, corner, u)
    d = torch.randn(shape, generator=gen, dtype=torch.float64)
    d = d / d.flatten(1).norm(dim=1).view(-1, *([1] * x.dim()))
    r = torch.rand((count,) + (1,) * x.dim(), generator=gen, dtype=torch.float64) ** 0.1
    return x + eps * r * d


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "tanh"])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_local_bound_above_sampled_jacobians(networks, data, name, norm):
    x, y = data
    x, y = x[:6], y[:6]
    network = networks[name]
    backend = LocalLipschitzBackend()
    eps = EPS[norm]
    spec = Spec.build(Problem.robustness(x, y, 10, Perturbation.ball(norm, eps)).properties, 10)
    region = Region.of(Perturbation.ball(norm, eps), x)
    bounds = backend.local_lipschitz(network, region, spec.c)
    assert bounds.shape == (6, 9) and np.all(np.isfinite(bounds))
    module = network.module.double()
    gen = torch.Generator().manual_seed(1)
    q = 1 if norm == Norm.LINF else 2
    try:
        for i in range(len(x)):
            pts = _sample_ball(torch.tensor(x[i], dtype=torch.float64), norm, eps, 64, gen)
            pts.requires_grad_(True)
            out = module(pts)
            for r in range(9):
                c = torch.tensor(spec.c[i, r])
                (grad,) = torch.autograd.grad((out @ c).sum(), pts, retain_graph=True)
                sampled = grad.flatten(1).norm(p=q, dim=1).max().item()
                assert sampled <= bounds[i, r] * (1 + 1e-9), (i, r, sampled, bounds[i, r])
    finally:
        network.module.float()


def test_larger_balls_give_larger_bounds(networks, data):
    x, y = data
    spec = Spec.build(Problem.robustness(x, y, 10, Perturbation.ball(Norm.L2, 0.1)).properties, 10)
    backend = LocalLipschitzBackend()
    small = backend.local_lipschitz(networks["digits_mlp"],
                                    Region.of(Perturbation.ball(Norm.L2, 0.05), x), spec.c)
    large = backend.local_lipschitz(networks["digits_mlp"],
                                    Region.of(Perturbation.ball(Norm.L2, 2.0), x), spec.c)
    assert np.mean(small <= large + 1e-9) > 0.95 and np.mean(small) < np.mean(large)


def pgd_margin(module, x, labels, norm, eps, steps=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.tensor(x)
    lab = torch.as_tensor(labels)
    mask = nn.functional.one_hot(lab, 10).bool()
    delta = (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps * (0.5 if norm == Norm.L2 else 1)
    if norm == Norm.L2:
        delta = delta / 8
    best = torch.full((len(x0),), np.inf)
    for _ in range(steps):
        delta.requires_grad_(True)
        out = module(x0 + delta)
        margin = out.gather(1, lab[:, None])[:, 0] - out.masked_fill(mask, -np.inf).max(1).values
        best = torch.minimum(best, margin.detach())
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            if norm == Norm.LINF:
                delta = (delta - eps / 8 * grad.sign()).clamp(-eps, eps)
            else:
                delta = delta - eps / 8 * grad / grad.flatten(1).norm(dim=1).view(
                    -1, 1, 1, 1).clamp_min(1e-12)
                delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(
                    max=1).view(-1, 1, 1, 1)
    return best.numpy()


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_verified_inputs_survive_pgd(networks, data, norm):
    x, y = data
    network = networks["digits_mlp"]
    problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, EPS[norm]), want_radius=True)
    certs = LocalLipschitzBackend(LocalOptions(radius_rel_tol=0.05)).certify(network, problem)
    radii = np.array([c.radius for c in certs])
    assert np.sum(radii > 0) > len(x) // 2
    for cert in certs:
        assert (cert.status == Status.VERIFIED) == (cert.radius >= EPS[norm])
    r = float(np.median(radii[radii > 0]))
    found = pgd_margin(network.module, x, y, norm, r)
    assert np.all(found[radii >= r] > 0)


def test_tighter_than_crown_under_l2_on_the_shipped_mlp(networks, data):
    x, y = data
    network = networks["digits_mlp"]
    problem = Problem.robustness(x, y, 10, Perturbation.ball(Norm.L2, 0.3), want_radius=True)
    local = np.array([c.radius for c in LocalLipschitzBackend().certify(network, problem)])
    crown = np.array([c.radius for c in LirpaBackend().certify(network, problem)])
    assert local.mean() > crown.mean()
    assert np.sum(local > crown) > len(x) // 2


def test_box_bound_matches_the_ball_of_its_half_widths(networks, data):
    x, y = data
    network = networks["digits_cnn"]
    eps = 0.02
    backend = LocalLipschitzBackend()
    ball = backend.certify(network, Problem.robustness(x, y, 10,
                                                       Perturbation.ball(Norm.LINF, eps)))
    box = backend.certify(network, Problem.robustness(x, y, 10,
                                                      Perturbation.box(x - eps, x + eps)))
    for a, b in zip(ball, box, strict=True):
        assert a.status == b.status
        # the box corners are rounded to float32: equal up to that rounding
        assert a.margin_lower == pytest.approx(b.margin_lower, abs=2e-5)


def test_supports_declines_residual_networks():
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 4),
                           ResidualBlock(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)).eval()
    network = build_network(module, (4,))
    problem = Problem.robustness(np.zeros((1, 4), np.float32), [0], 2,
                                 Perturbation.ball(Norm.L2, 0.1))
    assert "residual" in (LocalLipschitzBackend().supports(network, problem) or "")
    assert LirpaBackend().supports(network, problem) is None


def test_masked_lipsdp_refinement_only_tightens_and_stays_sound(networks, data):
    x, y = data
    pick = [7, 8, 9, 14]
    x, y = x[pick], y[pick]
    network = networks["digits_mlp"]
    problem = Problem.robustness(x, y, 10, Perturbation.ball(Norm.L2, 0.5))
    cheap = LocalLipschitzBackend().certify(network, problem)
    refined = LocalLipschitzBackend(LocalOptions(lipsdp_rows=2)).certify(network, problem)
    assert all(r.margin_lower >= c.margin_lower for c, r in zip(cheap, refined, strict=True))
    assert any(r.margin_lower > c.margin_lower + 1e-6 for c, r in zip(cheap, refined,
                                                                       strict=True))
    verified = np.array([c.status == Status.VERIFIED for c in refined])
    found = pgd_margin(network.module, x, y, Norm.L2, 0.5, steps=60)
    assert np.all(found[verified] > 0)
    for cert, low in zip(refined, found, strict=True):
        assert cert.margin_lower <= low + 1e-6


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_never_below_the_global_spectral_radius(networks, data, name, norm):
    from lipverify.backends.spectral import SpectralBackend

    x, y = data
    x, y = x[:12], y[:12]
    problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, EPS[norm]), want_radius=True)
    local = LocalLipschitzBackend().certify(networks[name], problem)
    spectral = SpectralBackend().certify(networks[name], problem)
    for a, b in zip(local, spectral, strict=True):
        if b.status != Status.FALSIFIED and a.status != Status.FALSIFIED:
            assert a.radius >= b.radius * (1 - 1e-6), (a.radius, b.radius)
