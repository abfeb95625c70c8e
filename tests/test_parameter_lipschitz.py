"""Lipschitz bounds in the parameters against exact values and sampled/autograd lower bounds."""

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.errors import InputError, ModelError
from lipverify.network.load import load_network
from lipverify.network.modules import ResidualBlock
from lipverify.parameter_lipschitz import box_radius, parameter_lipschitz_bound
from lipverify.parameter_lipschitz_search import (
    ParameterSearchOptions,
    parameter_lipschitz_lower,
)

QUICK = ParameterSearchOptions(samples=128, ascent_starts=8, ascent_steps=25)


@pytest.mark.parametrize("radius", [0.0, 0.5, 3.0])
def test_one_linear_layer_is_exact(radius):
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    net = load_network(nn.Sequential(layer))
    exact = np.sqrt(radius ** 2 + 1)
    # the constant is attained: at ||x|| = R the perturbation D = u (x, 1)^T moves the output by
    # ||D||_F ||(x, 1)|| (f(x; t + D) - f(x; t) = D (x, 1) for an affine layer)
    x = np.array([radius, 0.0, 0.0])
    d = np.outer([0.6, 0.8], np.append(x, 1.0))
    moved = d[:, :3] @ x + d[:, 3]
    assert np.linalg.norm(moved) / np.linalg.norm(d) == pytest.approx(exact, rel=1e-12)
    bound = parameter_lipschitz_bound(net, radius, 0.1)
    assert exact <= bound.value <= exact * (1 + 1e-12)
    assert bound.num_parameters == 8
    sampled = parameter_lipschitz_lower(net, radius, 0.1, seed=0, options=QUICK)
    assert exact * 0.999 <= sampled.value <= exact
    assert np.linalg.norm(sampled.x) <= radius + 1e-12
    assert max(sampled.theta_offsets) <= 0.1


def _mlp(seed, act, widths=(4, 8, 8, 2), scale=1.0):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(act())
    model = nn.Sequential(*mods)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return model


def _autograd_norm(model, x):
    """||d f / d theta|| at the network's own parameters (scalar output): an independent
    lower bound of the constant for any parameter radius > 0."""
    model.zero_grad()
    model.double()(torch.as_tensor(x)[None]).sum().backward()
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))


@pytest.mark.parametrize("seed, act", [(1, nn.ReLU), (2, nn.Tanh), (3, nn.ReLU),
                                       (4, nn.Sigmoid), (5, lambda: nn.LeakyReLU(0.1))])
def test_small_nets_bound_above_sampled_and_autograd(seed, act):
    model = _mlp(seed, act, widths=(3, 6, 6, 1))
    net = load_network(model)
    for radius, delta in ((1.0, 0.05), (2.0, 0.5)):
        bound = parameter_lipschitz_bound(net, radius, delta).value
        sampled = parameter_lipschitz_lower(net, radius, delta, seed=seed, options=QUICK).value
        assert 0 < sampled <= bound
        rng = np.random.default_rng(seed)
        for _ in range(20):
            x = rng.standard_normal(3)
            x *= radius / np.linalg.norm(x)
            assert _autograd_norm(model, x) <= bound
        # the search is at least as good as the gradient norm at random points on the sphere
        assert sampled >= 0.9 * _autograd_norm(model, x)


def test_parameter_radius_enlarges_the_weights():
    # small weights, large radius: the perturbed weights dominate, and the bound must follow
    model = _mlp(6, nn.ReLU, widths=(2, 4, 4, 2), scale=0.05)
    net = load_network(model)
    small = parameter_lipschitz_bound(net, 1.0, 1e-3).value
    large = parameter_lipschitz_bound(net, 1.0, 2.0).value
    assert large > small
    sampled = parameter_lipschitz_lower(net, 1.0, 2.0, seed=0, options=QUICK).value
    assert sampled > 2 * small  # without the + delta in the weight norms the bound would fail
    assert sampled <= large


def test_refusals_and_box_radius():
    torch.manual_seed(0)
    res = load_network(nn.Sequential(ResidualBlock(nn.Linear(3, 3))))
    with pytest.raises(ModelError, match="dense feed-forward"):
        parameter_lipschitz_bound(res, 1.0, 0.1)
    net = load_network(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(InputError, match="parameter radius"):
        parameter_lipschitz_bound(net, 1.0, 0.0)
    with pytest.raises(InputError, match="input radius"):
        parameter_lipschitz_lower(net, -1.0, 0.1)
    assert box_radius(0.0, 1.0, 4) == pytest.approx(2.0)
    assert box_radius(np.array([-3.0, 0.0]), np.array([1.0, 4.0])) == pytest.approx(5.0)
