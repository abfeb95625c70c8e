"""The l2prop backend: capabilities, supports() honesty, soundness against attacks and exact radii."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.backends.l2prop import L2PropBackend, L2PropOptions
from lipverify.network.load import load_network
from lipverify.network.modules import ResidualBlock
from lipverify.types import Perturbation, Problem, Status

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exact_reference import exact_robust_radius  # noqa: E402

BENCH = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "l2_sdpcrown"
FAST = L2PropOptions(iterations=10, batch_size=4)


def _net(module, shape):
    return load_network(module, input_shape=shape)


def _tiny(seed, widths=(2, 4, 4, 3)):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen))
            lin.bias.copy_(torch.randn(b, generator=gen) * 0.5)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def test_capabilities():
    backend = L2PropBackend()
    assert backend.name == "l2prop" and backend.cost == 40 and backend.sound
    assert {n.value for n in backend.norms} == {"2"}


def test_supports_says_why_not():
    backend = L2PropBackend()
    relu = _net(_tiny(0), (2,))
    x = np.zeros((1, 2))
    l2 = Problem.robustness(x, [0], 3, Perturbation.ball(2, 0.1))
    linf = Problem.robustness(x, [0], 3, Perturbation.ball("inf", 0.1))
    assert backend.supports(relu, l2) is None
    assert "inf" in backend.supports(relu, linf)
    tanh = _net(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)), (2,))
    assert "tanh" in backend.supports(tanh, l2)
    res = _net(nn.Sequential(nn.Linear(2, 4), ResidualBlock(nn.ReLU(), nn.Linear(4, 4)),
                             nn.Linear(4, 3)), (2,))
    assert backend.supports(res, l2) is not None


def test_radius_below_exact_robust_radius():
    backend = L2PropBackend(L2PropOptions(iterations=5, radius_steps=6))
    failures = []
    for seed in range(6):
        model = _tiny(seed)
        net = _net(model, (2,))
        x0 = np.random.default_rng(seed).normal(size=(1, 2))
        label = int(model(torch.as_tensor(x0, dtype=torch.float32)).argmax())
        problem = Problem.robustness(x0, [label], 3, Perturbation.ball(2, 0.05), want_radius=True)
        cert = backend.certify(net, problem)[0]
        layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
                  for m in model if isinstance(m, nn.Linear)]
        exact = exact_robust_radius(layers, x0[0], label)
        if cert.radius > exact * (1 + 1e-9):
            failures.append((seed, cert.radius, exact))
    assert not failures, f"radius above the exact robust radius: {failures}"


def _pgd_l2(module, x, label, eps, steps=60, restarts=2, seed=0):
    """Inputs of the ball on which some margin is <= 0 (an independent L2 PGD), per image."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(label)
    broken = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(restarts):
        delta = torch.randn(x.shape, generator=gen)
        delta = eps * delta / delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        for _ in range(steps):
            delta.requires_grad_(True)
            out = module(x + delta)
            true = out.gather(1, y[:, None])[:, 0]
            other = out.masked_fill(nn.functional.one_hot(y, out.shape[1]).bool(), -1e9)
            margin = true - other.max(1).values
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                step = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view_as(margin)[
                    (...,) + (None,) * (x.dim() - 1)]
                delta = delta - 0.25 * eps * step
                norm = delta.flatten(1).norm(dim=1).clamp(min=eps)
                delta = delta * (eps / norm).view(-1, *[1] * (x.dim() - 1))
        with torch.no_grad():
            out = module(x + delta)
            broken |= out.argmax(1) != y
    return broken.numpy()


@pytest.mark.parametrize(("model", "data", "eps", "count"), [
    ("mnist_mlp", "mnist", 1.0, 8),
    ("cifar10_cnn_c", "cifar10", 24 / 255, 3),
])
def test_never_verifies_what_pgd_breaks(model, data, eps, count):
    if not BENCH.exists():
        pytest.skip("shared benchmarks not available")
    net = load_network(str(BENCH / f"{model}.onnx"))
    images = np.load(BENCH / f"{data}_images.npy")[:count].astype(np.float64)
    labels = np.load(BENCH / f"{data}_labels.npy")[:count]
    problem = Problem.robustness(images, labels, 10, Perturbation.ball(2, eps))
    certs = L2PropBackend(FAST).certify(net, problem)
    broken = _pgd_l2(net.module, images, labels, eps)
    wrong = net.forward(images).argmax(1) != labels
    for i, cert in enumerate(certs):
        if cert.status == Status.VERIFIED:
            assert not broken[i] and not wrong[i], f"image {i} verified but attacked"
    # Evidence that the test is not vacuous: both kinds of answers occur on MNIST.
    if model == "mnist_mlp":
        assert any(c.status == Status.VERIFIED for c in certs)
        assert broken.any()


def test_escalation_only_tightens_and_stays_below_sampled_margins():
    """Inputs the budgeted pass leaves unverified get the fully propagated pass; the kept bound
    is the better one, and both stay below the margins sampled in the ball."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU(),
                           nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    net = _net(module, (1, 12, 12))
    x = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(0)).double().numpy()
    labels = net.forward(x).argmax(1)
    eps = 0.8
    problem = Problem.robustness(x, labels, 4, Perturbation.ball(2, eps))
    radii = np.full(len(x), eps)
    cheap = L2PropOptions(iterations=10, batch_size=8, propagation_budget=0)
    plain = L2PropBackend(cheap).margins(net, problem, radii)
    escalated = L2PropBackend(cheap).margins(net, problem, radii, escalate=True)
    assert np.all(escalated >= plain)
    assert np.any(escalated > plain + 1e-9), "escalation changed nothing: test is vacuous"
    gen = torch.Generator().manual_seed(1)
    for i in range(len(x)):
        d = torch.randn(4000, 1, 12, 12, generator=gen, dtype=torch.float64)
        d = d * (eps * torch.rand(4000, 1, 1, 1, generator=gen, dtype=torch.float64) ** (1 / 144)
                 / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        out = net.forward((torch.as_tensor(x[i]) + d).numpy())
        sampled = np.min(out[:, labels[i]] - np.delete(out, labels[i], axis=1).max(1))
        assert escalated[i] <= sampled + 1e-6, f"input {i}: bound above a sampled margin"


def test_called_without_supports_on_an_linf_ball_it_refuses_rather_than_bound_an_l2_ball():
    """Its bounds hold on L2 balls: on an L-inf ball of the same eps (a larger set) they would
    certify inputs an attack breaks, so a direct call must fail loudly."""
    from lipverify.errors import InputError

    network = load_network(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,))
    problem = Problem.robustness(np.zeros((1, 3)), [0], 2, Perturbation.ball("inf", 0.1))
    backend = L2PropBackend()
    assert backend.supports(network, problem) is not None
    with pytest.raises(InputError, match="L2 balls only"):
        backend.certify(network, problem)
