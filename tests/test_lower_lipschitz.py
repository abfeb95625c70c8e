"""Certified lower Lipschitz constants against exact values (SVD, closed forms) and the search."""

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.errors import InputError
from lipverify.lower_bounds import LowerBoundOptions
from lipverify.lower_lipschitz import (
    layer_lower_bound,
    lower_lipschitz_bound,
    smallest_singular_lower,
)
from lipverify.lower_lipschitz_search import search_lower_counterexample
from lipverify.network.layers import Activation, Conv, Dense, Residual, Shift
from lipverify.network.load import load_network
from lipverify.network.modules import ResidualBlock


def _dense(w, b=None):
    w = torch.as_tensor(np.asarray(w, dtype=np.float64))
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else torch.as_tensor(b)
    return Dense(w, b, (w.shape[1],), (w.shape[0],))


def _sigma_min(m):
    return np.linalg.svd(np.asarray(m, dtype=np.float64), compute_uv=False).min()


def test_linear_residual_is_bounded_by_sigma_min_of_identity_plus_a():
    rng = np.random.default_rng(0)
    for n in (2, 5, 9):
        a = rng.standard_normal((n, n))
        a *= 0.8 / np.linalg.norm(a, 2)
        exact = _sigma_min(np.eye(n) + a)
        bound = lower_lipschitz_bound([Residual((_dense(a),), (n,))])
        assert exact * (1 - 1e-9) <= bound.value <= exact
        assert bound.layers[0].method == "sigma_min(I + W)"
        # the same linear map as two factors only gets 1 - ||B|| ||C||, still below sigma_min
        c = rng.standard_normal((n, n))
        c /= np.linalg.norm(c, 2)
        b = a @ np.linalg.inv(c)
        two = lower_lipschitz_bound([Residual((_dense(c), _dense(b)), (n,))])
        assert 0 <= two.value <= exact
        assert two.value >= (1 - np.linalg.norm(b, 2)) * (1 - 1e-9) or two.value == 0


@pytest.mark.parametrize("a, exact", [(-0.5, 0.5), (0.5, 1.0), (-0.9, 0.1)])
def test_scalar_residual_closed_form(a, exact):
    # f(x) = x + a tanh(x): f'(x) = 1 + a sech^2(x), whose infimum is 1 + min(a, 0)
    block = Residual((_dense([[1.0]]), Activation("tanh", (1,)), _dense([[a]])), (1,))
    bound = lower_lipschitz_bound([block]).value
    assert bound <= exact
    assert bound >= (1 - abs(a)) * (1 - 1e-12)  # 1 - Lip(g), tight when a < 0
    x = np.linspace(-6, 6, 20001)
    quotients = np.diff(x + a * np.tanh(x)) / np.diff(x)
    assert bound <= quotients.min()


def test_dense_factors_and_refusals():
    rng = np.random.default_rng(1)
    square = rng.standard_normal((4, 4))
    tall = rng.standard_normal((6, 3))
    for m in (square, tall):
        value = layer_lower_bound(_dense(m)).value
        assert _sigma_min(m) * (1 - 1e-12) <= value <= _sigma_min(m)
    wide = layer_lower_bound(_dense(rng.standard_normal((2, 5))))
    assert wide.value == 0 and "not injective" in wide.reason
    # sigma_min = 1e-20 is far below the LAPACK error margin: the bound must not claim it
    nearly_singular = layer_lower_bound(_dense(np.diag([1.0, 1e-20])))
    assert nearly_singular.value == 0 and "singular" in nearly_singular.reason
    assert smallest_singular_lower(np.diag([3.0, 2.0])) == pytest.approx(2.0, rel=1e-12)
    assert smallest_singular_lower(np.diag([3.0, 2.0])) <= 2.0


def test_activations_shift_and_composition():
    assert layer_lower_bound(Activation("leaky_relu", (3,), 0.1)).value == pytest.approx(0.1)
    relu = layer_lower_bound(Activation("relu", (3,)))
    assert relu.value == 0 and "relu" in relu.reason
    assert layer_lower_bound(Shift(torch.ones(3, dtype=torch.float64), (3,))).value == 1.0
    w = np.diag([2.0, 3.0, 4.0])
    seq = [_dense(w), Activation("leaky_relu", (3,), 0.5), Shift(torch.zeros(3), (3,))]
    bound = lower_lipschitz_bound(seq)
    assert bound.value <= 1.0 and bound.value == pytest.approx(1.0, rel=1e-12)  # 2 * 0.5
    assert bound.reason is None
    zero = lower_lipschitz_bound([_dense(w), Activation("relu", (3,))])
    assert zero.value == 0 and zero.reason.startswith("1:activation:relu")
    with pytest.raises(InputError, match="L2 only"):
        lower_lipschitz_bound(seq, norm="inf")


def test_conv_factor_against_its_matrix():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    n = 2 * 5 * 5
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 2, 5, 5)
    matrix = nn.functional.conv2d(eye, conv.weight.double(), None, 1, 1).reshape(n, -1).T
    exact = _sigma_min(matrix.detach().numpy())  # 75 x 50: tall, generically injective
    layer = Conv(conv.weight.detach().double(), conv.bias.detach().double(), (2, 5, 5), (3, 5, 5),
                 padding=(1, 1, 1, 1))
    value = layer_lower_bound(layer).value
    assert exact * (1 - 1e-9) <= value <= exact


def _heldout_residual_net(seed, width=6, blocks=2):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    acts = (nn.ReLU, nn.Tanh, lambda: nn.LeakyReLU(0.2))
    layers = [nn.Linear(width, width)]
    for k in range(blocks):
        layers.append(ResidualBlock(nn.Linear(width, 2 * width), acts[(seed + k) % 3](),
                                    nn.Linear(2 * width, width)))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for block in model[1:]:
            lip = rng.uniform(0.3, 0.95)  # split over the two layers of the body
            for lin in (block.body[0], block.body[2]):
                lin.weight.mul_(lip ** 0.5 / np.linalg.norm(lin.weight.numpy(), 2))
    return load_network(model.double().float())


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_certificate_never_above_search_on_heldout_residual_nets(seed):
    net = _heldout_residual_net(seed)
    bound = lower_lipschitz_bound(net)
    assert bound.value > 0, bound.reason
    found = search_lower_counterexample(net, claim=bound.value, seed=seed,
                                        options=LowerBoundOptions(random_points=32,
                                                                  ascent_steps=20))
    # proven: certified <= true constant <= exact ratio of the pair <= ratio_upper
    assert found.proven and bound.value <= found.ratio_upper
    assert bound.value <= found.ratio * (1 + 1e-9)  # the float64 ratio, up to its rounding
    assert not found.violates
    # the pair really has this ratio (an independent float64 evaluation of the module)
    with torch.no_grad():
        module = net.module.double()
        fx, fy = (module(torch.as_tensor(v)[None]).numpy() for v in (found.x, found.x_prime))
    ratio = np.linalg.norm(fx - fy) / np.linalg.norm(found.x - found.x_prime)
    assert ratio == pytest.approx(found.ratio, rel=1e-9)
