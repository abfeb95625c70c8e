"""Soundness of every backend on random small networks, against independent evidence.

- Tiny ReLU nets (2 inputs, <= 8 hidden neurons): every Lipschitz bound >= the exact Lipschitz
  constant and every certified radius <= the exact robust radius, both by enumerating
  activation regions (tests/exact_reference.py).
- Random dense/conv nets with ReLU, tanh, LeakyReLU, with and without residual blocks: bounds >=
  sampled Jacobian norms and gradient-ascent lower bounds; certified radius <= the distance to
  any adversarial example PGD finds.
Failing seeds are printed by hypothesis (and in the assertion messages).
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from exact_reference import exact_lipschitz, exact_robust_radius, regions
from lipverify.backends.registry import BackendRegistry
from lipverify.network.load import load_network
from lipverify.network.modules import ResidualBlock
from lipverify.orchestrator import Mode, run_cascade
from lipverify.types import Norm, Perturbation, Problem, Status

REGISTRY = BackendRegistry.from_entry_points()
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _available(name):
    try:
        backend = REGISTRY.create(name)
    except Exception:
        return None
    return backend if backend.availability() is None else None


CERTIFYING = [n for n in ("spectral", "lipsdp", "lirpa", "local", "l2prop", "alpha-crown")
              if _available(n) is not None]


def _tiny(seed, widths):
    torch.manual_seed(seed)
    sizes = [2, *widths, 3]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double().eval()


def _wb(module):
    return [(m.weight.detach().double().numpy().copy(), m.bias.detach().double().numpy().copy())
            for m in module if isinstance(m, nn.Linear)]


def test_some_backends_are_checked():
    assert "spectral" in CERTIFYING


@pytest.mark.parametrize("name", CERTIFYING)
@SETTINGS
@given(seed=st.integers(0, 10_000), widths=st.sampled_from([(4,), (6,), (3, 3)]))
def test_tiny_relu_nets_exact(name, seed, widths):
    backend = _available(name)
    module = _tiny(seed, widths)
    wb = _wb(module)  # float64 copies, taken before the module becomes float32
    net = load_network(module.float(), (2,))
    cells = regions(wb)
    if hasattr(backend, "lipschitz") and backend.supports(net, _problem(net, seed)) is None:
        bound = backend.lipschitz(net, Norm.L2).value
        exact = exact_lipschitz(wb, cells=cells)
        assert bound >= exact * (1 - 1e-9), f"seed {seed}: {name} bound {bound} < exact {exact}"
    problem = _problem(net, seed, n=2)
    if backend.supports(net, problem) is not None:
        return
    out = run_cascade(net, problem, [backend], Mode.RADIUS)
    for k, cert in enumerate(out.best):
        label = int(problem.labels[k])
        x0 = problem.inputs[k].astype(np.float64)
        exact_r = exact_robust_radius(wb, x0, label, cells=cells)
        assert cert.radius <= exact_r * (1 + 1e-6) + 1e-7, \
            f"seed {seed}: {name} radius {cert.radius} > exact {exact_r} at input {k}"


def _problem(net, seed, n=4):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, *net.input_shape)).astype(np.float32)
    labels = net.forward(x).argmax(1)
    return Problem.robustness(x, labels, net.num_outputs, Perturbation.ball(2, 0.05),
                              want_radius=True)


def _random_net(seed, kind, act, residual):
    torch.manual_seed(seed)
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "leaky": lambda: nn.LeakyReLU(0.1)}
    a = acts[act]
    if kind == "dense":
        body = [nn.Flatten(), nn.Linear(16, 12), a()]
        if residual:
            body.append(ResidualBlock(nn.Linear(12, 12), a()))
        body += [nn.Linear(12, 12), a(), nn.Linear(12, 4)]
        return nn.Sequential(*body).eval(), (16,)
    body = [nn.Conv2d(1, 3, 3, padding=1), a()]
    if residual:
        body.append(ResidualBlock(nn.Conv2d(3, 3, 3, padding=1), a()))
    body += [nn.Conv2d(3, 4, 3, stride=2, padding=1), a(), nn.Flatten(), nn.Linear(4 * 9, 4)]
    return nn.Sequential(*body).eval(), (1, 6, 6)


def _sampled_jacobian_norm(module, shape, seed, n=32):
    torch.manual_seed(seed)
    x = torch.randn(n, *shape) * 2
    jac = torch.func.vmap(torch.func.jacrev(lambda v: module(v[None])[0]))(x)
    return float(torch.linalg.matrix_norm(jac.reshape(n, jac.shape[1], -1), 2).max())


RADII = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2])


def _pgd_distance(module, x0, label, seed, steps=40):
    """Smallest L2 distance of a PGD-found misclassified point (inf if none); all radii at once."""
    torch.manual_seed(seed)
    k = len(RADII)
    x0 = torch.as_tensor(x0)[None].expand(k, *x0.shape)
    radius = RADII.view(-1, *([1] * (x0.dim() - 1)))
    delta = (torch.randn_like(x0) * 1e-3).requires_grad_(True)
    for _ in range(steps):
        out = module(x0 + delta)
        other = out.clone()
        other[:, label] = -1e9
        loss = (out[:, label] - other.max(1).values).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            norms = grad.flatten(1).norm(dim=1).view(radius.shape) + 1e-12
            delta -= radius / 8 * grad / norms
            scale = (radius.flatten() / (delta.flatten(1).norm(dim=1) + 1e-12)).clamp(max=1)
            delta *= scale.view(radius.shape)
    with torch.no_grad():
        wrong = module(x0 + delta).argmax(1) != label
        dist = delta.flatten(1).norm(dim=1)
    return float(dist[wrong].min()) if wrong.any() else float("inf")


@pytest.mark.parametrize("name", CERTIFYING)
@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["dense", "conv"]),
       act=st.sampled_from(["relu", "tanh", "leaky"]), residual=st.booleans())
def test_random_nets_against_sampling_and_pgd(name, seed, kind, act, residual):
    backend = _available(name)
    module, shape = _random_net(seed, kind, act, residual)
    net = load_network(module, shape)
    problem = _problem(net, seed)
    if backend.supports(net, problem) is not None:
        return
    if hasattr(backend, "lipschitz"):
        bound = backend.lipschitz(net, Norm.L2).value
        sampled = _sampled_jacobian_norm(module, shape, seed)
        assert bound >= sampled * (1 - 1e-6), f"seed {seed}: {name} {bound} < sampled {sampled}"
    out = run_cascade(net, problem, [backend], Mode.RADIUS)
    for k, cert in enumerate(out.best):
        if cert.status == Status.FALSIFIED:
            continue
        dist = _pgd_distance(module, problem.inputs[k], int(problem.labels[k]), seed)
        assert cert.radius <= dist, f"seed {seed}: {name} radius {cert.radius} > PGD {dist}"
