"""Proven rounding bounds of centre outputs, and certificates of nets that float32 rounds badly.

The references are exact rational arithmetic (`fractions.Fraction`) on the float32 weights: the
certificate is about that exact function, not about one float32 evaluation of it.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lipverify.backends.registry import BackendRegistry
from lipverify.network.load import load_network
from lipverify.network.rounding import forward_with_error, sound_outputs
from lipverify.types import Norm, Perturbation, Problem, Status

REGISTRY = BackendRegistry.from_entry_points()
CERTIFYING = ("spectral", "lipsdp", "local", "lirpa", "alpha-crown", "l2prop")
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _linears(module):
    return [m for m in module if isinstance(m, nn.Linear)]


def _exact_forward(module, x):
    """Outputs of a Linear/ReLU sequence at `x`, in exact rational arithmetic."""
    h = [Fraction(float(v)) for v in x]
    mods = list(module)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            w = m.weight.detach().double().numpy()
            b = m.bias.detach().double().numpy()
            h = [sum((Fraction(float(w[r, c])) * h[c] for c in range(len(h))), Fraction(0))
                 + Fraction(float(b[r])) for r in range(w.shape[0])]
        elif isinstance(m, nn.ReLU):
            h = [max(v, Fraction(0)) for v in h]
        else:
            raise TypeError(type(m))
    return h


def _case1():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([2.0**24, 2.0**24]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.0, -0.3]))
    return net.eval()


def test_float32_hides_a_wrong_label_that_the_bound_reveals():
    net = _case1()
    x = np.array([[-0.45, 0.0]], dtype=np.float32)
    with torch.no_grad():
        fp32 = net(torch.as_tensor(x))[0].numpy()
    assert fp32[0] > fp32[1]  # float32 says label 0 wins by 0.3
    exact = [float(v) for v in _exact_forward(net, x[0])]
    assert exact[0] < exact[1]  # it does not: -0.45 < -0.30
    out = sound_outputs(load_network(net, (2,)), x)
    assert np.all(np.abs(out.values[0] - exact) <= out.error[0])
    assert out.values[0, 0] + out.error[0, 0] < out.values[0, 1] - out.error[0, 1]


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("name", CERTIFYING)
def test_case_of_the_issue_is_not_verified(name, norm):
    """Issue 15.1: spectral, lipsdp and local verified this (float64 logits [-0.45, -0.30])."""
    net = load_network(_case1(), (2,))
    backend = REGISTRY.create(name)
    problem = Problem.robustness(np.array([[-0.45, 0.0]], np.float32), [0], 2,
                                 Perturbation.ball(norm, 0.2))
    if backend.supports(net, problem) is not None:
        assert name == "l2prop" and norm == "inf"
        return
    cert = backend.certify(net, problem)[0]
    assert cert.status != Status.VERIFIED, f"{name} verified a wrong label"


@SETTINGS
@given(seed=st.integers(0, 10_000), power=st.integers(10, 40), depth=st.integers(1, 3))
def test_error_bound_covers_exact_arithmetic(seed, power, depth):
    torch.manual_seed(seed)
    sizes = [3] + [4] * depth + [3]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.bias.mul_(2.0**power)
        layers += [lin, nn.ReLU()]
    module = nn.Sequential(*layers[:-1]).eval()
    net = load_network(module, (3,))
    x = np.random.default_rng(seed).uniform(-2, 2, size=(3, 3)).astype(np.float32)
    out = sound_outputs(net, x)
    for i in range(len(x)):
        exact = np.array([float(v) for v in _exact_forward(module, x[i])])
        assert np.all(np.abs(out.values[i] - exact) <= out.error[i]), (seed, power)
    # the bound is a few float64 ulps of the magnitudes, not a float32-sized allowance
    scale = 2.0**power * 8
    assert np.all(out.error <= 1e-12 * scale)


def test_error_bound_on_ordinary_nets_is_tiny():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                           nn.Linear(64, 10)).eval()
    net = load_network(module, (1, 4, 4))
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y, err = forward_with_error(net.layers, x)
    assert torch.allclose(y, module.double()(x).reshape(5, -1), atol=1e-12)
    assert float(err.max()) < 1e-13


def _cancelling_net(seed, hidden, power, dead):
    """Hidden biases of +-2**power that the output layer cancels: float32 loses the inputs."""
    rng = np.random.default_rng(seed)
    n_in, n_out = 2, 3
    w1 = rng.uniform(-1, 1, (hidden, n_in)).astype(np.float32)
    signs = np.where(rng.random(hidden) < dead, -1.0, 1.0)
    b1 = (signs * 2.0**power + rng.uniform(-1, 1, hidden)).astype(np.float32)
    w2 = rng.uniform(-1, 1, (n_out, hidden)).astype(np.float32)  # products round in float32
    active = signs > 0
    b2 = (-(w2[:, active] @ b1[active].astype(np.float64)) + rng.uniform(-1, 1, n_out))
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
    with torch.no_grad():
        net[0].weight.copy_(torch.as_tensor(w1))
        net[0].bias.copy_(torch.as_tensor(b1))
        net[2].weight.copy_(torch.as_tensor(w2))
        net[2].bias.copy_(torch.as_tensor(b2.astype(np.float32)))
    return net.eval(), active


def _exact_worst_margin(module, active, x0, label, norm, eps):
    """On the ball every ReLU keeps its state (biases dwarf the inputs): the net is affine."""
    w1 = module[0].weight.detach().double().numpy()
    w2 = module[2].weight.detach().double().numpy()
    centre = _exact_forward(module, x0)
    grad = w2[:, active] @ w1[active]  # float64: off by ~1e-16, far inside the tolerance
    worst = np.inf
    for j in range(len(centre)):
        if j == label:
            continue
        dual = np.linalg.norm(grad[label] - grad[j], 1 if norm == Norm.LINF else 2)
        worst = min(worst, float(centre[label] - centre[j]) - eps * dual)
    return worst


@pytest.mark.parametrize("name", CERTIFYING)
@SETTINGS
@given(seed=st.integers(0, 10_000), hidden=st.integers(2, 5), power=st.integers(18, 30),
       dead=st.sampled_from([0.0, 0.3]), norm=st.sampled_from([Norm.L2, Norm.LINF]))
def test_large_cancelling_biases_never_give_a_false_verified(name, seed, hidden, power, dead,
                                                             norm):
    module, active = _cancelling_net(seed, hidden, power, dead)
    net = load_network(module, (2,))
    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(-1, 1, size=(6, 2)).astype(np.float32)
    exact_out = np.array([[float(v) for v in _exact_forward(module, xi)] for xi in x])
    labels = exact_out.argmax(1)
    # also the float32 argmax: where float32 and exact disagree, a claim is surely wrong
    with torch.no_grad():
        fp32_labels = module(torch.as_tensor(x)).argmax(1).numpy()
    labels = np.where(rng.random(6) < 0.5, fp32_labels, labels)
    eps = 0.05
    problem = Problem.robustness(x, labels, 3, Perturbation.ball(norm, eps))
    backend = REGISTRY.create(name)
    if backend.supports(net, problem) is not None:
        return
    for i, cert in enumerate(backend.certify(net, problem)):
        if cert.status == Status.VERIFIED:
            worst = _exact_worst_margin(module, active, x[i], int(labels[i]), norm, eps)
            assert worst > -1e-9, f"{name} verified input {i} with exact worst margin {worst}"
